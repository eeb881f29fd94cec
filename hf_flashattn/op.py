"""The public op: input validation, the launch functions, autograd and the torch.library ops.

Data flows one way: ``flash_attn`` validates and normalises its inputs once, plain launch
functions (``_forward`` / ``_backward``) start the kernels, and the kernels never re-check.

Two front doors share those launch functions. Eager calls go through a
``torch.autograd.Function`` that calls them directly: a ``torch.library`` custom op's eager
dispatch costs more host time than the kernels' launches. Under ``torch.compile`` the same
functions run inside the custom ops ``hf_flashattn::fwd`` / ``::bwd``, whose fake
registrations and autograd let the compiler trace through them.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import replace

import torch

from .kernels import INTERPRETING
from .kernels.bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel
from .kernels.configs import (
    KernelConfig,
    block_d,
    bwd_dkdv_config,
    bwd_dq_config,
    decode_config,
    deep_decode,
    fwd_config,
    head_dim_constexprs,
    max_decode_rows,
)
from .kernels.decode import attn_decode_combine_kernel, attn_decode_split_kernel
from .kernels.fwd import attn_fwd_kernel, dropout_mask_kernel
from .launch import _Launcher
from .packing import segment_bounds

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LAYOUTS = ("bhsd", "bshd")
_LOG2E = 1.4426950408889634
# The dropout seed is a Philox key (64 bits); keep it a non-negative int64.
_SEED_HIGH = 2**62
# Mixes a generator's seed into the keys drawn from its Philox offsets (odd: for one seed,
# distinct offsets give distinct keys)
_SEED_MIX = 0x9E3779B97F4A7C15
# per device: the (1,) int64 zero the kernels read a key from when it comes as an int
_ZERO_SEED: dict = {}


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter's tl.dot returns garbage on bf16 operands (triton 3.9): compute in fp32
    # there. Compiled kernels use the tensor cores on bf16 directly.
    return INTERPRETING and dtype == torch.bfloat16


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    # The interpreter also converts fp32 to bf16 by truncation (compiled kernels and PyTorch round
    # to nearest even), which costs up to a whole bf16 ulp: there the kernels store fp32 and
    # PyTorch rounds.
    return torch.float32 if _upcast(dtype) else dtype


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ---------------------------------------------------------------------------- launching
# (kernel name, specialisation) -> launcher
_LAUNCHERS: dict[tuple, _Launcher] = {}
# Test hook: configs forced per kernel name ("fwd", "dkdv", "dq"), see forced_configs().
_FORCED: dict[str, KernelConfig] = {}
_KERNELS = {
    "fwd": (attn_fwd_kernel, fwd_config, "block_m"),
    "dkdv": (attn_bwd_dkdv_kernel, bwd_dkdv_config, "block_n"),
    "dq": (attn_bwd_dq_kernel, bwd_dq_config, "block_m"),
}
# The dK/dV kernel's launches by the gradients they compute (its GRADS): both, or dV and dK
# apart (KernelConfig.split_grads). Their config is always the caller's (_dkdv_config).
_DKDV_GRADS = {"dkdv": 3, "dv": 1, "dk": 2}


def _constexprs(dtype, head_dim: int, group: int, causal: bool, has_kpm: bool) -> dict:
    """What every attention kernel specialises on."""
    return dict(
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d(head_dim),
        IS_CAUSAL=causal,
        HAS_KPM=has_kpm,
        UPCAST=_upcast(dtype),
        # fp32 callers asked for fp32 results: plain tf32 dots err ~1e-3, so fp32 inputs take
        # IEEE fp32 dots (slower; the 16-bit paths are the fast ones).
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )


# the one constexpr of a kernel's own, last in its launcher key
_OWN_FLAG = {"fwd": "SCALE_POSITIVE", "dq": "HAS_DLSE", **dict.fromkeys(_DKDV_GRADS, "GROUP_PARTS")}


def _launcher(name: str, key: tuple, cfg: KernelConfig | None = None) -> _Launcher:
    """The launcher of kernel ``name`` for ``key``, with ``cfg`` where the caller picked the
    config (the dK/dV pass's depends on the sequence length), else the table's."""
    launcher = _LAUNCHERS.get((name, key, cfg))
    if launcher is None:
        dtype, head_dim, group, causal, has_kpm, key_lengths, has_seg, *rest = key
        has_dropout, pad_q, window, softcap, own = rest
        grads = _DKDV_GRADS.get(name)
        kernel, table, grid_block = _KERNELS["dkdv" if grads else name]
        constexprs = _constexprs(dtype, head_dim, group, causal, has_kpm)
        if grads:
            constexprs["GRADS"] = grads
        constexprs.update(HAS_SEG=has_seg, HAS_DROPOUT=has_dropout, PAD_Q=pad_q, HAS_WINDOW=window)
        constexprs.update(HAS_SOFTCAP=softcap, KEY_LENGTHS=key_lengths)
        # the head dim in one or two power-of-two chunks (the decode kernel pads it instead:
        # it reads K/V once, its dots are not what it waits on)
        constexprs.update(head_dim_constexprs(head_dim))
        if name in _OWN_FLAG:
            constexprs[_OWN_FLAG[name]] = own
        launcher = _LAUNCHERS[(name, key, cfg)] = _Launcher(
            kernel,
            cfg or _FORCED.get(name) or table(head_dim, INTERPRETING),
            grid_block,
            constexprs,
            direct=not INTERPRETING,
            paired=causal,
        )
    return launcher


def _decode_launcher(key: tuple, max_registers: int | None = None) -> _Launcher:
    """The split-KV kernel's launcher for ``key``; ``max_registers`` caps the registers of the
    binary where the config does not (the first call of a key decides)."""
    launcher = _LAUNCHERS.get(("decode", key))
    if launcher is None:
        dtype, head_dim, group, causal, has_kpm, rows, kv_aligned, window, *flags = key
        softcap, deep, one_slice = flags
        cfg = decode_config(head_dim, rows, INTERPRETING, deep)
        if "decode" in _FORCED:  # a forced key step; block_m stays the packed rows
            cfg = replace(_FORCED["decode"], block_m=cfg.block_m, fixed_m=True)
        if max_registers and not cfg.max_registers:
            cfg = replace(cfg, max_registers=max_registers)
        constexprs = _constexprs(dtype, head_dim, group, causal, has_kpm)
        constexprs.update(KV_ALIGNED=kv_aligned, HAS_WINDOW=window, HAS_SOFTCAP=softcap)
        constexprs.update(ONE_SLICE=one_slice)
        launcher = _LAUNCHERS[("decode", key)] = _Launcher(
            attn_decode_split_kernel, cfg, None, constexprs, direct=not INTERPRETING
        )
    return launcher


def _combine_launcher(head_dim: int, n_splits: int) -> _Launcher:
    # the next power of two in plain Python: newer Triton's next_power_of_2 is a constexpr
    # function whose call costs microseconds, on every decoding step
    block_s = max(2, 1 << (n_splits - 1).bit_length())
    launcher = _LAUNCHERS.get(("combine", head_dim, block_s))
    if launcher is None:
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_S=block_s)
        cfg = KernelConfig(block_m=1, block_n=1, num_warps=4, num_stages=1)
        launcher = _LAUNCHERS[("combine", head_dim, block_s)] = _Launcher(
            attn_decode_combine_kernel, cfg, None, constexprs, direct=not INTERPRETING
        )
    return launcher


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device, programs: int, per_sm: int | None) -> int:
    """Split-KV programs to aim at, given ``programs`` (batch x K/V heads) per key slice and
    ``per_sm``, how many programs of the split kernel one SM holds at once (0 or None: not
    known): as many as the GPU holds, and no more. Decoding is bound by memory bandwidth, and a
    grid past one full wave leaves a second, part-filled one reading at a fraction of it: at
    64 programs a slice
    (batch 16, 4 K/V heads; 4 per SM on 132 SMs) 8 slices (512 programs) ran at 0.99-1.00x
    sdpa's kernel time where 9 (576) ran at 0.73-0.88x and 5, the two-programs-per-SM rule's,
    0.94-0.97x (H200, benchmarks/NOTES.md fifteenth session). Where the binary's residency is
    not known, two per SM. The interpreter runs programs one by one: a few splits exercise the
    merge."""
    if device.type != "cuda":
        return 4
    return (per_sm or 2) * _sm_count(device.index)


def _deep_decode(device: torch.device, head_dim: int, rows: int, seqlen_k: int, programs: int):
    """Whether split-KV decoding takes the deep-pipeline config (configs.deep_decode), which
    was measured on GPUs; the interpreter has one config."""
    if device.type != "cuda":
        return False
    return deep_decode(head_dim, rows, seqlen_k, programs, _sm_count(device.index))


def _decode_splits(programs: int, seqlen_k: int, block_n: int, target: int) -> tuple[int, int]:
    """(number of key slices, keys per slice, a multiple of block_n) for ``programs``
    (batch x K/V heads) programs per slice: as many slices as keep the grid within ``target``
    programs (at least one), none empty."""
    blocks = triton_cdiv(seqlen_k, block_n)
    splits = min(blocks, max(1, target // programs))
    split_len = triton_cdiv(blocks, splits) * block_n
    return triton_cdiv(seqlen_k, split_len), split_len


def _dkdv_config(head_dim: int, seqlen_k: int) -> KernelConfig:
    return _FORCED.get("dkdv") or bwd_dkdv_config(head_dim, INTERPRETING, seqlen_k)


def _dkdv_parts(
    group: int, heads_kv: int, cfg: KernelConfig, head_dim: int, seqlen_k: int, causal: bool, device
) -> int:
    """The dK/dV pass's GQA group parts for ``heads_kv`` (batch x K/V heads) programs per key
    block (or causal pair of them) of ``cfg``."""
    blocks = triton_cdiv(seqlen_k, cfg.block_n)
    programs = heads_kv * ((blocks + 1) // 2 if causal else blocks)
    return _dkdv_group_parts(group, programs, _dkdv_target(device, cfg.num_warps, head_dim))


def _dkdv_target(device: torch.device, num_warps: int, head_dim: int) -> int:
    """Programs the dK/dV pass should have before sharing out GQA groups. Two waves of 4-warp
    programs (head_dim <= 64): at (8, 16:2, 2048, 64) the call's forward + backward went 0.63x
    -> 0.79x sdpa, 0.59x -> 0.80x at (2, 16:2, 8192, 64). None for 8-warp programs, which fill
    an SM alone: at the LLaMA-0.5B layer sharing took 0.86x to 0.65x, Llama-3-8B-like even
    (H200, benchmarks/NOTES.md tenth session). None past head_dim 64 either, where the parts'
    float32 sums are twice the bytes: LLaMA-0.5B's 4-warp pass with its group in 3 parts took
    the call's kernels from 565 to 667 us (H200, twenty-third session). The interpreter runs
    programs one by one: never shared there unless a test asks."""
    if device.type != "cuda" or num_warps > 4 or head_dim > 64:
        return 1
    return 2 * _sm_count(device.index)


def _dkdv_group_parts(group: int, programs: int, target: int) -> int:
    """How many programs share each K/V block's GQA group in the dK/dV pass: the fewest (a
    divisor of the group) that bring ``programs`` (one per K/V block, or causal pair) to
    ``target``. One program walking the whole group left the pass under one wave of 4-warp
    programs at (8, 16:2, 2048, 64) (8 x 2 K/V heads x 8 causal pairs = 128 on 132 SMs); the
    parts cost their float32 sums and one addition pass."""
    for parts in range(1, group + 1):
        if group % parts == 0 and programs * parts >= target:
            return parts
    return group


@contextlib.contextmanager
def forced_configs(**configs: KernelConfig) -> Iterator[None]:
    """Test hook: run the kernels named by the keywords (``fwd``, ``dkdv``, ``dq``, ``decode``)
    with the given block configs instead of the tables' (e.g. the GPU configs in the
    interpreter; ``decode`` keeps its block_m, the packed query rows)."""
    known = {*_KERNELS, "decode"}
    unknown = set(configs) - known
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; known: {sorted(known)}")
    saved = dict(_FORCED)
    _FORCED.update(configs)
    _LAUNCHERS.clear()
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)
        _LAUNCHERS.clear()


def _on_device(fn):
    """Run ``fn(q, ...)`` with q's GPU current: Triton launches on the current device and its
    current stream. The switch costs host time, so it happens only when needed."""

    def run(q, *args):
        if q.is_cuda and q.get_device() != torch.cuda.current_device():
            with torch.cuda.device(q.device):
                return fn(q, *args)
        return fn(q, *args)

    run.__name__ = run.__qualname__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _pads_queries(has_kpm: bool, causal: bool, seqlen_q: int, seqlen_k: int) -> bool:
    """Whether the key padding mask also marks padded queries: causal self-attention (as
    long as the keys; cross-attention is never causal), where query i is key i's token. Their
    rows give zeros (lse -inf, zero gradients) and are not computed, as FlashAttention-2's
    unpadded (varlen) path leaves them."""
    return has_kpm and causal and seqlen_q == seqlen_k


def _diagonal(causal: bool, window: int) -> tuple[bool, int, int]:
    """The kernels' (causal, window, shift) for a call's causality and sliding window. The
    kernels mask keys past a diagonal moved ``shift`` keys right of the bottom-right one, and
    ``window`` keys back from it: a bidirectional window W (|i + seq_k - seq_q - j| < W) is the
    causal window of 2W - 1 keys with the diagonal W - 1 keys to the right."""
    if window and not causal:
        return True, 2 * window - 1, window - 1
    return causal, window, 0


# ---------------------------------------------------------------------------- launch functions
@_on_device
def _forward(q, k, v, key_padding_mask, segments, causal, scale, dropout_p, seed, window, softcap):
    """Launch the forward. q (batch, heads_q, seq_q, dim), k/v (batch, heads_kv, seq_k, dim),
    last dim dense; key_padding_mask: (batch, seq_k) bool, or (batch,) int32 key lengths
    (flash_attn's key_lengths); segments: packed sequences' token bounds
    (``_segment_bounds``), or None; seed: the dropout key (``_new_seed``), or None without it;
    window: the causal sliding window (query i sees keys j > i + seq_k - seq_q - window), 0
    for none; softcap: scores capped as softcap * tanh(scores / softcap), 0.0 for none.
    Returns out (batch, heads_q, seq_q, dim) stored as (batch, seq, heads, dim), and lse
    (batch, heads_q, seq_q) float32."""
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    # (batch, seq, heads, dim) in memory, returned as a (batch, heads, seq, dim) view: the
    # transformers hook transposes it back to (batch, seq, heads, dim) without a copy.
    row = heads_q * head_dim
    out = torch.empty_strided(
        (batch, heads_q, seqlen_q, head_dim),
        (seqlen_q * row, head_dim, row, 1),
        dtype=_store_dtype(q.dtype),
        device=q.device,
    )
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    has_kpm = key_padding_mask is not None
    kpm = key_padding_mask if has_kpm else q  # dummy pointer, never read
    key_lengths = has_kpm and kpm.dim() == 1
    has_seg = segments is not None
    group = heads_q // heads_kv
    pad_q = _pads_queries(has_kpm, causal, seqlen_q, seqlen_k)
    causal, window, shift = _diagonal(causal, window)
    # decoding, short chunks, speculative verification: few query rows per K/V head
    few_rows = group * seqlen_q <= max_decode_rows(head_dim)
    if dropout_p == 0.0 and not has_seg and not pad_q and few_rows:
        if key_lengths:  # the split-KV kernel reads a mask
            kpm = torch.arange(seqlen_k, device=q.device) < kpm[:, None]
        kpm_or_none = kpm if has_kpm else None
        _split_kv_forward(q, k, v, out, lse, kpm_or_none, causal, scale, window, shift, softcap)
        if out.dtype != q.dtype:  # the interpreter's bf16 (strides kept)
            out = out.to(q.dtype)
        return out, lse
    flags = (has_kpm, key_lengths, has_seg, dropout_p > 0.0, pad_q, window > 0, softcap > 0.0)
    key = (q.dtype, head_dim, group, causal, *flags, scale > 0)
    seed_ptr, seed_offset = _seed_args(seed, q)
    _launcher("fwd", key)(
        seqlen_q,
        batch * heads_q,
        (q, k, v, out, lse, kpm, segments if has_seg else q, seed_ptr),
        (scale * _LOG2E, dropout_p, softcap),
        (
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *out.stride(),
            kpm.stride(0) if has_kpm else 0,
            segments.stride(0) if has_seg else 0,
            heads_q,
            seqlen_q,
            seqlen_k,
            window,
            shift,
            seed_offset,
        ),
    )
    if out.dtype != q.dtype:  # the interpreter's bf16 (strides kept)
        out = out.to(q.dtype)
    return out, lse


def _split_kv_forward(
    q, k, v, out, lse, key_padding_mask, causal, scale, window, shift, softcap
) -> None:
    """Few query rows against many keys (decoding): the keys split over programs so the GPU
    fills, the query heads of a GQA group packed into one tile, the slices merged through their
    log-sum-exps (kernels/decode.py). Writes ``out`` and ``lse`` like the main forward. With a
    sliding window only the keys some query sees are read: the cache's tail, whose bottom-right
    alignment is the whole cache's."""
    if window:
        first = k.shape[2] - q.shape[2] + shift - window + 1
        if first > 0:
            k, v = k[:, :, first:], v[:, :, first:]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[:, first:]
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    has_kpm = key_padding_mask is not None
    kpm = key_padding_mask if has_kpm else q  # dummy pointer, never read
    kb, kh, kn, kd = k.stride()
    vb, vh, vn, vd = v.stride()
    kv_aligned = not (kb | kh | vb | vh) & 15  # batch and head strides all divisible by 16
    if kv_aligned:  # passed divided by 16, multiplied back in the kernel (kernels/decode.py)
        kb, kh, vb, vh = kb >> 4, kh >> 4, vb >> 4, vh >> 4
    rows, programs = group * seqlen_q, batch * heads_kv
    deep = _deep_decode(q.device, head_dim, rows, seqlen_k, programs)
    key = (q.dtype, head_dim, group, causal, has_kpm, rows, kv_aligned, window > 0)
    key += (softcap > 0.0, deep)
    split = _decode_launcher(key + (False,))
    lengths = (kpm.stride(0) if has_kpm else 0, heads_kv, seqlen_q, seqlen_k)
    strides = (*q.stride(), kb, kh, kn, kd, vb, vh, vn, vd, *lengths)
    floats = (scale * _LOG2E, softcap)
    # out and lse, where the one-slice (ONE_SLICE) binary writes them; the partials' binary never
    # touches them (nor the one-slice one the partials: lse stands in for them)
    outputs, out_strides = (out, lse), out.stride()
    if split.per_sm is None:
        # asked once per binary, so its arguments are built only then: compiled, not launched
        # (the slice counts are unspecialised ints, so any compiles it; lse stands in for the
        # float32 partials, not allocated yet)
        split.programs_per_sm(
            (q, k, v, lse, kpm, *outputs), floats, (*strides, 1, 1, 1, window, shift, *out_strides)
        )
    target = _target_programs(q.device, programs, split.per_sm)
    n_splits, split_len = _decode_splits(programs, seqlen_k, split.cfg.block_n, target)
    if n_splits == 1:  # the slice is the whole: no partials, no merge
        # held to the partials binary's registers, whose residency sized the grid: left to
        # itself ptxas gave it 143 where that one has 128 (4 query rows, Triton 3.6, sm_90),
        # 3 programs an SM instead of 4, and 512 programs took two waves (0.81x sdpa's time
        # against 0.99x; capped: no spills)
        _decode_launcher(key + (True,), split.registers)(
            1,
            programs,
            (q, k, v, lse, kpm, *outputs),
            floats,
            (*strides, split_len, 1, 0, window, shift, *out_strides),
        )
        return
    # n_parts partial rows of head_dim floats, then their n_parts log2-sum-exps
    n_parts = batch * heads_q * n_splits * seqlen_q
    parts = torch.empty(n_parts * (head_dim + 1), dtype=torch.float32, device=q.device)
    split(
        n_splits,
        programs,
        (q, k, v, parts, kpm, *outputs),
        floats,
        (*strides, split_len, n_splits, n_parts, window, shift, *out_strides),
    )
    _combine_launcher(head_dim, n_splits)(
        seqlen_q,
        batch * heads_q,
        (parts, out, lse),
        (),
        (*out.stride(), heads_q, seqlen_q, n_splits, n_parts),
    )


@_on_device
def _backward(
    q, k, v, out, lse, dout, dlse, key_padding_mask, segments, causal, scale, dropout_p, seed,
    window, softcap,
):  # fmt: skip
    """Launch the backward: the dQ pass (which also computes delta, with dlse folded in), then
    the dK/dV pass. dout like out, or None (only lse was used); dlse like lse, or None.
    Returns dq, dk, dv shaped and strided like q, k, v."""
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    if dout is None:
        dout = torch.zeros_like(out)
    elif dout.stride(-1) != 1:
        dout = dout.contiguous()
    has_dlse = dlse is not None
    if has_dlse and not dlse.is_contiguous():
        dlse = dlse.contiguous()  # e.g. the expanded ones of lse.sum()'s backward
    store = _store_dtype(q.dtype)
    dq = torch.empty_like(q, dtype=store)
    pad_q = _pads_queries(key_padding_mask is not None, causal, seqlen_q, seqlen_k)
    causal, window, shift = _diagonal(causal, window)
    group = heads_q // heads_kv
    dkdv_cfg = _dkdv_config(head_dim, seqlen_k)
    parts = 1
    if group > 1:
        parts = _dkdv_parts(group, batch * heads_kv, dkdv_cfg, head_dim, seqlen_k, causal, q.device)
    if parts == 1:
        dk = torch.empty_like(k, dtype=store)
        dv = torch.empty_like(v, dtype=store)
    else:  # each part's float32 sums over its share of the group's query heads
        dk = torch.empty((parts, *k.shape), dtype=torch.float32, device=k.device)
        dv = torch.empty_like(dk)
    delta = torch.empty_like(lse)
    has_kpm = key_padding_mask is not None
    kpm = key_padding_mask if has_kpm else q  # dummy pointers, never read
    kpm_stride = kpm.stride(0) if has_kpm else 0
    key_lengths = has_kpm and kpm.dim() == 1
    has_seg = segments is not None
    seg, seg_stride = (segments, segments.stride(0)) if has_seg else (q, 0)
    seed_ptr, seed_offset = _seed_args(seed, q)
    qk_scale = scale * _LOG2E
    flags = (has_kpm, key_lengths, has_seg, dropout_p > 0.0, pad_q, window > 0, softcap > 0.0)
    key = (q.dtype, head_dim, group, causal, *flags, has_dlse)
    _launcher("dq", key)(
        seqlen_q,
        batch * heads_q,
        (q, k, v, out, dout, lse, dlse if has_dlse else lse, delta, dq, kpm, seg, seed_ptr),
        (qk_scale, scale, dropout_p, softcap),
        (
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *out.stride(),
            *dout.stride(),
            *dq.stride(),
            kpm_stride,
            seg_stride,
            heads_q,
            seqlen_q,
            seqlen_k,
            window,
            shift,
            seed_offset,
        ),
    )
    dkdv_args = (
        (q, k, v, dout, lse, delta, dk, dv, kpm, seg, seed_ptr),
        (qk_scale, scale, dropout_p, softcap),
        (
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *dout.stride(),
            *dk.stride()[-4:],
            *dv.stride()[-4:],
            kpm_stride,
            seg_stride,
            dk.stride(0) if parts > 1 else 0,
            heads_q,
            heads_kv,
            seqlen_q,
            seqlen_k,
            window,
            shift,
            seed_offset,
        ),
    )
    for name in ("dv", "dk") if dkdv_cfg.split_grads else ("dkdv",):
        _launcher(name, key[:-1] + (parts,), dkdv_cfg)(
            seqlen_k, batch * heads_kv * parts, *dkdv_args
        )
    if parts > 1:
        dk, dv = _sum_parts(dk, k), _sum_parts(dv, v)
    if store != q.dtype:  # the interpreter's bf16
        dq, dk, dv = dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)
    return dq, dk, dv


