"""Where the GPU time of one attention call goes: per kernel, µs per forward + backward, for ours
and sdpa, on bench_call.py's layers (and any extra ones given as batch,heads_q,heads_kv,seq,dim).
Needs a GPU.

    python benchmarks/profile_kernels.py                          # the four layers
    python benchmarks/profile_kernels.py --layers llama_0.5b --extra 4,12,12,2048,128

The extra layer above is LLaMA's without GQA: same query heads, K/V not shared, which shows
what sharing K/V across a group costs the dK/dV pass.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_call as b
import torch
from torch.profiler import ProfilerActivity, profile

CALLS = 10


def kernel_times(fn) -> dict[str, float]:
    """µs per call of each GPU kernel ``fn`` runs (the profiler's device time, summed by name)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    times = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name[:60]] += event.device_time / CALLS
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", nargs="*", default=list(b.LAYERS), choices=list(b.LAYERS))
    p.add_argument("--extra", nargs="*", default=[], help="batch,heads_q,heads_kv,seq,dim")
    args = p.parse_args(argv)
    layers = {name: b.LAYERS[name] for name in args.layers}
    layers.update(b.parse_layer(spec) for spec in args.extra)
    impls = b.implementations()
    for name, layer in layers.items():
        module = b.AttentionModule(layer)
        q, k, v, dout = b.make_inputs(layer)
        masks = b.layer_masks(layer)
        for impl_name, attn in impls.items():
            fn = b.step(attn, module, layer, q, k, v, dout, "fwd+bwd", masks[impl_name])
            times = kernel_times(fn)
            total = sum(times.values())
            print(f"{name} {impl_name}: {total:.1f} us per fwd+bwd")
            for kernel, us in times.items():
                print(f"    {us:9.1f}  {kernel}")
        del q, k, v, dout
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
