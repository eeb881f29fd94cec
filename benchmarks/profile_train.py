"""Where the GPU time of one train step goes: per kernel, ms per step (forward, backward,
AdamW), for each impl on bench_models.py's models. Needs a GPU.

    python benchmarks/profile_train.py                                   # llama_padded, llama
    python benchmarks/profile_train.py --models gpt2 --impls sdpa triton_attention --top 40

Read the padded model against the unpadded one: with right-padded rows of uneven lengths our
attention skips the padded blocks, so the kernels' time should fall with the real lengths.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_models as bm
import torch
from profile_kernels import kernel_times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models", nargs="+", choices=list(bm.MODELS), default=["llama_padded", "llama"]
    )
    p.add_argument("--impls", nargs="+", choices=bm.IMPLS, default=["sdpa", bm.OURS])
    p.add_argument("--top", type=int, default=25, help="kernels listed per run, by GPU time")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_train needs a CUDA GPU", file=sys.stderr)
        return 2
    for name in args.models:
        for impl in args.impls:
            model = bm.build(name, impl).train()
            inputs = bm.train_inputs(bm.MODELS[name], model.config.vocab_size)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            times = kernel_times(partial(bm.train_step, model, inputs, optimizer))
            print(f"{name} {impl}: {sum(times.values()) / 1e3:.1f} ms of kernels per step")
            for kernel, us in list(times.items())[: args.top]:
                print(f"    {us / 1e3:8.3f}  {kernel}")
            del model, optimizer, inputs
            bm.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
