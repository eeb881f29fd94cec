"""Compile the kernels for a GPU target on any machine, no GPU needed.

Triton's front end and its NVIDIA back end (ptxas ships in the wheel) run on the CPU, so every
specialisation the GPU would build can be compiled here with the GPU's own Triton version
before device time is spent: Triton 3.6 (the GPU's) rejects code that the interpreter and
Triton 3.9 (CI's) accept, e.g. two differently shaped ``return``s in a constexpr branch.

    make compile-check                          # a venv with the GPU's Triton, then this
    python tools/compile_check.py --arch 90     # with whichever Triton is installed

Only Triton is imported: the kernel modules are loaded from their files (hf_flashattn's own
``__init__`` imports torch and transformers). Each kernel is compiled with the GPU tables'
block configs, once with every optional feature off, once with all on, and once per feature
alone, in float16 at head_dim 64, bfloat16 at 128 and float32 at 256 (where the tables differ),
as a launch on the GPU specialises it (``as_launched``: pointers and strides divisible by 16).
Without that Triton cannot vectorise the loads, so it neither pipelines them nor asks for
the shared memory the GPU's binary needs (the D128 forward: 32 KB against 112 KB), and a
config the GPU has to step down would pass here.
Exit status 1 if any specialisation fails, with its error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parents[1] / "hf_flashattn" / "kernels"
# (dtype name, Triton element type, head_dim): one per head_dim bucket of the tables, and 96
# (the head dim in two chunks, configs.head_dim_chunks)
DTYPES = (
    ("float16", "fp16", 64),
    ("bfloat16", "bf16", 128),
    ("float32", "fp32", 256),
    ("bfloat16", "bf16", 96),
)


def _kernels():
    """The kernel modules, loaded from their files as package ``hfk``."""
    if "hfk" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "hfk", KERNELS_DIR / "__init__.py", submodule_search_locations=[str(KERNELS_DIR)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["hfk"] = module
        spec.loader.exec_module(module)
    return {name: importlib.import_module(f"hfk.{name}") for name in ("fwd", "bwd", "decode")}


def _signature(kernel, element: str, constexprs: dict) -> dict:
    """Each argument's Triton type, from its name (the kernels name them consistently)."""
    floats = {"qk_scale", "sm_scale", "dropout_p", "softcap"}
    pointers = {
        "KPM": "*i1",
        "Seg": "*i32",
        "Seed": "*i64",
        "Blocks": "*i64",
        "Mask": "*i8",
        "LSE": "*fp32",
        "DLSE": "*fp32",
        "Delta": "*fp32",
        "Parts": "*fp32",
    }
    data = {"Q", "K", "V", "Out", "DO", "DK", "DV", "DQ"}
    signature = {}
    for p in kernel.params:
        if p.name in constexprs:
            signature[p.name] = "constexpr"
        elif p.name in pointers:
            signature[p.name] = pointers[p.name]
        elif p.name in ("DK", "DV") and constexprs.get("GROUP_PARTS", 1) > 1:
            signature[p.name] = "*fp32"  # the group's parts write float32 sums
        elif p.name in data:
            signature[p.name] = f"*{element}"
        elif p.name in floats:
            signature[p.name] = "fp32"
        else:
            signature[p.name] = "i32"
    return signature


def as_launched(kernel, element: str, constexprs: dict) -> tuple[dict, dict, dict]:
    """The specialisation a launch on the GPU gives (Triton specialises every int and pointer
    argument): contiguous tensors' last-dimension strides (``stride_*d``) are the constant 1,
    the other strides of (batch, heads, seq, 64 or 128) tensors and every data pointer divisible
    by 16; lengths and head counts unspecialised (they vary)."""
    signature = _signature(kernel, element, constexprs)
    constexprs, attrs = dict(constexprs), {}
    for index, param in enumerate(kernel.params):
        name = param.name
        if name.startswith("stride_") and name.endswith("d") and not name.endswith("_b"):
            signature[name], constexprs[name] = "constexpr", 1
        elif signature[name].startswith("*") or (
            name.startswith("stride_") and name not in ("stride_kpm_b", "stride_seg_b")
        ):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


# the attention kernels: short name -> (kernel function, its GPU config table in configs.py)
ATTENTION_KERNELS = {
    "fwd": ("attn_fwd_kernel", "fwd_config"),
    "dq": ("attn_bwd_dq_kernel", "bwd_dq_config"),
    "dkdv": ("attn_bwd_dkdv_kernel", "bwd_dkdv_config"),
}