def _sum_parts(parts: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The dK/dV pass's float32 parts summed over dim 0, stored in ``like``'s dtype and strides
    (as the custom op's fake says). The last addition writes the result itself: for two parts
    one pass instead of a float32 sum and a copy (2 x 25 + 2 x 13 us at (8, 16:2, 2048, 64),
    H200, benchmarks/NOTES.md eleventh session). ``torch.sum(..., out=)`` would cast each part
    to the output's dtype before adding."""
    rest = parts[0] if parts.shape[0] == 2 else parts[:-1].sum(0)
    return torch.add(rest, parts[-1], out=torch.empty_like(like))


# ---------------------------------------------------------------------------- autograd
# Shared by the eager Function and the custom op's autograd: what the forward saves, and how
# the backward launch (``_backward`` eagerly, ``_bwd_op`` under torch.compile) uses it.
def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, segments, causal, scale, dropout_p, seed, window, softcap = inputs
    out, lse = output
    tensor_seed = seed if isinstance(seed, torch.Tensor) else None
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, segments, tensor_seed)
    ctx.int_seed = None if tensor_seed is not None else seed
    ctx.args = (causal, scale, dropout_p)
    ctx.tail = (window, softcap)


def _input_grads(launch_backward, ctx, dout, dlse):
    q, k, v, out, lse, key_padding_mask, segments, seed = ctx.saved_tensors
    if seed is None:
        seed = ctx.int_seed
    dq, dk, dv = launch_backward(
        q, k, v, out, lse, dout, dlse, key_padding_mask, segments, *ctx.args, seed, *ctx.tail
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


class _FlashAttn(torch.autograd.Function):
    """Eager path: the launch functions called directly, no custom-op dispatch. ``out_bshd``:
    the output returned as (batch, seq, heads, dim), the transpose done in here rather than as
    an autograd node of its own (one node less to build and to run backward: host time on
    every call, ``_transposed``)."""

    @staticmethod
    def forward(ctx, out_bshd, *inputs):
        out, lse = _forward(*inputs)
        _setup_context(ctx, inputs, (out, lse))
        ctx.out_bshd = out_bshd
        # unused outputs (lse without return_lse) get None, not a tensor of zeros
        ctx.set_materialize_grads(False)
        return _transposed(out, out_bshd), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dout = _transposed(dout, ctx.out_bshd)
        return None, *_input_grads(_backward, ctx, dout, dlse)


def _transposed(t: torch.Tensor | None, bshd: bool) -> torch.Tensor | None:
    """``t`` with its heads and seq dims swapped when ``bshd`` (between the kernels'
    (batch, heads, seq, dim) view and the caller's (batch, seq, heads, dim)); else as it is."""
    return t.transpose(1, 2) if bshd and t is not None else t


# ---------------------------------------------------------------------------- custom ops
@torch.library.custom_op("hf_flashattn::fwd", mutates_args=(), device_types=None)
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    segments: torch.Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    window: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(
        q, k, v, key_padding_mask, segments, causal, scale, dropout_p, seed, window, softcap
    )


@_fwd_op.register_fake
def _(q, k, v, key_padding_mask, segments, causal, scale, dropout_p, seed, window, softcap):
    batch, heads_q, seqlen_q, head_dim = q.shape
    out = q.new_empty((batch, seqlen_q, heads_q, head_dim)).transpose(1, 2)
    lse = q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("hf_flashattn::bwd", mutates_args=(), device_types=None)
def _bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor | None,
    dlse: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    segments: torch.Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    window: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(
        q, k, v, out, lse, dout, dlse, key_padding_mask, segments, causal, scale, dropout_p, seed,
        window, softcap,
    )  # fmt: skip


@_bwd_op.register_fake
def _(
    q, k, v, out, lse, dout, dlse, key_padding_mask, segments, causal, scale, dropout_p, seed,
    window, softcap,
):  # fmt: skip
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _op_backward(ctx, dout, dlse):
    return _input_grads(_bwd_op, ctx, dout, dlse)


_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- validation
def _check_inputs(q, k, v, key_padding_mask, dropout_p, scale, layout) -> None:
    """Every rule an input must meet, with an error naming the argument. Runs on every call,
    so the common case takes the fewest attribute reads."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    dims = "(batch, heads, seq, head_dim)" if layout == "bhsd" else "(batch, seq, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {dims} (layout={layout!r}), got {tuple(t.shape)}")
    dtype = q.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {dtype}; supported: float16, bfloat16, float32")
    if k.dtype != dtype or v.dtype != dtype:
        raise TypeError(f"q, k and v must share a dtype, got q={dtype}, k={k.dtype}, v={v.dtype}")
    device = q.device
    if k.device != device or v.device != device:
        raise ValueError(
            f"q, k and v must be on one device, got q={device}, k={k.device}, v={v.device}"
        )
    h, s = (1, 2) if layout == "bhsd" else (2, 1)
    q_shape, k_shape = q.shape, k.shape
    batch, heads_q, seqlen_q, head_dim = q_shape[0], q_shape[h], q_shape[s], q_shape[3]
    heads_kv, seqlen_k = k_shape[h], k_shape[s]
    if k_shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got k={tuple(k_shape)}, v={tuple(v.shape)}"
        )
    if k_shape[0] != batch:
        raise ValueError(f"k has batch {k_shape[0]} but q has batch {batch}")
    if k_shape[3] != head_dim:
        raise ValueError(f"k has head_dim {k_shape[3]} but q has head_dim {head_dim}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(
            f"q heads ({heads_q}) must be a multiple of k/v heads ({heads_kv}) (layout={layout!r})"
        )
    if seqlen_q == 0 or seqlen_k == 0:
        raise ValueError(f"seq lengths must be >= 1, got seq_q={seqlen_q}, seq_k={seqlen_k}")
    if device.type == "cpu" and not INTERPRETING:
        raise ValueError(
            "q is on the CPU: the Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 set "
            "before hf_flashattn is imported"
        )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(
                f"key_padding_mask must be a torch.Tensor, got {type(key_padding_mask).__name__}"
            )
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}"
            )
        if key_padding_mask.shape != (batch, seqlen_k):
            raise ValueError(
                f"key_padding_mask must have shape (batch, seq_k) = {(batch, seqlen_k)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != device:
            raise ValueError(
                f"key_padding_mask is on {key_padding_mask.device} but q is on {device}"
            )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    # a comparison, not math.isfinite: compiled with dynamic shapes a module's float attribute
    # (a model's scaling) arrives as a symbolic float, which math.isfinite cannot be traced on
    # (False for NaN too)
    if scale is not None and not abs(scale) < math.inf:
        raise ValueError(f"scale must be a finite number, got {scale}")


def _check_key_lengths(key_lengths, key_padding_mask, q) -> None:
    if not isinstance(key_lengths, torch.Tensor):
        raise TypeError(f"key_lengths must be a torch.Tensor, got {type(key_lengths).__name__}")
    if key_lengths.dtype != torch.int32:
        raise TypeError(f"key_lengths must be int32, got {key_lengths.dtype}")
    if key_lengths.shape != (q.shape[0],):
        raise ValueError(
            f"key_lengths must have shape (batch,) = ({q.shape[0]},), "
            f"got {tuple(key_lengths.shape)}"
        )
    if key_lengths.device != q.device:
        raise ValueError(f"key_lengths is on {key_lengths.device} but q is on {q.device}")
    if key_padding_mask is not None:
        raise ValueError("pass key_padding_mask or key_lengths, not both")


def _graph_seed(device) -> torch.Tensor:
    """The dropout key as compiled and captured calls draw it: a (1,) int64 tensor from
    ``torch.randint`` on ``device`` (a graph op, no host sync)."""
    return torch.randint(0, _SEED_HIGH, (1,), device=device)


def _new_seed(device: torch.device) -> torch.Tensor | int:
    """The dropout key, drawn from ``device``'s default generator (``torch.manual_seed``
    reproduces it, and so does restoring its state, as activation checkpointing does).

    Called eagerly, an int: on a GPU the generator's seed mixed with its Philox offset, the
    offset then advanced as a random op advances it. No kernel launch and no host sync: GPT-2's
    dropout forward took 78 µs of host time against 94 with a ``torch.randint`` tensor (H200
    host, benchmarks/NOTES.md twenty-fourth session). On the CPU (the interpreter) an int drawn by
    ``torch.randint``. While compiling or capturing a CUDA graph, ``_graph_seed``'s tensor: an
    int would be baked into the graph (the same mask at every replay)."""
    if torch.compiler.is_compiling():
        return _graph_seed(device)
    if device.type != "cuda":
        return int(torch.randint(0, _SEED_HIGH, (1,)))
    if torch.cuda.is_current_stream_capturing():
        return _graph_seed(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    gen = torch.cuda.default_generators[index]
    offset = gen.get_offset()
    gen.set_offset(offset + 4)  # Philox offsets advance in fours
    return (gen.initial_seed() * _SEED_MIX + offset) % _SEED_HIGH


def _seed_args(seed: torch.Tensor | int | None, q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """What the kernels take for a dropout key (``_new_seed``): a pointer to an int64 and an
    int added to it. A tensor key: itself and 0; an int key: a zero on q's device and the
    int; None (no dropout): q as a dummy pointer, never read."""
    if seed is None:
        return q, 0
    if isinstance(seed, torch.Tensor):
        return seed, 0
    zero = _ZERO_SEED.get(q.device)
    if zero is None:
        zero = _ZERO_SEED[q.device] = torch.zeros(1, dtype=torch.int64, device=q.device)
    return zero, seed


def flash_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    layout: str = "bhsd",
    out_layout: str | None = None,
):
    """Layout caveat: q, k, v are (batch, heads, seq, head_dim) by default, NOT flash-attn's
    (batch, seq, heads, head_dim); pass ``layout="bshd"`` for that (no copy either way).

    FlashAttention-2 (Triton): softmax(q @ k^T * scale) @ v without an N x N tensor.

    The two layouts cannot be told apart from shapes (self-attention with seq == heads, or any
    GQA shape, is valid either way), so nothing guesses: the wrong one gives wrong numbers, not
    an error. On the CPU this runs only through Triton's interpreter (``TRITON_INTERPRET=1``
    set before ``hf_flashattn`` is imported), which is slow; it is meant for tests.

    Grouped-query / multi-query attention: ``heads_q`` must be a multiple of ``heads_kv``; query
    head ``h`` reads K/V head ``h // (heads_q // heads_kv)``. K/V are never copied.

    With ``causal=True`` and ``seq_q != seq_k`` the mask is aligned to the bottom-right corner
    (query ``i`` sees keys ``j <= i + seq_k - seq_q``), as decoding with a KV cache needs. For
    seq_q = 2, seq_k = 5 (1 = attend)::

        1 1 1 1 0
        1 1 1 1 1

    and for seq_q = 5, seq_k = 2 (the first three rows see nothing and give zeros)::

        0 0
        0 0
        0 0
        1 0
        1 1

    Arguments:
        q: (batch_size, heads_q, seqlen_q, head_dim), or (batch_size, seqlen_q, heads_q,
            head_dim) with layout="bshd"; float16 / bfloat16 / float32, any strides.
        k: (batch_size, heads_kv, seqlen_k, head_dim) (bshd: (batch_size, seqlen_k, heads_kv,
            head_dim)), same dtype and device as q.
        v: same shape as k, same dtype and device as q.
        causal: bool, default False. Apply the bottom-right aligned causal mask.
        scale: float, default ``head_dim ** -0.5``. Multiplies q @ k^T before the softmax.
        dropout_p: float in [0, 1), default 0. Dropout on the attention probabilities, drawn
            in the kernel (Philox, 8 bits per element as FlashAttention-2 draws them, so the
            rate applied is dropout_p rounded to a multiple of 1/256, at most 255/256:
            ``applied_dropout_rate``; kept values scale by exactly 1 / (1 - that rate), so
            the output's expectation is the undropped one) from a seed taken from the default
            generator of q's device.
        key_padding_mask: (batch_size, seqlen_k) bool, default None. True = attend. A query
            row with no key to attend to gives zeros (and zero gradients), never NaN. With
            causal=True and seqlen_q == seqlen_k (causal self-attention: query i is key i's
            token) it marks the padded queries too: their rows give zeros, lse -inf and zero
            gradients, and cost nothing (FlashAttention-2's unpadded path leaves them so).
        key_lengths: (batch_size,) int32, default None. Row b attends keys [0, key_lengths[b])
            (clipped to [0, seqlen_k]): a right-padded batch's lengths. The same as a
            key_padding_mask keeping a prefix of each row, queries included, and faster: the
            kernels read one count a row, never a mask. Not with key_padding_mask.
        cu_seqlens: int32/int64, default None. Packed sequences: several sequences laid end
            to end along the sequence dimension (seq_q == seq_k), each attending only within
            itself (and causally with ``causal=True``), as if run alone: the cumulative
            lengths ``[0, len_0, len_0 + len_1, ..., seq_len]``, shape (num_seqs + 1,) for
            every batch row alike or (batch_size, num_seqs + 1) per row (a row with fewer
            sequences repeats its last value). Non-decreasing, from 0 to seq_len. Not with
            key_padding_mask (padding is a sequence of its own there).
        sliding_window: int >= 1, default None. With causal=True, query ``i`` sees only the
            ``sliding_window`` keys ending at its own position: ``i + seq_k - seq_q -
            sliding_window < j <= i + seq_k - seq_q`` (transformers' sliding-window layers:
            Mistral, Gemma 2/3, Qwen2 with ``use_sliding_window``). With causal=False, the keys
            less than ``sliding_window`` away on either side: ``|i + seq_k - seq_q - j| <
            sliding_window`` (ModernBERT's local layers, EmbeddingGemma, T5Gemma). Keys outside
            every query's window are not visited.
        softcap: float > 0, default None. Logit soft-capping (Gemma 2): the scaled scores
            ``s = scale * q @ k^T`` become ``softcap * tanh(s / softcap)`` before the softmax,
            as FlashAttention-2's ``softcap`` does.
        return_lse: bool, default False. Also return the log-sum-exp of the scaled scores
            (differentiable: gradients through it reach q and k).
        layout: "bhsd" (default) or "bshd", the layout of q, k, v and of out.
        out_layout: "bhsd" or "bshd", default ``layout``: the layout of out where it differs
            from the inputs' (transformers' attention functions take bhsd and return bshd).
            Either way no copy, and cheaper than transposing the result: no autograd node.

    Return:
        out: (batch_size, heads_q, seqlen_q, head_dim) (out_layout "bshd": (batch_size,
            seqlen_q, heads_q, head_dim)), dtype of q. Stored as (batch, seq, heads, dim) in
            memory in both layouts, so the "bshd" out is contiguous.
        lse (only with return_lse=True): (batch_size, heads_q, seqlen_q) float32 in both
            layouts, natural log; -inf for rows that attend to nothing.
    """
    _check_inputs(q, k, v, key_padding_mask, dropout_p, scale, layout)
    if key_lengths is not None:
        _check_key_lengths(key_lengths, key_padding_mask, q)
        # the launch functions take the lengths where the mask would go (told apart by dim)
        key_padding_mask = key_lengths
    if out_layout is None:
        out_layout = layout
    elif out_layout not in LAYOUTS:
        raise ValueError(f"out_layout must be one of {LAYOUTS}, got {out_layout!r}")
    window = 0
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
            raise TypeError(f"sliding_window must be an int, got {type(sliding_window).__name__}")
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        window = sliding_window
    cap = 0.0
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
        if not (0.0 < softcap < float("inf")):
            raise ValueError(f"softcap must be a positive finite float, got {softcap}")
        cap = float(softcap)
    segments = None
    if cu_seqlens is not None:
        if key_padding_mask is not None:
            raise ValueError("pass cu_seqlens or key_padding_mask / key_lengths, not both")
        seq_dim = 1 if layout == "bshd" else 2
        seqlen_q, seqlen_k = q.shape[seq_dim], k.shape[seq_dim]
        segments = segment_bounds(cu_seqlens, q.shape[0], seqlen_q, seqlen_k, q.device)
    bshd = layout == "bshd"
    if bshd:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # The kernels take any batch/head/seq strides; only the last dim must be dense.
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if key_padding_mask is not None and key_padding_mask.stride(-1) != 1:
        key_padding_mask = key_padding_mask.contiguous()  # and key_lengths
    causal, dropout_p = bool(causal), applied_dropout_rate(dropout_p)
    seed = _new_seed(q.device) if dropout_p > 0.0 else None
    args = (q, k, v, key_padding_mask, segments, causal, scale, dropout_p, seed, window, cap)
    out_bshd = out_layout == "bshd"
    if torch.compiler.is_compiling():
        out, lse = _fwd_op(*args)
        out = _transposed(out, out_bshd)
    elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = _FlashAttn.apply(out_bshd, *args)
    else:
        out, lse = _forward(*args)
        out = _transposed(out, out_bshd)
    return (out, lse) if return_lse else out


def applied_dropout_rate(dropout_p: float) -> float:
    """The dropout rate the kernels apply for a requested ``dropout_p``: the nearest multiple
    of 1/256 (the kernels draw one byte per probability), at most 255/256. The kernels keep a
    probability when its draw is >= 256 x this rate and scale kept ones by 1 / (1 - this rate),
    so dropout stays unbiased; a rate below 1/512 applies none."""
    return min(round(float(dropout_p) * 256), 255) / 256


def dropout_keep_mask(
    seed,
    batch: int,
    heads_q: int,
    seqlen_q: int,
    seqlen_k: int,
    dropout_p: float,
    device,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Test-only hook: the (batch, heads_q, seqlen_q, seqlen_k) bool keep-mask the kernels
    draw for ``seed`` (what ``_new_seed`` returns, or an int). With ``rows`` (1-D int64 query
    row indices) only those rows: (batch, heads_q, len(rows), seqlen_k), the others drawn
    only where they share a Philox call's 16-row block with one. Materialises rows x seq_k:
    for checking dropout, never for the hot path."""
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device)
    # the kernel draws whole row blocks, 16 rows at least (one Philox call spans rows r, r+1,
    # r+8, r+9): large ones for the whole mask, the smallest for chosen rows
    block_m = 16 if rows is not None else 64 if INTERPRETING else 128
    if rows is None:
        rows = torch.arange(seqlen_q, device=device)
    rows = rows.to(device=device, dtype=torch.int64)
    blocks, block_of_row = torch.unique(rows // block_m, return_inverse=True)
    n_blocks = blocks.numel()
    drawn = torch.empty(
        (batch, heads_q, n_blocks, block_m, seqlen_k), dtype=torch.int8, device=device
    )
    seed_ptr, seed_offset = _seed_args(seed, drawn)
    dropout_mask_kernel[(n_blocks * batch * heads_q,)](
        drawn,
        seed_ptr,
        blocks,
        applied_dropout_rate(dropout_p),
        n_blocks,
        seqlen_k,
        seed_offset,
        BLOCK_M=block_m,
        BLOCK_N=64 if INTERPRETING else 128,
    )
    return drawn[:, :, block_of_row, rows % block_m].bool()
