"""Kernel level: hf_flashattn.flash_attn against SDPA's backends, FlexAttention and eager
attention, with the shapes, modes, FLOP count and timing of BENCHMARKS.md.

    python benchmarks/bench_kernels.py --quick                    # smoke run, 1-2 minutes
    python benchmarks/bench_kernels.py --dtypes bf16 --out bf16.json
    python benchmarks/bench_kernels.py --dtypes fp16 --out fp16.json
    python benchmarks/bench_kernels.py --report bf16.json fp16.json --out all.json  # merge

The JSON is rewritten after every shape and a run stops cleanly at --time-budget; the same
command with --resume (the JSON in place) measures what is missing. A PNG (plot.py) is
written next to the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    GIB,
    bench_ms,
    default_out,
    environment,
    error_string,
    free_bytes,
    jsonable,
    load_json,
    measure_ceilings,
    peak_gib,
    raise_recompile_limit,
    write_json,
)

DEVICE = "cuda"
TOKENS = 32768  # batch * seq_len, fixed across shapes
MODEL_DIM = 2048  # heads * head_dim, fixed across shapes
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "fwd+bwd")
PEERS = ("ours", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex", "eager")
# Eager holds N x N tensors. Bytes per score element at its peak: forward keeps the scores,
# fp32 and bf16 probabilities; forward + backward also their gradients (16 B matches the
# 65 GiB BENCHMARKS.md measured at D=64, N=4k).
EAGER_BYTES_PER_SCORE = {"fwd": 10, "fwd+bwd": 16}
EAGER_MEMORY_FRACTION = 0.9


def attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, causal: bool, mode: str):
    """Forward 4*B*H*N^2*D, halved when causal; forward + backward 3.5x the forward."""
    flops = 4 * batch * heads * seq_len**2 * head_dim
    if causal:
        flops //= 2
    return flops * 3.5 if mode == "fwd+bwd" else float(flops)


def record_key(record: dict) -> tuple:
    return (
        record["dtype"],
        record["head_dim"],
        record["causal"],
        record["seq_len"],
        record["mode"],
    )


# ---------------------------------------------------------------------------- peers
@dataclass
class Peer:
    """``attn(q, k, v, causal) -> out`` on (batch, heads, seq, dim), run inside ``context()``."""

    attn: Callable[..., torch.Tensor]
    context: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)


def eager_attention(q, k, v, causal: bool) -> torch.Tensor:
    # matmul, softmax in fp32, matmul: what a model's eager path does.
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    if causal:
        n_q, n_k = scores.shape[-2:]
        above = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu_(n_k - n_q + 1)
        scores = scores.masked_fill(above, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    del scores  # frees the bf16 scores under no_grad
    return torch.matmul(probs.to(q.dtype), v)


class FlexPeer:
    """torch.compile(flex_attention), one compiled graph per shape (dynamic=False), with the
    causal block mask built once per sequence length."""

    def __init__(self):
        from torch.nn.attention.flex_attention import flex_attention

        raise_recompile_limit()
        self.compiled = torch.compile(flex_attention, dynamic=False)
        self.masks = {}

    def __call__(self, q, k, v, causal: bool) -> torch.Tensor:
        return self.compiled(q, k, v, block_mask=self._mask(q, k) if causal else None)

    def _mask(self, q, k):
        from torch.nn.attention.flex_attention import create_block_mask

        key = (q.shape[2], k.shape[2])
        if key not in self.masks:
            offset = k.shape[2] - q.shape[2]  # bottom-right aligned, as flash_attn

            def causal_mask(b, h, q_idx, kv_idx):
                return q_idx + offset >= kv_idx

            self.masks[key] = create_block_mask(causal_mask, None, None, *key, device=q.device)
        return self.masks[key]


def make_peer(name: str) -> Peer:
    if name == "ours":
        from hf_flashattn import flash_attn

        return Peer(lambda q, k, v, causal: flash_attn(q, k, v, causal=causal))
    if name == "sdpa":  # default dispatch: what transformers' sdpa gets (cuDNN on the H100)
        return Peer(sdpa)
    if name.startswith("sdpa_"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {
            "sdpa_flash": SDPBackend.FLASH_ATTENTION,
            "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
        }[name]
        return Peer(sdpa, partial(sdpa_kernel, [backend]))
    if name == "flex":
        return Peer(FlexPeer())
    if name == "eager":
        return Peer(eager_attention)
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")


def sdpa(q, k, v, causal: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


# ---------------------------------------------------------------------------- measuring
def step_fn(attn, q, k, v, dout, causal: bool, mode: str) -> Callable[[], object]:
    if mode == "fwd":
        return lambda: attn(q, k, v, causal)

    def fwd_bwd():
        # autograd.grad, not .backward: no .grad accumulation, the same work for every peer.
        return torch.autograd.grad(attn(q, k, v, causal), (q, k, v), dout)

    return fwd_bwd


def measure(peer: Peer, q, k, v, dout, causal: bool, mode: str) -> dict:
    fn = step_fn(peer.attn, q, k, v, dout, causal, mode)
    grad_mode = torch.no_grad if mode == "fwd" else torch.enable_grad
    with peer.context(), grad_mode():
        ms = bench_ms(fn)  # its first call compiles (flex) and picks plans (cuDNN)
        peak = peak_gib(fn)
    return {"ms": ms, "peak_gib": peak}


def eager_skip_reason(batch: int, heads: int, seq_len: int, mode: str) -> str | None:
    need = EAGER_BYTES_PER_SCORE[mode] * batch * heads * seq_len**2
    free = free_bytes()
    if need > EAGER_MEMORY_FRACTION * free:
        return f"N^2 scores need ~{need / GIB:.0f} GiB; {free / GIB:.0f} GiB free"
    return None


def spot_check(attn, q, k, v, dout, causal: bool, mode: str) -> dict:
    """max |ours - SDPA (default dispatch)| of the output, and of the gradients with a bwd."""
    fn = step_fn(attn, q, k, v, dout, causal, mode)
    ref_fn = step_fn(sdpa, q, k, v, dout, causal, mode)
    grad_mode = torch.no_grad if mode == "fwd" else torch.enable_grad
    with grad_mode():
        ours, ref = fn(), ref_fn()
    names = ("out",) if mode == "fwd" else ("dq", "dk", "dv")
    ours = (ours,) if mode == "fwd" else ours
    ref = (ref,) if mode == "fwd" else ref
    check = {
        f"max_abs_diff_{n}": (a.float() - b.float()).abs().max().item()
        for n, a, b in zip(names, ours, ref, strict=True)
    }
    check["nan"] = any(bool(torch.isnan(a).any()) for a in ours)
    return check


def bench_shape(
    peers: dict, dtype_name: str, head_dim: int, causal: bool, seq_len: int, modes: list[str]
) -> list[dict]:
    batch, heads = TOKENS // seq_len, MODEL_DIM // head_dim
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v, dout = (
        torch.randn(
            batch, heads, seq_len, head_dim, device=DEVICE, dtype=DTYPES[dtype_name], generator=gen
        )
        for _ in range(4)
    )
    for t in (q, k, v):
        t.requires_grad_(True)
    records = []
    for mode in modes:
        flops = attention_flops(batch, heads, seq_len, head_dim, causal, mode)
        record = {
            "dtype": dtype_name,
            "head_dim": head_dim,
            "causal": causal,
            "seq_len": seq_len,
            "mode": mode,
            "batch": batch,
            "heads": heads,
            "tflop": flops / 1e12,
            "peers": {},
        }
        for name, peer in peers.items():
            reason = eager_skip_reason(batch, heads, seq_len, mode) if name == "eager" else None
            if reason:
                record["peers"][name] = {"skipped": reason}
                continue
            try:
                result = measure(peer, q, k, v, dout, causal, mode)
                result["tflops"] = flops / (result["ms"] * 1e-3) / 1e12
            except Exception as exc:  # one failing peer must not end the run
                result = {"error": error_string(exc)}
            record["peers"][name] = result
            torch.cuda.empty_cache()
        if "ours" in peers:
            try:
                record["check"] = spot_check(peers["ours"].attn, q, k, v, dout, causal, mode)
            except Exception as exc:
                record["check"] = {"error": error_string(exc)}
        ours = record["peers"].get("ours", {}).get("tflops")
        record["ratios"] = {
            name: ours / r["tflops"]
            for name, r in record["peers"].items()
            if ours and name != "ours" and r.get("tflops")
        }
        records.append(record)
    return records


# ---------------------------------------------------------------------------- report
def _cell(result: dict | None, ratio: float | None, key: str) -> str:
    if result is None:
        return "-"
    if "skipped" in result:
        return "skip"
    if "error" in result:
        return "err"
    text = f"{result[key]:.1f}" if key == "tflops" else f"{result[key]:.2f}"
    return text + (f" ({ratio:.2f}x)" if ratio is not None else "")


def format_table(records: list[dict]) -> str:
    """TFLOP/s per peer (ours / peer in brackets), then peak GiB; errors listed once each."""
    records = sorted(
        records,
        key=lambda r: (
            r["dtype"],
            r["head_dim"],
            r["causal"],
            MODES.index(r["mode"]),
            r["seq_len"],
        ),
    )
    peers = [p for p in PEERS if any(p in r["peers"] for r in records)]
    head = ["dtype", "D", "causal", "mode", "N"]
    lines = []
    for title, key in (("TFLOP/s (ours / peer)", "tflops"), ("peak GiB", "peak_gib")):
        rows = [head + peers]
        for r in records:
            ratios = r.get("ratios", {}) if key == "tflops" else {}
            rows.append(
                [
                    r["dtype"],
                    str(r["head_dim"]),
                    "yes" if r["causal"] else "no",
                    r["mode"],
                    str(r["seq_len"]),
                ]
                + [_cell(r["peers"].get(p), ratios.get(p), key) for p in peers]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(head) + len(peers))]
        lines.append(f"\n{title}")
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    checks = [r["check"] for r in records if "check" in r and "error" not in r["check"]]
    if checks:
        worst = max(max(v for k, v in c.items() if k.startswith("max_abs")) for c in checks)
        lines.append(f"\nmax |ours - sdpa| over all shapes: {worst:.3g}")
    seen = set()
    for r in records:
        for p, res in list(r["peers"].items()) + [("check", r.get("check", {}))]:
            if "error" in res and (p, res["error"]) not in seen:
                seen.add((p, res["error"]))
                lines.append(f"error {p} (first at {record_key(r)}): {res['error']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--dtypes", nargs="+", choices=list(DTYPES), default=None, help="default: bf16 fp16"
    )
    p.add_argument("--head-dims", nargs="+", type=int, default=None, help="default: 64 128")
    p.add_argument("--seqs", nargs="+", type=int, default=None, help="default: 1024 4096 16384")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path; default benchmarks/results/kernels_<device>_<date>.json",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the results already in --out and measure only the missing ones",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=480,
        help="seconds; no new shape starts after this (default 480)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: bf16, D=64, N=1024 and 4096 (unless given explicitly)",
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--report",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="measure nothing (no GPU needed): merge these result files, print the table,\n"
        "plot next to the first file, and write the merged JSON to --out if given",
    )
    args = p.parse_args(argv)
    args.dtypes = args.dtypes or (["bf16"] if args.quick else ["bf16", "fp16"])
    args.head_dims = args.head_dims or ([64] if args.quick else [64, 128])
    args.seqs = args.seqs or ([1024, 4096] if args.quick else [1024, 4096, 16384])
    for s in args.seqs:
        if TOKENS % s:
            p.error(f"seq len {s} does not divide {TOKENS} tokens")
    for d in args.head_dims:
        if MODEL_DIM % d:
            p.error(f"head_dim {d} does not divide {MODEL_DIM}")
    return args


def merge(datas: list[dict]) -> dict:
    """Runs concatenated; a shape measured twice keeps the later file's record."""
    runs, results = [], {}
    for data in datas:
        runs += data["runs"]
        results.update((record_key(r), r) for r in data["results"])
    results = list(results.values())
    return {
        "kind": "kernels",
        "environment": runs[-1]["environment"] if runs else None,  # the latest run's
        "runs": runs,
        "results": results,
        "ratios_vs_sdpa": ratios(results),
    }


