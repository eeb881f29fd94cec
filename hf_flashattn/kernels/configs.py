"""Block sizes, warps and pipeline stages for each kernel: the one table per kernel.

Compiled (GPU) configs are chosen per head_dim bucket for Hopper/Ampere-class parts. Under
Triton's interpreter each program costs ~15 ms of Python whatever its size, so large blocks
keep the CPU test suite fast there.
"""

from dataclasses import dataclass, replace

import triton


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # block_m holds every row the kernel must see at once (the decode kernel's packed query
    # rows): never smaller
    fixed_m: bool = False
    # the dK/dV pass only: dV and dK in two launches, one float32 accumulator each (bwd.py's
    # GRADS), where holding both spills
    split_grads: bool = False
    # registers per thread the compiler may use (ptxas' maxnreg), None: its own choice. A cap
    # decides how many programs an SM holds, which the split-KV grid is sized by
    max_registers: int | None = None

    def smaller(self) -> "KernelConfig | None":
        """The next config down in shared memory: fewer pipeline stages, then smaller blocks.
        The tables are tuned on an H100 (228 KB per SM); other parts, and fp32 inputs (twice
        the bytes), may need less. None when nothing smaller is left."""
        if self.num_stages > 1:
            return replace(self, num_stages=self.num_stages - 1)
        if self.block_n > 16:
            return replace(self, block_n=self.block_n // 2)
        if self.block_m > 16 and not self.fixed_m:
            return replace(self, block_m=self.block_m // 2)
        return None


def resident_programs(
    registers: int,
    shared: int,
    warps: int,
    regs_per_sm: int,
    shared_per_sm: int,
    threads_per_sm: int,
) -> int:
    """Programs of a binary (``registers`` per thread, ``shared`` bytes, ``warps``) that one SM
    holds at once: the least of what its registers (allocated per warp in 256s), shared memory
    (plus the 1 KB the runtime reserves per block) and threads allow; at least 1."""
    regs = -(-registers * 32 // 256) * 256 * warps
    return max(
        1,
        min(regs_per_sm // regs, shared_per_sm // (shared + 1024), threads_per_sm // (32 * warps)),
    )


def block_d(head_dim: int) -> int:
    # tl.dot needs every dimension >= 16 and tl.arange a power of two; extra lanes are masked
    return max(16, triton.next_power_of_2(head_dim))


def head_dim_chunks(head_dim: int) -> tuple[int, int]:
    """The head dim as the attention kernels tile it: (first chunk, second chunk, 0 for none).
    Dot shapes are powers of two, so head_dim 96 padded to 128 would pay a third more in every
    dot; as 64 + 32 it pays nothing (80: 64 + 16, 160: 128 + 32). Split only where that saves:
    112 stays 128 (64 + 64 is no less)."""
    padded = block_d(head_dim)
    first = max(16, 1 << (head_dim.bit_length() - 1))  # the largest power of two <= head_dim
    if head_dim <= first:
        return padded, 0
    second = block_d(head_dim - first)
    return (first, second) if first + second < padded else (padded, 0)


def head_dim_constexprs(head_dim: int) -> dict:
    """The attention kernels' head-dim constexprs: BLOCK_D (the first chunk), SPLIT_D and
    BLOCK_D1 (the second chunk; 16, unused, without one)."""
    first, second = head_dim_chunks(head_dim)
    return dict(BLOCK_D=first, BLOCK_D1=second or 16, SPLIT_D=second > 0)


# (max head_dim, config) in ascending head_dim; first match wins
# Each row's comment says what it was measured against, and where (benchmarks/NOTES.md).
_FWD_GPU = (
    # D<=128: 64 x 64, 4 warps, 3 stages. Kernel time (H200): at D=65-128 the causal forward
    # 5-15% under 128 x 64 at 8 warps (2026-12-03: LLaMA-0.5B (4, 12:4, 2048) 140 -> 131 us,
    # MHA (4, 16, 2048) 187 -> 177, Llama-3-8B-like (1, 32:8, 8192) 1192 -> 1121; right-padded
    # LLaMA 64 -> 56; (4, 32:8, 2048, 96) 364 -> 310, (4, 16:4, 2048, 80) 179 -> 154). At D<=64
    # against 128 x 64 at 4 warps (2026-12-03, twenty-fourth session): GPT-2's causal (8, 12,
    # 1024) 53.5 -> 48.1 us, causal (4, 16, 2048) and (2, 16, 8192) equal, non-causal (8, 12,
    # 4096) 0.6% (bf16) to 2% (fp16) slower
    (128, KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)),
    # D=256: 128 x 64, 8 warps, 2 stages: 5% off a (4, 16, 2048, 256) layer's forward +
    # backward against (64, 32, 4, 2) (same sweep); 3 stages within 0.2%, and 2 leave fp32 room
    (256, KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=2)),
)
# dK/dV: block_n is the resident K/V block (the M of every dot), block_m the Q step
_BWD_DKDV_GPU = (
    (64, KernelConfig(block_m=32, block_n=128, num_warps=4, num_stages=3)),
    # D=80/96 (64 + 16/32 in two chunks): 32-row query steps, 3 stages; 64 rows cost 7% at
    # (4, 32:8, 2048, 96) and 19% at (4, 16:4, 2048, 80) (sweep_configs.py, H200, 2026-12-02)
    (96, KernelConfig(block_m=32, block_n=128, num_warps=8, num_stages=3)),
    # D=128: 64-row query steps, 3 stages: the call's forward + backward kernel time 2-4% under
    # 32 rows in bf16 (LLaMA-0.5B 0.582 -> 0.572 ms, Llama-3-8B-like 5.04 -> 4.82, MHA
    # (4, 16, 2048) 0.787 -> 0.769; same sweep), 0-6% in fp16 (2026-12-03); none slower
    (128, KernelConfig(block_m=64, block_n=128, num_warps=8, num_stages=3)),
    # D=256: dV and dK in two launches (split_grads), 128-key blocks: the call's forward +
    # backward kernel time (8, 16, 2048, 256) 4.33 -> 3.61 ms, (2, 16:4, 8192, 256) 15.2 ->
    # 11.9 against both in one pass at (64, 64, 8, 1), which spills 688 B a thread where each
    # launch alone spills 80-160 (sweep_configs.py, H200, 2026-12-01). dK's launch does not fit
    # two stages and steps down to one (launch.py)
    (256, KernelConfig(block_m=64, block_n=128, num_warps=8, num_stages=2, split_grads=True)),
)
# dK/dV with at most _SHORT_KEYS keys per sequence: 64-key blocks, 4 warps, at every head dim up
# to 128. At head dim 64 the call's kernel time (forward + backward, sweep_configs.py by
# profiler, H200, 2026-12-01): GPT-2's layer (8, 12, 1024, 64) 0.251 -> 0.220 ms, with dropout
# 0.352 -> 0.300, (8, 16:4, 2048, 64) 0.962 -> 0.864; at (2, 16, 8192, 64) it was 10% slower than
# the 128-key blocks above. Past head dim 64 (the GQA group never shared out there:
# op._dkdv_target) the pass's kernel time against the long entry (H200, 2026-12-03): LLaMA-0.5B
# (4, 12:4, 2048) 267 -> 259 us, MHA (4, 16, 2048) 353 -> 340, right-padded LLaMA (key lengths)
# 162 -> 128, (4, 32:8, 2048, 96) 626 -> 583, (4, 16:4, 2048, 80) 287 -> 265; Llama-3-8B-like
# (8192 keys) lost 6%.
_SHORT_KEYS = 2048
_BWD_DKDV_SHORT_GPU = ((128, KernelConfig(block_m=32, block_n=64, num_warps=4, num_stages=3)),)
_BWD_DQ_GPU = (
    # D<=64: 64 x 64, 4 warps: 5% off that (8, 12, 4096, 64) layer against 128 x 64, 8 warps
    (64, KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)),
    (128, KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)),
    # D=256: 11% off that layer's forward + backward against (64, 16, 4, 1) (same sweep; two
    # stages do not fit in shared memory, so the launcher fell back to this one there)
    (256, KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=1)),
)
# Split-KV decoding: block_m is set per call to the packed query rows (16..128); block_n the
# key step. D128 at 64-key steps, 4 warps, 2 stages (4 programs an SM) is within 1% of the
# best candidate at most shapes (sweep_decode.py, H200, 2026-12-01/02)
_DECODE_GPU = (
    (128, KernelConfig(block_m=16, block_n=64, num_warps=4, num_stages=2, fixed_m=True)),
    (256, KernelConfig(block_m=16, block_n=32, num_warps=4, num_stages=2, fixed_m=True)),
)
# ... except where a key slice has few programs (batch x K/V heads at most two an SM), one tile
# of 16 rows and a short cache: there 128-key steps, 8 warps and 3 stages (192 KB of K/V in
# flight, one program an SM) read faster. One query, bf16 D128, kernel time against sdpa's
# (sweep_decode.py, H200, 2026-12-02): b16/k4096/g4 0.968 -> 0.993, b64/k4096/g8 0.975 ->
# 0.993, b16/k8192/g4 0.975 -> 1.000; 4 queries of GQA-4 up to 10% faster; no shape slower by
# more than the run-to-run 0.5%. Past 16384 keys it lost ~1% (b16/k32768/g4, b1/k131072/g1),
# and at 64 rows up to 6%.
_DECODE_DEEP_GPU = (
    (128, KernelConfig(block_m=16, block_n=128, num_warps=8, num_stages=3, fixed_m=True)),
)
_DEEP_DECODE_KEYS = 16384
_INTERPRETER = KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=1)


