"""Block configs per kernel at the attention calls models make: for each layer of bench_call.py
and each kernel (fwd, dq, dkdv), forward + backward time with each candidate config forced on
that kernel (the others keep the tables'), ranked by the call's kernel time (``kernel_ms``,
torch.profiler, L2 flushed); ``do_bench``'s time is reported beside it. Needs a GPU.

    python benchmarks/sweep_configs.py                       # llama_0.5b and gpt2
    python benchmarks/sweep_configs.py --layers gpt2 --out sweep.json
    python benchmarks/sweep_configs.py --layers --extra 4,16,16,2048,256   # head_dim 256
    python benchmarks/sweep_configs.py --layers --extra 8,12,12,4096,64 --kernels fwd

Why kernel time: at GPT-2's layer the call is host-bound under ``do_bench`` (0.62 ms against
0.35 of kernels with dropout, H200), so its time moved by +-30% between configs whose kernels
differ by 5%: earlier tables picked at such layers by ``do_bench`` picked host noise.

The kernels' own table entry is always measured and marked with ``*``; a candidate that does
not fit in shared memory, or fails, is reported as such and skipped. Pick table entries from
the JSON, then confirm with bench_call.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_call as b
import torch
from common import bench_ms, environment, error_string, jsonable, kernel_ms, write_json

from hf_flashattn.kernels import configs
from hf_flashattn.kernels.configs import KernelConfig
from hf_flashattn.op import forced_configs

C = KernelConfig
# (block_m, block_n, warps, stages); dK/dV: block_n is the resident key block. The last ones of
# each list are for head_dim 256: there the tables' entries spill kilobytes a thread
# (tools/register_report.py) and these do not, or least; at smaller head dims they run too.
CANDIDATES = {
    "fwd": [C(128, 64, 8, 3), C(128, 128, 8, 2), C(128, 64, 4, 3), C(64, 64, 4, 3),
            C(128, 32, 4, 3), C(128, 128, 8, 3), C(64, 128, 4, 2),
            C(128, 32, 8, 2), C(64, 64, 8, 2), C(128, 64, 8, 2)],
    "dq": [C(128, 64, 8, 3), C(128, 128, 8, 2), C(64, 64, 4, 3), C(128, 32, 4, 3),
           C(64, 128, 8, 2), C(128, 64, 8, 2), C(64, 64, 4, 2),
           C(64, 32, 8, 2), C(64, 64, 8, 2)],
    # (16|32, 128, 8, 2) spill least at head_dim 64 and 128; one stage none (registers fall
    # from 255 to 160-220 without the pipelined loads, at the cost of exposed latency)
    "dkdv": [C(64, 128, 8, 2), C(32, 128, 4, 3), C(32, 128, 8, 3), C(64, 128, 8, 3),
             C(64, 64, 4, 3), C(128, 128, 8, 2), C(64, 128, 4, 2), C(32, 64, 4, 3),
             C(16, 128, 8, 2), C(32, 128, 8, 2), C(32, 128, 8, 1),
             C(16, 64, 8, 2), C(64, 64, 8, 1), C(32, 64, 4, 2), C(16, 64, 4, 3), C(32, 64, 8, 3),
             # dV and dK in two launches (one accumulator each): for head_dim 256's spills
             C(64, 64, 8, 1, split_grads=True), C(64, 128, 8, 1, split_grads=True),
             C(32, 128, 8, 2, split_grads=True), C(64, 64, 8, 2, split_grads=True)],
}  # fmt: skip
# each kernel's table entry for a layer (the dK/dV pass's depends on its keys)
TABLE = {
    "fwd": lambda layer: configs.fwd_config(layer.head_dim, False),
    "dq": lambda layer: configs.bwd_dq_config(layer.head_dim, False),
    "dkdv": lambda layer: configs.bwd_dkdv_config(layer.head_dim, False, layer.seq_len),
}


def parse_config(spec: str) -> KernelConfig:
    """block_m,block_n,warps,stages[,split] (split: the dK/dV pass's two launches)."""
    fields = spec.split(",")
    return C(*(int(x) for x in fields[:4]), split_grads=fields[4:] == ["split"])


def sweep_layer(name: str, layer: b.Layer, kernels, configs_given=None) -> list[dict]:
    impls = b.implementations()
    module = b.AttentionModule(layer)
    q, k, v, dout = b.make_inputs(layer)
    mask = b.layer_masks(layer)["ours"]
    fn = b.step(impls["ours"], module, layer, q, k, v, dout, "fwd+bwd", mask)
    rows = []
    for kernel in kernels:
        candidates = configs_given or CANDIDATES[kernel]
        table = TABLE[kernel](layer)
        for cfg in [table] + [c for c in candidates if c != table]:
            row = {"layer": name, "kernel": kernel, "config": cfg.__dict__, "table": cfg == table}
            try:
                with forced_configs(**{kernel: cfg}):
                    fn()
                    row["kernel_ms"] = kernel_ms(fn)
                    row["ms"] = bench_ms(fn)
            except Exception as exc:  # out of shared memory, compile failures
                row["error"] = error_string(exc)
            rows.append(row)
            mark = "*" if row["table"] else " "
            result = (
                f"kernels {row['kernel_ms']:.3f} ms (do_bench {row['ms']:.3f})"
                if "ms" in row
                else row["error"][:80]
            )
            print(f"{name:12s} {kernel:5s} {mark} {cfg}  {result}", flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", nargs="*", default=["llama_0.5b", "gpt2"], choices=list(b.LAYERS))
    p.add_argument("--extra", nargs="*", default=[], help="batch,heads_q,heads_kv,seq,dim")
    p.add_argument("--kernels", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument(
        "--configs",
        nargs="*",
        type=parse_config,
        default=None,
        help="candidates instead of the lists: block_m,block_n,warps,stages[,split]",
    )
    p.add_argument("--dtype", default="bf16", choices=list(b.DTYPES), help="of every layer")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: none)")
    args = p.parse_args(argv)
    layers = {name: b.LAYERS[name] for name in args.layers}
    layers.update(b.parse_layer(spec) for spec in args.extra)
    layers = {
        f"{name}/{args.dtype}": dataclasses.replace(layer, dtype=args.dtype)
        for name, layer in layers.items()
    }
    rows = []
    for name, layer in layers.items():
        rows += sweep_layer(name, layer, args.kernels, args.configs)
        torch.cuda.empty_cache()
    if args.out:
        write_json(args.out, jsonable({"environment": environment(), "results": rows}))


if __name__ == "__main__":
    main()