def ratios(results: list[dict]) -> dict:
    """{"kernel/<dtype>/d<D>/<causal|full>/n<N>/<mode>": sdpa_ms / our_ms}, sdpa = default
    dispatch (> 1: we are faster)."""
    out = {}
    for r in results:
        ours, sdpa_ = r["peers"].get("ours", {}), r["peers"].get("sdpa", {})
        if ours.get("ms") and sdpa_.get("ms"):
            kind = "causal" if r["causal"] else "full"
            key = f"kernel/{r['dtype']}/d{r['head_dim']}/{kind}/n{r['seq_len']}/{r['mode']}"
            out[key] = sdpa_["ms"] / ours["ms"]
    return out


def run(args, out: Path, start: float) -> tuple[dict, bool]:
    """Measure what ``args`` selects and ``out`` lacks; rewrite ``out`` after every shape.
    Returns the data and whether the time budget stopped it."""
    data = merge([load_json(out)]) if args.resume and out.exists() else merge([])
    done = {record_key(r) for r in data["results"]}
    info = {
        "environment": environment(),
        "args": jsonable(vars(args)),
        "ceilings": measure_ceilings(),
    }
    data["runs"].append(info)
    data["environment"] = info["environment"]
    c = info["ceilings"]
    print(
        f"{info['environment']['device']}: bf16 matmul {c['matmul_bf16_8192_tflops']:.0f} "
        f"TFLOP/s, copy {c['copy_1gib_tbps']:.2f} TB/s",
        flush=True,
    )
    write_json(out, data)
    peers = {name: make_peer(name) for name in args.peers}
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    for dtype_name, head_dim, causal, seq_len in itertools.product(
        args.dtypes, args.head_dims, causals, args.seqs
    ):
        todo = [m for m in args.modes if (dtype_name, head_dim, causal, seq_len, m) not in done]
        if not todo:
            continue
        if time.monotonic() - start > args.time_budget:
            return data, True
        t = time.monotonic()
        records = bench_shape(peers, dtype_name, head_dim, causal, seq_len, todo)
        data["results"] += records
        data["ratios_vs_sdpa"] = ratios(data["results"])
        write_json(out, data)
        summary = ", ".join(
            f"{r['mode']} ours {r['peers'].get('ours', {}).get('tflops', 0):.0f}"
            + (" !!! NaN !!!" if r.get("check", {}).get("nan") else "")
            for r in records
        )
        print(
            f"[{time.monotonic() - start:4.0f}s] {dtype_name} D={head_dim} causal={causal} "
            f"N={seq_len}: {summary} TFLOP/s ({time.monotonic() - t:.0f}s)",
            flush=True,
        )
    return data, False


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    stopped = False
    if args.report:
        data = merge([load_json(p) for p in args.report])
        out = args.out
        if out:
            write_json(out, data)
    elif not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU (or --report)", file=sys.stderr)
        return 2
    else:
        out = args.out or default_out("kernels-quick" if args.quick else "kernels")
        data, stopped = run(args, out, start)

    print(format_table(data["results"]))
    if out:
        print(f"\nwrote {out}")
    if not args.no_plot and data["results"]:
        from plot import plot_files

        try:
            print(f"wrote {plot_files([out] if out else args.report)}")
        except Exception as exc:  # the JSON is written; a chart can be redrawn with plot.py
            print(f"plot failed: {error_string(exc)}", file=sys.stderr)
    if stopped:
        print(
            f"\nstopped at the {args.time_budget:.0f}s budget: rerun with --resume --out {out} "
            "(that file in place) to measure the rest"
        )
    if any(r.get("check", {}).get("nan") for r in data["results"]):
        print(
            "\n!!! NaN in hf_flashattn outputs or gradients: see 'check' in the JSON !!!",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
