"""Where the host time of one attention call goes: the GPT-2 layer of bench_call.py, host µs per
call (20 calls after a sync, best of 5) for ours and sdpa, split into the layers of our path,
then a cProfile of ours by tottime. Needs a GPU.

    python benchmarks/profile_call.py

Layers, each timed on its own: the forward launch function (two allocations and one kernel
launch) with the compiled kernel's own launcher and through ``kernel[grid]``; ``flash_attn``
without autograd; ``flash_attn`` recording autograd; the transformers hook (``attention_forward``);
forward + backward.
"""

import cProfile
import io
import pstats
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_call as b
import torch

from hf_flashattn import flash_attn, launch, op

CALLS = 20


def host_us(fn) -> float:
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        best = min(best, (time.perf_counter() - start) / CALLS * 1e6)
        torch.cuda.synchronize()
    return best


def without_direct_launch(fn):
    """``fn`` with every launch through ``kernel[grid]`` (launch.py's fallback)."""

    def run():
        launch._direct_launch["enabled"] = False
        try:
            return fn()
        finally:
            launch._direct_launch["enabled"] = True

    return run


def main() -> None:
    layer = b.LAYERS["gpt2"]
    impls = b.implementations()
    module = b.AttentionModule(layer)
    q, k, v, dout = b.make_inputs(layer)
    qd, kd, vd = (t.detach() for t in (q, k, v))
    scale = layer.head_dim**-0.5
    forward = partial(op._forward, qd, kd, vd, None, None, True, scale, 0.0, None, 0, 0.0)
    parts = {
        "_forward, direct launch": forward,
        "_forward, kernel[grid]": without_direct_launch(forward),
        "flash_attn, no grad": lambda: flash_attn(qd, kd, vd, causal=True, scale=scale),
        "flash_attn, grad": lambda: flash_attn(q, k, v, causal=True, scale=scale),
    }
    for name, impl in impls.items():
        parts[f"{name} hook fwd"] = b.step(impl, module, layer, q, k, v, dout, "fwd")
        parts[f"{name} hook fwd+bwd"] = b.step(impl, module, layer, q, k, v, dout, "fwd+bwd")
    for name, fn in parts.items():
        fn()  # compile outside the timings
        print(f"{name:24s} {host_us(fn):8.1f} us/call")

    pr = cProfile.Profile()
    fn = parts["ours hook fwd+bwd"]
    pr.enable()
    for _ in range(CALLS):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue())


if __name__ == "__main__":
    main()
