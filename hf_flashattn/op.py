"""The public op: input validation, the torch.library custom ops and their autograd.

Data flows one way: ``flash_attn`` validates and normalises its inputs once, the custom ops
launch the kernels, and the kernels never re-check.
"""

from __future__ import annotations

import math

import torch
from triton.runtime.errors import OutOfResources

from .kernels import INTERPRETING
from .kernels.bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from .kernels.configs import KernelConfig, block_d, bwd_dkdv_config, bwd_dq_config, fwd_config
from .kernels.fwd import attn_fwd_kernel, dropout_mask_kernel

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
# Philox keys are seed + (batch * heads_q + head); keep that sum inside int32.
_SEED_LIMIT = 2**30


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter's tl.dot returns garbage on bf16 operands (triton 3.9): compute in fp32
    # there. Compiled kernels use the tensor cores on bf16 directly.
    return INTERPRETING and dtype == torch.bfloat16


# Per kernel and specialisation: the first config that fit this GPU's shared memory.
_FITTING_CONFIG: dict[tuple, KernelConfig] = {}


def _launch(kernel, grid, cfg: KernelConfig, dtype: torch.dtype, args: tuple, meta: dict) -> None:
    """Launch ``kernel`` over ``grid(cfg)``, stepping down to smaller configs while the GPU
    lacks the shared memory for one (Triton raises before anything runs), and remembering
    the config that fit so the step-down happens once per process."""
    key = (kernel, dtype, tuple(sorted(meta.items())))
    cfg = _FITTING_CONFIG.get(key, cfg)
    # fp32 callers asked for fp32 results: plain tf32 dots err ~1e-3, so fp32 inputs take IEEE
    # fp32 dots (slower; the 16-bit paths are the fast ones). 16-bit operands ignore this.
    precision = "ieee" if dtype == torch.float32 else "tf32"
    while True:
        try:
            kernel[grid(cfg)](
                *args,
                BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n,
                DOT_PRECISION=precision,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                **meta,
            )
        except OutOfResources:
            cfg = cfg.smaller()
            if cfg is None:
                raise
            continue
        _FITTING_CONFIG[key] = cfg
        return


# ---------------------------------------------------------------------------- forward
@torch.library.custom_op("hf_flashattn::fwd", mutates_args=(), device_types=None)
def _fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    # (batch, seq, heads, dim) in memory, returned as a (batch, heads, seq, dim) view: the
    # transformers hook transposes it back to (batch, seq, heads, dim) without a copy.
    out = torch.empty(
        (batch, seqlen_q, heads_q, head_dim), dtype=q.dtype, device=q.device
    ).transpose(1, 2)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    kpm = key_padding_mask if key_padding_mask is not None else q  # dummy pointer, never read
    _launch(
        attn_fwd_kernel,
        lambda cfg: (triton_cdiv(seqlen_q, cfg.block_m), batch * heads_q),
        fwd_config(head_dim, INTERPRETING),
        q.dtype,
        (
            q,
            k,
            v,
            out,
            lse,
            kpm,
            scale * _LOG2E,
            dropout_p,
            seed,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *out.stride(),
            kpm.stride(0) if key_padding_mask is not None else 0,
            heads_q,
            seqlen_q,
            seqlen_k,
        ),
        dict(
            GROUP=heads_q // heads_kv,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d(head_dim),
            IS_CAUSAL=causal,
            HAS_KPM=key_padding_mask is not None,
            HAS_DROPOUT=dropout_p > 0.0,
            UPCAST=_upcast(q.dtype),
        ),
    )
    return out, lse


@_fwd.register_fake
def _(q, k, v, key_padding_mask, causal, scale, dropout_p, seed):
    batch, heads_q, seqlen_q, head_dim = q.shape
    out = q.new_empty((batch, seqlen_q, heads_q, head_dim)).transpose(1, 2)
    lse = q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)
    return out, lse


# ---------------------------------------------------------------------------- backward
@torch.library.custom_op("hf_flashattn::bwd", mutates_args=(), device_types=None)
def _bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty_like(lse)
    bd = block_d(head_dim)
    pre_block = 64 if INTERPRETING else 128
    attn_bwd_preprocess_kernel[(triton_cdiv(seqlen_q, pre_block), batch * heads_q)](
        out,
        dout,
        delta,
        *out.stride(),
        *dout.stride(),
        heads_q,
        seqlen_q,
        HEAD_DIM=head_dim,
        BLOCK_D=bd,
        BLOCK_M=pre_block,
    )
    has_kpm = key_padding_mask is not None
    kpm = key_padding_mask if has_kpm else q
    kpm_stride = kpm.stride(0) if has_kpm else 0
    common = dict(
        GROUP=heads_q // heads_kv,
        HEAD_DIM=head_dim,
        BLOCK_D=bd,
        IS_CAUSAL=causal,
        HAS_KPM=has_kpm,
        HAS_DROPOUT=dropout_p > 0.0,
        UPCAST=_upcast(q.dtype),
    )
    _launch(
        attn_bwd_dkdv_kernel,
        lambda cfg: (triton_cdiv(seqlen_k, cfg.block_n), batch * heads_kv),
        bwd_dkdv_config(head_dim, INTERPRETING),
        q.dtype,
        (
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dk,
            dv,
            kpm,
            scale * _LOG2E,
            scale,
            dropout_p,
            seed,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *dout.stride(),
            *dk.stride(),
            *dv.stride(),
            kpm_stride,
            heads_q,
            heads_kv,
            seqlen_q,
            seqlen_k,
        ),
        common,
    )
    _launch(
        attn_bwd_dq_kernel,
        lambda cfg: (triton_cdiv(seqlen_q, cfg.block_m), batch * heads_q),
        bwd_dq_config(head_dim, INTERPRETING),
        q.dtype,
        (
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dq,
            kpm,
            scale * _LOG2E,
            scale,
            dropout_p,
            seed,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *dout.stride(),
            *dq.stride(),
            kpm_stride,
            heads_q,
            seqlen_q,
            seqlen_k,
        ),
        common,
    )
    return dq, dk, dv


