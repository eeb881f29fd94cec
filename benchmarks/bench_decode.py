"""Decode level: one decoding step's attention (few queries against a long K/V cache) as
transformers calls it, ours against its ``sdpa_attention_forward`` (default dispatch), with the
bandwidth limit: K and V bytes read over the measured copy bandwidth. Needs a GPU.

    python benchmarks/bench_decode.py
    python benchmarks/bench_decode.py --quick --out decode.json

Shapes: batch {1, 16, 64} x keys {4k, 32k, 128k} x queries {1, 4, 16} x GQA {1, 4, 8} (32
query heads, D 128, bf16, every query seeing every key), fewer with --quick; a shape whose
cache passes --max-gib is left out. The JSON carries "environment", per shape ms for ours and
sdpa as bench_call.py measures a call ("ms" by do_bench: host-bound at small shapes;
"kernel_ms", the GPU time of the kernels the call launches; "host_us_busy", the host time of
a call), "limit_ms", and "ratios_vs_sdpa": {"decode/<case>/fwd": sdpa_ms / our_ms, and
"decode/<case>/fwd/kernel", "decode/<case>/fwd/host" the same of kernel_ms and host_us_busy}.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_call as b
import torch
from common import (
    default_out,
    environment,
    error_string,
    jsonable,
    measure_ceilings,
    write_json,
)

HEADS_Q, HEAD_DIM = 32, 128


def shapes(quick: bool):
    batches, keys, queries, groups = (1, 16, 64), (4096, 32768, 131072), (1, 4, 16), (1, 4, 8)
    if quick:
        batches, keys, queries, groups = (1, 16), (4096, 32768), (1,), (4, 8)
    for batch, seq_k, seq_q, group in itertools.product(batches, keys, queries, groups):
        yield f"b{batch}/k{seq_k}/q{seq_q}/g{group}", batch, seq_k, seq_q, group


def bench_shape(batch, seq_k, seq_q, group, impls, copy_tbps) -> dict:
    dtype = torch.bfloat16
    heads_kv = HEADS_Q // group
    q = torch.randn(batch, seq_q, HEADS_Q, HEAD_DIM, device="cuda", dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(batch, heads_kv, seq_k, HEAD_DIM, device="cuda", dtype=dtype) for _ in "kv")
    layer = b.Layer(batch, HEADS_Q, heads_kv, seq_k, HEAD_DIM)
    module = b.AttentionModule(layer).eval()
    # Every query sees every key: with no mask, sdpa's is_causal would align the diagonal to
    # the top left (query i sees keys <= i, almost nothing here), transformers' generate passes
    # a mask instead; the causal band over the last few keys is negligible at these lengths.
    module.is_causal = False
    kw = dict(attention_mask=None, scaling=HEAD_DIM**-0.5, dropout=0.0)
    result = {"impls": {}}
    with torch.no_grad():
        for name, attn in impls.items():
            try:
                # ms, host times and kernel_ms, as bench_call.py measures a call
                result["impls"][name] = b.measure(partial(attn, module, q, k, v, **kw))
            except Exception as exc:
                result["impls"][name] = {"error": error_string(exc)}
    result["limit_ms"] = 2 * k.numel() * k.element_size() / (copy_tbps * 1e12) * 1e3
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch {1,16} x keys {4k,32k}, 1 query")
    p.add_argument("--max-gib", type=float, default=24.0, help="largest K+V cache to allocate")
    p.add_argument("--out", type=Path, default=None, help="JSON path; default benchmarks/results/")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU", file=sys.stderr)
        return 2
    out = args.out or default_out("decode")
    copy_tbps = measure_ceilings()["copy_1gib_tbps"]  # read + write, the protocol's ceiling
    impls = b.implementations()
    data = {"kind": "decode", "environment": environment(), "copy_tbps": copy_tbps}
    data["results"], data["ratios_vs_sdpa"] = {}, {}
    for case, batch, seq_k, seq_q, group in shapes(args.quick):
        cache_gib = 2 * batch * (HEADS_Q // group) * seq_k * HEAD_DIM * 2 / 2**30
        if cache_gib > args.max_gib:
            continue
        r = data["results"][case] = bench_shape(batch, seq_k, seq_q, group, impls, copy_tbps)
        ours, sdpa = r["impls"]["ours"], r["impls"]["sdpa"]
        nan = float("nan")
        for mode, key in (("fwd", "ms"), ("fwd/kernel", "kernel_ms"), ("fwd/host", "host_us_busy")):
            if ours.get(key) and sdpa.get(key):
                data["ratios_vs_sdpa"][f"decode/{case}/{mode}"] = sdpa[key] / ours[key]
        times = "  ".join(
            f"{name} {t.get('ms', nan):7.3f} ms (kernels {t.get('kernel_ms', nan):7.3f},"
            f" host {t.get('host_us_busy', nan):5.0f} us)"
            for name, t in (("ours", ours), ("sdpa", sdpa))
        )
        print(f"{case:24s} {times}  limit {r['limit_ms']:7.3f} ms", flush=True)
        write_json(out, jsonable(data))
        torch.cuda.empty_cache()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