def kernel(name: str):
    """The jit function ``name`` from whichever kernel module defines it."""
    return next(getattr(m, name) for m in _kernels().values() if hasattr(m, name))


def config_table(short: str):
    """The GPU config table (a function of head_dim, interpreting) of an attention kernel."""
    _kernels()  # loads the package hfk
    return getattr(importlib.import_module("hfk.configs"), ATTENTION_KERNELS[short][1])


def launch_options(cfg) -> dict:
    """The compile options a launch with ``cfg`` passes (op's launchers: warps, stages and a
    register cap where the config has one)."""
    run = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.max_registers:
        run["maxnreg"] = cfg.max_registers
    return run


def common_constexprs(dtype: str, head_dim: int) -> dict:
    """What every kernel of one dtype and head_dim specialises on (``op._constexprs``, inputs
    kept in their dtype: no interpreter upcast)."""
    return dict(
        GROUP=4,
        HEAD_DIM=head_dim,
        BLOCK_D=importlib.import_module("hfk.configs").block_d(head_dim),
        UPCAST=False,
        DOT_PRECISION="ieee" if dtype == "float32" else "tf32",
    )


def attention_constexprs(dtype: str, head_dim: int, cfg) -> dict:
    """The constexprs an attention kernel's launch sets but its feature flags (``op._launcher``:
    the head dim in one or two chunks, the config's blocks)."""
    chunks = importlib.import_module("hfk.configs").head_dim_constexprs(head_dim)
    return dict(
        common_constexprs(dtype, head_dim), **chunks, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n
    )


# constexprs that are counts, not flags: (the launch's usual value, the others to compile)
COUNTS = {
    "GROUP_PARTS": (1, 2),  # the dK/dV pass's share of the GQA group (op._dkdv_parts)
    "GRADS": (3, 1, 2),  # the dK/dV pass's gradients: both, dV alone, dK alone (split_grads)
}


def count_constexprs(fn) -> dict:
    """The kernel's count constexprs at their usual values."""
    return {p.name: COUNTS[p.name][0] for p in fn.params if p.name in COUNTS}


def feature_flags(fn, constexprs: dict) -> list[str]:
    """The kernel's other constexprs: its feature flags (IS_CAUSAL, HAS_KPM, ...), read from
    the signature, so a new flag is compiled without editing this file."""
    return [
        p.name
        for p in fn.params
        if p.is_constexpr and p.name not in constexprs and p.name not in COUNTS
    ]


def table_configs(short: str, table, head_dim: int) -> list[tuple]:
    """(config, label suffix) of each table entry a kernel launches at ``head_dim``: the dK/dV
    pass has a short-sequence entry (``bwd_dkdv_config``'s ``seqlen_k``) where it differs."""
    cfgs = [(table(head_dim, False), "")]
    if short == "dkdv":
        short_keys = table(head_dim, False, 1)
        if short_keys != cfgs[0][0]:
            cfgs.append((short_keys, " short keys"))
    return cfgs


