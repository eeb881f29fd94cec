"""Where the host time of one attention call goes: the GPT-2 layer of bench_call.py, host µs per
call (20 calls after a sync) for ours and sdpa, and a cProfile of ours by tottime. Needs a GPU.

    python benchmarks/profile_call.py
"""

import cProfile
import io
import pstats
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import bench_call as b
import torch

layer = b.LAYERS["gpt2"]
impls = b.implementations()
mod = b.AttentionModule(layer).cuda()
q, k, v, dout = b.make_inputs(layer)
for name in ("ours", "sdpa"):
    for mode in ("fwd", "fwd+bwd"):
        fn = b.step(impls[name], mod, layer, q, k, v, dout, mode)
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            fn()
        host = (time.perf_counter() - t) / 20 * 1e6
        torch.cuda.synchronize()
        print(f"{name} {mode}: host {host:.1f} us/call (20 calls after sync)")
        if name == "ours":
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(20):
                fn()
            pr.disable()
            torch.cuda.synchronize()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
            print(s.getvalue()[-6000:])