def _pick(table, head_dim: int) -> KernelConfig:
    for max_dim, cfg in table:
        if head_dim <= max_dim:
            return cfg
    raise ValueError(f"head_dim={head_dim} exceeds the largest supported (256)")


def fwd_config(head_dim: int, interpreting: bool) -> KernelConfig:
    return _INTERPRETER if interpreting else _pick(_FWD_GPU, head_dim)


def bwd_dkdv_config(head_dim: int, interpreting: bool, seqlen_k: int | None = None) -> KernelConfig:
    """The dK/dV pass's config; ``seqlen_k`` (keys per sequence) picks the short-sequence
    entry where a head dim has one, None the long-sequence one."""
    if interpreting:
        return _INTERPRETER
    if seqlen_k is not None and seqlen_k <= _SHORT_KEYS and head_dim <= _BWD_DKDV_SHORT_GPU[-1][0]:
        return _pick(_BWD_DKDV_SHORT_GPU, head_dim)
    return _pick(_BWD_DKDV_GPU, head_dim)


def bwd_dq_config(head_dim: int, interpreting: bool) -> KernelConfig:
    return _INTERPRETER if interpreting else _pick(_BWD_DQ_GPU, head_dim)


def max_decode_rows(head_dim: int) -> int:
    """The most query rows per K/V head (GQA group x queries) the split-KV kernel packs into
    one tile; forwards with more take the main forward, which fills the GPU with query blocks.
    128: 16 queries of a GQA-8 model ran 2.4-9.7x faster split (the group's K/V read once)
    than through the main forward (each query head re-reads it; H200, batch 1-64 x 4k-32k keys,
    benchmarks/NOTES.md ninth session). 64 past head_dim 128, where a 128-row float32
    accumulator would spill."""
    return 128 if head_dim <= 128 else 64


