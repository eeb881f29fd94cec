"""Registers and spills of each kernel as ptxas builds it for a GPU, on any machine.

A kernel that spills keeps part of its tiles in local memory (an L1/L2 round trip inside the key
loop); ptxas says how much at compile time, so this needs no GPU. Each kernel is compiled with
the GPU tables' config (or ``--config``) and the specialisation a launch gets there (contiguous
last dimensions, strides and pointers divisible by 16: ``compile_check.as_launched``; without it
the counts are several times too high), and its resource use read from ``ptxas -v``, as Triton
runs it, with how many programs of it one SM holds (sm_90 and sm_80; op sizes the split-KV grid
by that).

    make register-report                                            # the GPU's Triton
    .venv-gpu-triton/bin/python tools/register_report.py --only dq  # labels containing "dq"
    .venv-gpu-triton/bin/python tools/register_report.py --only "dkdv bf16 D64" --config 32,128,8,2
    # the fifth number caps the registers (ptxas' maxnreg, KernelConfig.max_registers)
    .venv-gpu-triton/bin/python tools/register_report.py --only "fwd bf16" --config 128,64,8,2,96
    .venv-gpu-triton/bin/python tools/register_report.py --only "dkdv bf16 D128 plain" --group 1
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import compile_check

# per feature set: what training and decoding run (the flags not named are off)
FEATURES = {
    "plain": {},
    "causal": {"IS_CAUSAL": True},
    "causal+dropout": {"IS_CAUSAL": True, "HAS_DROPOUT": True},
    "causal+padding": {"IS_CAUSAL": True, "HAS_KPM": True, "PAD_Q": True},
    "causal+lengths": {"IS_CAUSAL": True, "HAS_KPM": True, "PAD_Q": True, "KEY_LENGTHS": True},
}
# flags every model's launch sets (models' softmax scales are positive)
ALWAYS_ON = {"SCALE_POSITIVE": True}
# (dtype, element type, head_dim): GPT-2's, Phi-3's (two chunks), LLaMA's and Gemma's
SHAPES = tuple(("bfloat16", "bf16", head_dim) for head_dim in (64, 96, 128, 256))
_INFO = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
# per SM: registers, shared memory bytes, threads (sm_90: H100 / H200; sm_80: A100)
SM_LIMITS = {90: (65536, 233472, 2048), 80: (65536, 167936, 2048)}


def _config_label(cfg) -> str:
    return f"{cfg.block_m}x{cfg.block_n}, {cfg.num_warps} warps, {cfg.num_stages} stages"


def jobs(only: str) -> list[tuple]:
    """(kernel name, label, element type, constexprs, launch options) per kernel x head_dim x
    feature set, the config from the GPU tables."""
    out = []
    for (short, (name, _)), (dtype, element, head_dim), (feature, chosen) in itertools.product(
        compile_check.ATTENTION_KERNELS.items(), SHAPES, FEATURES.items()
    ):
        kernel = compile_check.kernel(name)
        cfg = compile_check.config_table(short)(head_dim, False)
        constexprs = compile_check.attention_constexprs(dtype, head_dim, cfg)
        constexprs.update(compile_check.count_constexprs(kernel))
        flags = compile_check.feature_flags(kernel, constexprs)
        constexprs.update({flag: chosen.get(flag, ALWAYS_ON.get(flag, False)) for flag in flags})
        label = f"{short} {element} D{head_dim} {feature} ({_config_label(cfg)})"
        if only in label:
            run = compile_check.launch_options(cfg)
            out.append((name, label, element, constexprs, run))
    return out


def report_one(job: tuple, arch: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, label, element, constexprs, run = job
    kernel = compile_check.kernel(name)
    signature, constexprs, attrs = compile_check.as_launched(kernel, element, constexprs)
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs, attrs),
        target=GPUTarget("cuda", arch, 32),
        options=run,
    )
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        result = subprocess.run(
            [ptxas, "-v", f"-arch={target}", ptx, "-o", os.devnull],
            capture_output=True,
            text=True,
        )
    regs, spills = _REGS.search(result.stderr), _INFO.search(result.stderr)
    if not (regs and spills):
        return f"{label}: ptxas said {result.stderr[-500:]}"
    line = (
        f"{label}: {regs[1]} registers, spills {spills[2]} B stored / {spills[3]} B loaded, "
        f"shared {compiled.metadata.shared} B"
    )
    if arch in SM_LIMITS:  # what sizes the split-KV grid, and what two programs an SM need
        configs = importlib.import_module("hfk.configs")  # loaded by compile_check.kernel
        per_sm = configs.resident_programs(
            int(regs[1]), compiled.metadata.shared, run["num_warps"], *SM_LIMITS[arch]
        )
        line += f", {per_sm} an SM"
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="")
    parser.add_argument(
        "--config",
        default="",
        help="BLOCK_M,BLOCK_N,WARPS,STAGES[,MAX_REGISTERS]: compile every selected kernel with "
        "this config instead",
    )
    parser.add_argument(
        "--group",
        type=int,
        default=None,
        help="query heads per K/V head the kernels are compiled for (default: compile_check's 4); "
        "1 is MHA, where loops over the group may fold away",
    )
    args = parser.parse_args(argv)
    todo = jobs(args.only)
    if args.config:
        block_m, block_n, warps, stages, *cap = (int(x) for x in args.config.split(","))
        config = importlib.import_module("hfk.configs").KernelConfig  # loaded by jobs()
        forced = config(block_m, block_n, warps, stages, max_registers=cap[0] if cap else None)
        todo = [
            (name, label.split(" (")[0] + f" (forced {args.config})", element,
             dict(constexprs, BLOCK_M=block_m, BLOCK_N=block_n),
             compile_check.launch_options(forced))
            for name, label, element, constexprs, run in todo
        ]  # fmt: skip
    if args.group is not None:
        todo = [
            (name, f"{label} G{args.group}", element, dict(constexprs, GROUP=args.group), run)
            for name, label, element, constexprs, run in todo
        ]
    with ProcessPoolExecutor(args.jobs) as pool:
        for line in pool.map(report_one, todo, [args.arch] * len(todo)):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
