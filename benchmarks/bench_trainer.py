"""Model level, the way most fine-tunes run: transformers' ``Trainer(bf16=True)`` on float32
weights (autocast), for sdpa and triton_attention in one process, on bench_models.py's
LLaMA-style 0.5B (4 x 2048, random tokens). Needs a GPU.

    python benchmarks/bench_trainer.py
    python benchmarks/bench_trainer.py --steps 20 --out trainer.json

Per implementation: the median step time (a callback synchronises at every step's start and
end; the first ``--warmup`` steps are left out), tokens/s, the losses Trainer logged, whether
any call fell back to eager (warnings recorded while training), and how many attention calls
one forward makes through our kernels (counted after training, untimed). The JSON carries
"environment" and "ratios_vs_sdpa": {"model/trainer_bf16_<model>/train": sdpa_ms / our_ms}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch
from bench_models import MODELS, OURS, build, random_ids, release
from common import environment, jsonable, write_json
from transformers import TrainerCallback

IMPLS = ("sdpa", OURS)


class StepTimer(TrainerCallback):
    """Wall time of every optimiser step, synchronised at both ends."""

    def __init__(self):
        self.times: list[float] = []
        self.start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def kernel_calls_per_forward(model, ids) -> int:
    """Attention calls one forward makes through our kernels (0 for other implementations)."""
    from hf_flashattn import integration

    calls = []
    original = integration.flash_attn

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    integration.flash_attn = spy
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=ids[:1, :128])
    finally:
        integration.flash_attn = original
    return len(calls)


def bench(name: str, impl: str, steps: int, warmup: int) -> dict:
    from transformers import Trainer, TrainingArguments

    from hf_flashattn.integration import EagerFallbackWarning

    spec = MODELS[name]
    model = build(name, impl, dtype=torch.float32).train()
    ids = random_ids(spec.batch * (warmup + steps), spec.seq_len, model.config.vocab_size).cpu()
    rows = [{"input_ids": row, "labels": row} for row in ids]
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(
            output_dir=out_dir,
            max_steps=warmup + steps,
            per_device_train_batch_size=spec.batch,
            bf16=True,
            learning_rate=1e-5,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
        )
        _ = args.device  # sets up the devices first, which also sets _n_gpu
        args._n_gpu = min(args._n_gpu, 1)  # one GPU, no nn.DataParallel replicas
        trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[timer])
        torch.cuda.reset_peak_memory_stats()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
    step_s = statistics.median(timer.times[warmup:])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "step_ms": step_s * 1e3,
        "tokens_per_s": spec.batch * spec.seq_len / step_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "step_times_ms": [round(t * 1e3, 2) for t in timer.times],
        "losses": losses,
        "weights_dtype": str(next(model.parameters()).dtype),
        "fallback_warnings": sorted(
            {str(w.message) for w in caught if issubclass(w.category, EagerFallbackWarning)}
        ),
        "kernel_calls_per_forward": kernel_calls_per_forward(model, ids.to("cuda")),
        "layers": model.config.num_hidden_layers,
    }
    del trainer, model
    release()
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="llama")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: none)")
    args = p.parse_args(argv)
    import hf_flashattn  # noqa: F401 - registers triton_attention

    data = {"environment": environment(), "model": args.model, "results": {}}
    for impl in IMPLS:
        r = data["results"][impl] = bench(args.model, impl, args.steps, args.warmup)
        print(
            f"{args.model} {impl:18s} {r['step_ms']:8.1f} ms/step {r['tokens_per_s']:10,.0f} tok/s "
            f"peak {r['peak_gib']:.1f} GiB, kernel calls/forward {r['kernel_calls_per_forward']}"
            f"/{r['layers']}, fallbacks {r['fallback_warnings'] or 'none'}, "
            f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}",
            flush=True,
        )
    sdpa, ours = data["results"]["sdpa"], data["results"][OURS]
    data["ratios_vs_sdpa"] = {
        f"model/trainer_bf16_{args.model}/train": sdpa["step_ms"] / ours["step_ms"]
    }
    print(data["ratios_vs_sdpa"])
    if args.out:
        write_json(args.out, jsonable(data))


if __name__ == "__main__":
    main()
