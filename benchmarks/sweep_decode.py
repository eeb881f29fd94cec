"""Split-KV decoding configs: for each one-query decode shape of bench_decode.py, the kernel
time (``kernel_ms``: GPU time of the split and combine kernels, L2 flushed) with each candidate
key step / warps / stages forced, and each split target (programs per SM; "resident": the op's
own, as many as the binary keeps resident), against sdpa's kernels in the same run. Needs a
GPU.

    python benchmarks/sweep_decode.py --out sweep_decode.json
    python benchmarks/sweep_decode.py --shapes b1/k32768/g1 b16/k4096/g4
    python benchmarks/sweep_decode.py --configs 64x4w2s 128x8w3s --targets resident --queries 1 4

The table's entry at the op's own split target (op._target_programs) is marked ``*``.
Pick from the JSON, then confirm with bench_decode.py.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_call as b
import torch
from bench_decode import HEAD_DIM, HEADS_Q
from common import environment, error_string, jsonable, kernel_ms, write_json

from hf_flashattn import op
from hf_flashattn.kernels import configs
from hf_flashattn.kernels.configs import KernelConfig

C = KernelConfig
# (block_m is the packed rows, set per call), block_n the key step, warps, stages
CANDIDATES = [C(16, 64, 4, 2), C(16, 64, 4, 3), C(16, 64, 4, 4), C(16, 128, 4, 2),
              C(16, 128, 4, 3), C(16, 32, 4, 4), C(16, 64, 2, 3), C(16, 128, 8, 3)]  # fmt: skip
# register caps on the table's step: 96 lets an SM hold 5 programs of 4 warps where the
# uncapped binary's 128 registers allow 4 (more loads in flight for the same bytes; no spills
# at 16 rows, bf16 D128, ptxas for sm_90); 112 still 4, the cap's own cost
CANDIDATES += [C(16, 64, 4, 2, max_registers=96), C(16, 64, 4, 2, max_registers=112)]
# programs per SM the split count aims at, beside the op's own target (as many as the split
# kernel's binary keeps resident on an SM: op._target_programs)
PER_SM = (1, 2, 4, 8)
SHAPES = ["b1/k4096/g1", "b1/k32768/g1", "b1/k131072/g1", "b1/k32768/g4", "b1/k131072/g4",
          "b1/k131072/g8", "b16/k4096/g4", "b16/k4096/g8", "b16/k32768/g8", "b16/k131072/g8",
          "b64/k4096/g8", "b16/k32768/g1"]  # fmt: skip


def parse_shape(case: str) -> tuple[int, int, int]:
    batch, keys, group = (int(part[1:]) for part in case.split("/"))
    return batch, keys, group


def parse_config(label: str) -> KernelConfig:
    """``<key step>x<warps>w<stages>s[r<register cap>]``, as the sweep labels its candidates."""
    match = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(?:r(\d+))?", label)
    if match is None:
        raise ValueError(f"--configs: {label!r} is not <key step>x<warps>w<stages>s[r<cap>]")
    step, warps, stages, cap = match.groups()
    return C(16, int(step), int(warps), int(stages), max_registers=int(cap) if cap else None)


def sweep_shape(case: str, attn, sdpa, candidates, targets, seq_q: int = 1) -> dict:
    batch, seq_k, group = parse_shape(case)
    dtype = torch.bfloat16
    q = torch.randn(batch, seq_q, HEADS_Q, HEAD_DIM, device="cuda", dtype=dtype).transpose(1, 2)
    heads_kv = HEADS_Q // group
    k, v = (torch.randn(batch, heads_kv, seq_k, HEAD_DIM, device="cuda", dtype=dtype) for _ in "kv")
    module = b.AttentionModule(b.Layer(batch, HEADS_Q, heads_kv, seq_k, HEAD_DIM)).eval()
    module.is_causal = False  # one query sees every key (as bench_decode.py)
    kw = dict(attention_mask=None, scaling=HEAD_DIM**-0.5, dropout=0.0)
    sm_count = op._sm_count(q.device.index)
    rows = group * seq_q
    deep = op._deep_decode(q.device, HEAD_DIM, rows, seq_k, batch * heads_kv)  # the op's choice
    table = configs.decode_config(HEAD_DIM, rows, False, deep)
    out = {"sdpa_ms": kernel_ms(partial(sdpa, module, q, k, v, **kw)), "ours": {}}
    reference = sdpa(module, q, k, v, **kw)[0].float()
    target = op._target_programs
    for cfg in candidates:
        for per_sm in targets:  # None: the op's own target (the binary's residency)
            table_cfg = replace(cfg, block_m=table.block_m, fixed_m=table.fixed_m) == table
            mark = "*" if per_sm is None and table_cfg else ""
            cap = f"r{cfg.max_registers}" if cfg.max_registers else ""
            label = f"{cfg.block_n}x{cfg.num_warps}w{cfg.num_stages}s{cap}/"
            label += f"{per_sm or 'resident'}{mark}"
            if per_sm is not None:
                op._target_programs = lambda device, n, resident, per_sm=per_sm: per_sm * sm_count
            try:
                with op.forced_configs(decode=cfg):
                    fn = partial(attn, module, q, k, v, **kw)
                    err = (fn()[0].float() - reference).abs().max().item()
                    out["ours"][label] = {"ms": kernel_ms(fn), "max_err_vs_sdpa": err}
            except Exception as exc:
                out["ours"][label] = {"error": error_string(exc)}
            finally:
                op._target_programs = target
    return out


def table_ratios(results: dict) -> dict:
    """ratios_vs_sdpa of the table's entry (marked ``*``) per shape, at level ``decode``."""
    ratios = {}
    for case, r in results.items():
        for label, t in r["ours"].items():
            if label.endswith("*") and "ms" in t:
                ratios[f"decode/{case}/fwd/kernel"] = r["sdpa_ms"] / t["ms"]
    return ratios


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="b<batch>/k<keys>/g<group>")
    p.add_argument(
        "--configs",
        nargs="+",
        type=parse_config,
        default=CANDIDATES,
        help="candidates as labelled, e.g. 64x4w2s 128x8w3s 64x4w2sr96 (default: all)",
    )
    p.add_argument(
        "--targets",
        nargs="+",
        default=["resident", *PER_SM],
        help="programs per SM the split aims at: resident (the op's own) or a number",
    )
    p.add_argument("--queries", nargs="+", type=int, default=[1], help="queries per sequence")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: none)")
    args = p.parse_args(argv)
    targets = [None if t == "resident" else int(t) for t in args.targets]
    if not torch.cuda.is_available():
        print("sweep_decode needs a CUDA GPU", file=sys.stderr)
        return 2
    impls = b.implementations()
    data = {"kind": "sweep_decode", "environment": environment(), "results": {}}
    with torch.no_grad():
        for shape, seq_q in itertools.product(args.shapes, args.queries):
            batch, keys, group = shape.split("/")
            case = f"{batch}/{keys}/q{seq_q}/{group}"
            r = data["results"][case] = sweep_shape(
                shape, impls["ours"], impls["sdpa"], args.configs, targets, seq_q
            )
            timed = {k: t["ms"] for k, t in r["ours"].items() if "ms" in t}
            best = sorted(timed, key=timed.get)[:4]
            table = next((k for k in timed if k.endswith("*")), None)
            line = "  ".join(f"{k} {r['sdpa_ms'] / timed[k]:.3f}" for k in best)
            now = f"{r['sdpa_ms'] / timed[table]:.3f}" if table else "-"
            print(f"{case:16s} sdpa {r['sdpa_ms']:.4f} ms  table {now}  best: {line}", flush=True)
            data["ratios_vs_sdpa"] = table_ratios(data["results"])
            if args.out:
                write_json(args.out, jsonable(data))
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