def deep_decode(head_dim: int, rows: int, seqlen_k: int, programs: int, sm_count: int) -> bool:
    """Whether split-KV decoding takes the deep-pipeline entry: ``programs`` (batch x K/V
    heads) per key slice at most two an SM of ``sm_count``, ``rows`` packed query rows in one
    16-row tile, at most _DEEP_DECODE_KEYS keys, a head dim the entry covers."""
    return (
        head_dim <= _DECODE_DEEP_GPU[-1][0]
        and rows <= 16
        and seqlen_k <= _DEEP_DECODE_KEYS
        and programs <= 2 * sm_count
    )


def decode_config(head_dim: int, rows: int, interpreting: bool, deep: bool = False) -> KernelConfig:
    """The split-KV kernel's config for ``rows`` packed query rows (``max_decode_rows``);
    ``deep``: the deep-pipeline entry (``deep_decode``)."""
    table = _DECODE_DEEP_GPU if deep else _DECODE_GPU
    cfg = _INTERPRETER if interpreting else _pick(table, head_dim)
    block_m = max(16, triton.next_power_of_2(rows))
    # a 128-row tile takes the main forward's 8 warps (the interpreter ignores warps)
    warps = 8 if block_m > 64 else cfg.num_warps
    return replace(cfg, block_m=block_m, num_warps=warps, fixed_m=True)


def gpu_configs() -> dict[int, dict[str, KernelConfig]]:
    """Per head_dim bucket (its largest head_dim: a row of any attention kernel's table), the
    GPU config of each kernel: what the CPU tests force through the interpreter
    (``op.forced_configs``), so that the block shapes the GPU runs are checked for indexing and
    masking on every machine."""
    buckets = sorted({dim for table in (_FWD_GPU, _BWD_DKDV_GPU, _BWD_DQ_GPU) for dim, _ in table})
    return {
        max_dim: {
            "fwd": fwd_config(max_dim, False),
            "dkdv": bwd_dkdv_config(max_dim, False),
            "dq": bwd_dq_config(max_dim, False),
            "decode": decode_config(max_dim, 16, False),
        }
        for max_dim in buckets
    }