def specialisations() -> list[tuple]:
    """(kernel name, label, element type, constexprs, launch options) of every compile."""
    _kernels()  # loads the package hfk
    configs = importlib.import_module("hfk.configs")
    table = {short: config_table(short) for short in ATTENTION_KERNELS}
    names = {short: name for short, (name, _) in ATTENTION_KERNELS.items()}
    kernels = {short: kernel(name) for short, name in names.items()}
    out = []
    for dtype, element, head_dim in DTYPES:
        common = common_constexprs(dtype, head_dim)
        for short, name in names.items():
            for cfg, which in table_configs(short, table[short], head_dim):
                base = attention_constexprs(dtype, head_dim, cfg)
                counts = count_constexprs(kernels[short])
                base.update(counts)
                off = {flag: False for flag in feature_flags(kernels[short], base)}
                choices = [("none", off), ("all", {flag: True for flag in off})]
                choices += [(flag, dict(off, **{flag: True})) for flag in off]
                choices += [
                    (f"{c}={n}", dict(off, **{c: n})) for c in counts for n in COUNTS[c][1:]
                ]
                for label, chosen in choices:
                    run = launch_options(cfg)
                    label = f"{short}{which} {dtype} D{head_dim} {label}"
                    out.append((name, label, element, {**base, **chosen}, run))
        most = configs.max_decode_rows(head_dim)
        # (one_slice: the binary that writes the output itself where the keys are one slice;
        # deep: the deep-pipeline entry of few programs a slice, where it covers the head dim)
        covered = configs.deep_decode(head_dim, 16, 1, 1, 1)  # its other conditions met
        for rows, causal, kpm, aligned, one_slice, deep in (
            (16, False, False, True, True, False),
            (16, True, True, True, False, covered),
            (most, True, True, False, False, False),
        ):
            cfg = configs.decode_config(head_dim, rows, False, deep)
            decode = dict(
                common,
                BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n,
                IS_CAUSAL=causal,
                HAS_KPM=kpm,
                KV_ALIGNED=aligned,
                HAS_WINDOW=causal,  # a sliding window is causal
                HAS_SOFTCAP=causal,  # Gemma 2's decoding: causal, windowed and capped
                ONE_SLICE=one_slice,
            )
            run = launch_options(cfg)
            label = f"decode {dtype} D{head_dim} rows={rows} causal={causal} kpm={kpm}"
            label += f" aligned={aligned} one_slice={one_slice} deep={deep}"
            out.append(("attn_decode_split_kernel", label, element, decode, run))
        combine = dict(HEAD_DIM=head_dim, BLOCK_D=configs.block_d(head_dim), BLOCK_S=8)
        out.append(
            ("attn_decode_combine_kernel", f"combine {dtype} D{head_dim}", element, combine,
             dict(num_warps=4, num_stages=1))
        )  # fmt: skip
    out.append(
        ("dropout_mask_kernel", "dropout mask", "fp16", dict(BLOCK_M=16, BLOCK_N=128),
         dict(num_warps=4, num_stages=1))
    )  # fmt: skip
    return out


# Shared memory one block may use on Hopper (H100/H200: 227 KiB, opt-in): past it the launch
# raises OutOfResources (the launcher then retries smaller configs, slower).
MAX_SHARED = {90: 232448}


def compile_one(job: tuple, arch: int) -> tuple[str, float, str | None]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel_name, label, element, constexprs, run = job
    fn = kernel(kernel_name)
    start, base = time.perf_counter(), label
    while True:
        source = ASTSource(fn, *as_launched(fn, element, constexprs))
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=run)
        except Exception as exc:  # reported with its label; the other compiles go on
            return label, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"
        shared, limit = compiled.metadata.shared, MAX_SHARED.get(arch)
        if limit is None or shared <= limit:
            return label, time.perf_counter() - start, None
        # what the launcher does on the GPU (OutOfResources): the next config down, e.g. for
        # float32 inputs, whose tiles take twice the bytes the 16-bit tables are tuned for
        smaller = (
            _config(kernel_name, constexprs, run).smaller() if "BLOCK_N" in constexprs else None
        )
        if smaller is None:
            error = f"needs {shared} bytes of shared memory, sm_{arch} has {limit}"
            return label, time.perf_counter() - start, error
        constexprs = dict(constexprs, BLOCK_M=smaller.block_m, BLOCK_N=smaller.block_n)
        run = dict(run, num_warps=smaller.num_warps, num_stages=smaller.num_stages)
        step = f"{smaller.block_m}x{smaller.block_n}, {smaller.num_stages} stages"
        label = f"{base} (stepped down to {step})"


def _config(kernel_name: str, constexprs: dict, run: dict):
    configs = importlib.import_module("hfk.configs")
    return configs.KernelConfig(
        constexprs["BLOCK_M"], constexprs["BLOCK_N"], run["num_warps"], run["num_stages"],
        fixed_m=kernel_name == "attn_decode_split_kernel",  # its rows are the packed queries
    )  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability (90: Hopper)")
    parser.add_argument("--jobs", type=int, default=2, help="compiles at once")
    parser.add_argument("--only", default="", help="compile only labels containing this")
    args = parser.parse_args(argv)
    import triton

    _kernels()
    jobs = [job for job in specialisations() if args.only in job[1]]
    print(f"triton {triton.__version__}, sm_{args.arch}: {len(jobs)} specialisations")
    failures = 0
    with ProcessPoolExecutor(args.jobs) as pool:
        for label, seconds, error in pool.map(compile_one, jobs, [args.arch] * len(jobs)):
            print(f"{'FAIL' if error else 'ok  '} {label} ({seconds:.1f} s)", flush=True)
            if error:
                failures += 1
                print(error[-3000:], flush=True)
    print(f"{failures} of {len(jobs)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