@_bwd.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, causal, scale, dropout_p, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed = causal, scale, dropout_p, seed


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = _bwd(
        dout, q, k, v, out, lse, key_padding_mask, ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed
    )
    return dq, dk, dv, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ---------------------------------------------------------------------------- validation
def _check_inputs(q, k, v, key_padding_mask, dropout_p, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(
            f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}"
        )
    batch, heads_q, _, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got k={tuple(k.shape)}, v={tuple(v.shape)}"
        )
    if k.shape[0] != batch:
        raise ValueError(f"k has batch {k.shape[0]} but q has batch {batch}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k has head_dim {k.shape[3]} but q has head_dim {head_dim}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    heads_kv = k.shape[1]
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"q heads ({heads_q}) must be a multiple of k/v heads ({heads_kv})")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"seq lengths must be >= 1, got seq_q={q.shape[2]}, seq_k={k.shape[2]}")
    if q.device.type == "cpu" and not INTERPRETING:
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
        if tuple(key_padding_mask.shape) != (batch, k.shape[2]):
            raise ValueError(
                f"key_padding_mask must have shape (batch, seq_k) = {(batch, k.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(
                f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}"
            )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")


def _new_seed() -> int:
    # Drawn from torch's default generator, so torch.manual_seed reproduces the dropout mask.
    return int(torch.randint(0, _SEED_LIMIT, (1,)).item())


def flash_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """FlashAttention-2 (Triton): softmax(q @ k^T * scale) @ v without an N x N tensor.

    Caveat: on the CPU this runs only through Triton's interpreter (``TRITON_INTERPRET=1`` set
    before ``hf_flashattn`` is imported), which is slow; it is meant for tests.

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
        q: (batch_size, heads_q, seqlen_q, head_dim), float16 / bfloat16 / float32, any strides.
        k: (batch_size, heads_kv, seqlen_k, head_dim), same dtype and device as q.
        v: (batch_size, heads_kv, seqlen_k, head_dim), same dtype and device as q.
        causal: bool, default False. Apply the bottom-right aligned causal mask.
        scale: float, default ``head_dim ** -0.5``. Multiplies q @ k^T before the softmax.
        dropout_p: float in [0, 1), default 0. Dropout on the attention probabilities, drawn
            in the kernel (Philox) from a seed taken from torch's default generator.
        key_padding_mask: (batch_size, seqlen_k) bool, default None. True = attend. A query
            row with no key to attend to gives zeros (and zero gradients), never NaN.
        return_lse: bool, default False. Also return the log-sum-exp of the scaled scores.

    Return:
        out: (batch_size, heads_q, seqlen_q, head_dim), dtype of q. Stored as (batch, seq,
            heads, dim) in memory, so ``out.transpose(1, 2)`` is contiguous.
        lse (only with return_lse=True): (batch_size, heads_q, seqlen_q) float32, natural log;
            -inf for rows that attend to nothing.
    """
    _check_inputs(q, k, v, key_padding_mask, dropout_p, scale)
    head_dim = q.shape[-1]
    scale = float(head_dim**-0.5 if scale is None else scale)
    # The kernels take any batch/head/seq strides; only the last dim must be dense.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.contiguous()
    seed = _new_seed() if dropout_p > 0.0 else 0
    out, lse = _fwd(q, k, v, key_padding_mask, bool(causal), scale, float(dropout_p), seed)
    return (out, lse) if return_lse else out


def dropout_keep_mask(
    seed: int, batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, dropout_p: float, device
) -> torch.Tensor:
    """Test-only hook: the (batch, heads_q, seqlen_q, seqlen_k) bool keep-mask the kernels
    draw for ``seed``. Materialises N x N: for checking dropout, never for the hot path."""
    mask = torch.empty((batch, heads_q, seqlen_q, seqlen_k), dtype=torch.int8, device=device)
    block = 64 if INTERPRETING else 128
    dropout_mask_kernel[(triton_cdiv(seqlen_q, block), batch * heads_q)](
        mask, dropout_p, seed, seqlen_q, seqlen_k, BLOCK_M=block, BLOCK_N=block
    )
    return mask.bool()
