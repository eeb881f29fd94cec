"""Packed sequences against padding: real-token training throughput on documents of uneven
lengths (issue 12's benchmark).

The same documents each step, two ways: padded (one row per document, padded to the longest,
``attention_mask``) and packed (one row, ``position_ids`` restarting at each document, the
first label of each document -100, as ``DataCollatorWithFlattening`` builds it). Both losses
are the mean over the same predicted tokens, so they agree. Implementations: sdpa padded (what
users run today), sdpa packed (transformers' block-diagonal (seq x seq) mask), flex_attention
packed (its block mask), ours padded and ours packed. The LLaMA-style 0.5B of
bench_models.py, bf16 weights, AdamW.

    python benchmarks/bench_packed.py --out benchmarks/results/packed_<gpu>_<date>.json

ratios_vs_sdpa (level ``packed``): ``packed/<case>/train`` = sdpa padded seconds per real token
/ ours packed; ``.../train_vs_packed_sdpa`` against sdpa packed; ``.../train_padded`` ours
padded against sdpa padded. ratios_vs_flex_attention: ``packed/<case>/train``, flex_attention
packed / ours packed.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
from bench_models import DEVICE, OURS, build, release, timed_steps
from common import GIB, default_out, environment, error_string, raise_recompile_limit, write_json

# Document lengths: log-normal (median ~270 tokens, a long tail), clipped to [32, 2048], the
# shape of instruction-tuning corpora; drawn once from a fixed seed.
CASES = {"docs16": dict(documents=16, log_median=5.6, log_sigma=0.9)}


def document_lengths(documents: int, log_median: float, log_sigma: float) -> list[int]:
    gen = torch.Generator().manual_seed(0)
    draws = torch.randn(documents, generator=gen) * log_sigma + log_median
    return [int(min(2048, max(32, round(math.exp(x))))) for x in draws.tolist()]


def batches(lengths: list[int], vocab: int) -> dict[str, dict]:
    """The model inputs of both layouts for the same documents."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    docs = [torch.randint(3, vocab, (n,), device=DEVICE, generator=gen) for n in lengths]
    longest = max(lengths)
    ids = torch.zeros((len(docs), longest), dtype=torch.long, device=DEVICE)
    mask = torch.zeros_like(ids)
    for row, doc in enumerate(docs):
        ids[row, : len(doc)] = doc
        mask[row, : len(doc)] = 1
    padded = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    packed_ids = torch.cat(docs)[None]
    labels = packed_ids.clone()
    starts = torch.tensor([0, *lengths[:-1]], device=DEVICE).cumsum(0)
    labels[0, starts] = -100  # a document's first token is not predicted from the one before
    position_ids = torch.cat([torch.arange(n, device=DEVICE) for n in lengths])[None]
    packed = dict(input_ids=packed_ids, position_ids=position_ids, labels=labels)
    return {"padded": padded, "packed": packed}


def bench(impl: str, inputs: dict, real_tokens: int, steps: int, warmup: int = 2) -> dict:
    model = build("llama", impl).train()
    torch.cuda.reset_peak_memory_stats()
    # no KV cache: transformers looks for packed sequences only without one
    times, losses = timed_steps(model, dict(inputs, use_cache=False), steps, warmup)
    step_s = statistics.median(times[warmup:])
    del model
    release()
    return {
        "real_tokens_per_s": real_tokens / step_s,
        "step_ms": step_s * 1e3,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB,
        "first_loss": losses[0],
        "losses": losses,
        "step_times_ms": [round(t * 1e3, 2) for t in times],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--runs",
        default="sdpa/padded,triton_attention/padded,sdpa/packed,flex_attention/packed,"
        "triton_attention/packed",
        help="comma-separated impl/layout pairs (flex_attention compiles: about a minute)",
    )
    args = parser.parse_args(argv)
    out = args.out or default_out("packed")
    raise_recompile_limit()  # transformers' flex_attention is torch.compile'd
    data = {
        "kind": "packed",
        "environment": environment(),
        "cases": {},
        "ratios_vs_sdpa": {},
        "ratios_vs_flex_attention": {},
    }
    for case, spec in CASES.items():
        lengths = document_lengths(**spec)
        inputs = batches(lengths, vocab=32000)
        real = sum(lengths)
        runs = {}
        for name in args.runs.split(","):
            impl, layout = name.split("/")
            try:
                runs[name] = bench(impl, inputs[layout], real, args.steps)
            except Exception as exc:  # recorded, the other runs go on
                runs[name] = {"error": error_string(exc)}
                release()
            r = runs[name]
            print(f"{case} {name:26s} " + (
                f"{r['real_tokens_per_s']:9,.0f} real tokens/s  {r['step_ms']:7.1f} ms  "
                f"{r['peak_gib']:5.1f} GiB  loss {r['first_loss']:.4f}"
                if "error" not in r else r["error"]
            ), flush=True)  # fmt: skip
        data["cases"][case] = {
            "lengths": lengths,
            "real_tokens": real,
            "padded_tokens": len(lengths) * max(lengths),
            "runs": runs,
        }

        steps = {name: r.get("step_ms") for name, r in runs.items()}
        pairs = (
            ("ratios_vs_sdpa", "train", "sdpa/padded", f"{OURS}/packed"),
            ("ratios_vs_sdpa", "train_vs_packed_sdpa", "sdpa/packed", f"{OURS}/packed"),
            ("ratios_vs_sdpa", "train_padded", "sdpa/padded", f"{OURS}/padded"),
            ("ratios_vs_flex_attention", "train", "flex_attention/packed", f"{OURS}/packed"),
        )
        for table, key, base, ours in pairs:
            if steps.get(base) and steps.get(ours):
                data[table][f"packed/{case}/{key}"] = steps[base] / steps[ours]
        write_json(out, data)
    for table in ("ratios_vs_sdpa", "ratios_vs_flex_attention"):
        print(table, {k: round(v, 3) for k, v in data[table].items()})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
