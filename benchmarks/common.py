"""Shared by the benchmark scripts: run metadata, timing and memory probes, the two hardware
ceilings, and JSON files written so that a killed run keeps what it measured.

The protocol they follow is BENCHMARKS.md (shapes, peers, FLOP count, timing, ceilings).
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

GIB = 2**30
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# The scripts run as files (``python benchmarks/bench_kernels.py``) on machines where the
# package may not be installed: make this checkout's hf_flashattn importable.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------- metadata
def _git_commit() -> str:
    # A copy of the tree (the GPU machine's) may carry a stale .git: the caller's word wins.
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is None or out.returncode != 0:
        # A copy of the tree without .git: let the caller say which commit it is.
        return os.environ.get("GIT_COMMIT", "unknown")
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # a missing optional package is recorded as None, not fatal
        return None


def environment() -> dict:
    """Device, library versions, date and git commit of this run."""
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": "cpu",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / GIB, 2),
        )
    return env


def device_slug() -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3', for file names."""
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug.removeprefix("nvidia-")


def default_out(kind: str) -> Path:
    return RESULTS / f"{kind}_{device_slug()}_{datetime.date.today().isoformat()}.json"


def error_string(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 400 else text[:400] + " ..."


# ---------------------------------------------------------------------------- files
def write_json(path: Path, data: dict) -> None:
    """Write atomically: a run killed mid-write leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=True) + "\n")
    tmp.replace(path)


def jsonable(obj):
    """``obj`` with what JSON cannot hold (paths, tuples) turned into strings and lists."""
    return json.loads(json.dumps(obj, default=str))


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------- probes
def bench_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` by ``triton.testing.do_bench`` (L2 flushed between runs)."""
    from triton.testing import do_bench

    if "return_mode" in inspect.signature(do_bench).parameters:
        ms = do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    else:  # older triton: only quantiles
        ms = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])
    return float(ms[0] if isinstance(ms, (list, tuple)) else ms)


def kernel_ms(fn: Callable[[], object], calls: int = 20) -> float:
    """GPU milliseconds of the kernels one call of ``fn`` launches (torch.profiler's device
    time), without the host: where a call is host-bound, ``bench_ms`` times the host instead.
    The L2 is flushed before each call as ``bench_ms`` does; the flushes' own device time,
    profiled alone, is taken off."""
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def device_us(run_fn: bool) -> float:
        fn()  # compiled and cached before profiling
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                flush.zero_()
                if run_fn:
                    fn()
            torch.cuda.synchronize()
        return sum(e.self_device_time_total for e in prof.key_averages())

    return (device_us(True) - device_us(False)) / calls / 1e3


def busy_host_us(fn: Callable[[], object], calls: int = 20, repeats: int = 5) -> float:
    """Host microseconds per call of ``fn`` with the GPU held busy: a ``torch.cuda._sleep``
    queued first keeps every launch from waiting on the GPU or a full queue, so the wall time
    of ``calls`` calls is the host's alone (the mean over 200 unsynchronised calls becomes the
    GPU's time once the queue fills). Best of ``repeats``. The sleep is lengthened until it
    outlasts the calls; a call that synchronises would wait for it, so that raises instead of
    reporting the sleep as host time."""
    cycles = 2**26  # ~35 ms at H200 clocks
    done = torch.cuda.Event()
    best = float("inf")
    for _ in range(repeats):
        while True:
            torch.cuda.synchronize()
            torch.cuda._sleep(cycles)
            done.record()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            elapsed = time.perf_counter() - start
            outlasted = not done.query()  # the GPU was still asleep: no call waited on it
            torch.cuda.synchronize()
            if outlasted:
                break
            if cycles >= 2**31:  # ~1 s
                raise RuntimeError("busy_host_us: the calls waited for the GPU (a host sync?)")
            cycles *= 2
        best = min(best, elapsed / calls * 1e6)
    return best


def peak_gib(fn: Callable[[], object]) -> float:
    """Peak allocated GiB over one call of ``fn``, counting what was live before it (inputs)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


def free_bytes() -> int:
    """Bytes a new allocation can get: free on the device plus what torch caches unused."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def raise_recompile_limit(limit: int = 4096) -> None:
    """Every (shape, dtype, mask, grad mode) of a compiled flex_attention is a recompile; past
    dynamo's limit (8 by default) it silently runs the slow unfused path."""
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


def measure_ceilings() -> dict:
    """The two ceilings of the protocol: a bf16 8192^3 matmul and a 1 GiB device copy."""
    n = 8192
    a, b, c = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    matmul_ms = bench_ms(partial(torch.mm, a, b, out=c))
    src = torch.randint(0, 256, (GIB,), device="cuda", dtype=torch.uint8)
    copy_ms = bench_ms(partial(torch.empty_like(src).copy_, src))
    del a, b, c, src
    torch.cuda.empty_cache()
    return {
        "matmul_bf16_8192_tflops": 2 * n**3 / (matmul_ms * 1e-3) / 1e12,
        "matmul_ms": matmul_ms,
        # bytes read + bytes written
        "copy_1gib_tbps": 2 * GIB / (copy_ms * 1e-3) / 1e12,
        "copy_ms": copy_ms,
    }
