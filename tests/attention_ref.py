"""Reference attention for the tests, and the tolerance rule.

``attention_ref`` is plain PyTorch (matmul, softmax, matmul) with the same semantics as
``flash_attn``: GQA by head index, bottom-right causal alignment, key padding (in causal
self-attention the padded queries too), rows that see no key give zeros. Run on upcast inputs
it is the reference; run in the inputs' own dtype it is "PyTorch's own low-precision
attention", whose error sets our tolerance. ``sdpa_lowp`` is PyTorch's other one:
``F.scaled_dot_product_attention`` at its default dispatch, what ``attn_implementation="sdpa"``
runs (FlashAttention-2 or cuDNN on a GPU).
"""

import torch
import torch.nn.functional as F


def attention_ref(
    q,
    k,
    v,
    *,
    causal=False,
    scale=None,
    key_padding_mask=None,
    cu_seqlens=None,
    sliding_window=None,
    softcap=None,
    dropout_keep=None,
    dropout_p=0.0,
    upcast=True,
):
    """q (b, hq, sq, d), k/v (b, hkv, sk, d); dropout_keep (b, hq, sq, sk) bool or None;
    cu_seqlens (n + 1,) or (b, n + 1): packed sequences, each attending only within itself;
    sliding_window: query i sees keys j > i + sk - sq - sliding_window too (and, not causal,
    j < i + sk - sq + sliding_window); softcap: scores capped as softcap * tanh(s / softcap)."""
    dtype_out = q.dtype
    if upcast:
        # float64 wherever affordable; float32 on the GPU is enough for 16-bit inputs
        lowp_input = q.dtype in (torch.float16, torch.bfloat16)
        ref_dtype = torch.float32 if q.device.type == "cuda" and lowp_input else torch.float64
        q, k, v = q.to(ref_dtype), k.to(ref_dtype), v.to(ref_dtype)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q * scale) @ k.transpose(-1, -2)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    visible = _visible(q, k, causal, key_padding_mask, cu_seqlens, sliding_window)
    empty_row = ~visible.any(-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(empty_row, 0.0)
    probs = torch.softmax(scores.float() if not upcast else scores, dim=-1).to(scores.dtype)
    probs = probs.masked_fill(empty_row, 0.0)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(empty_row[..., 0], float("-inf"))
    if dropout_keep is not None:
        probs = probs.masked_fill(~dropout_keep, 0.0) / (1.0 - dropout_p)
    out = probs @ v
    return out.to(dtype_out) if not upcast else out, lse


def sdpa_lowp(q, k, v, *, causal=False, scale=None, key_padding_mask=None):
    """``F.scaled_dot_product_attention`` on the inputs as they are, with the same semantics as
    ``attention_ref``: no mask where every key is visible (so the flash / cuDNN kernels serve
    it, as in a model), a boolean mask otherwise; rows that see no key zeroed."""
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    mask, is_causal = None, False
    if key_padding_mask is not None or (causal and seqlen_q != seqlen_k):
        mask = _visible(q, k, causal, key_padding_mask, None)
    elif causal:
        is_causal = True  # top-left and bottom-right alignment agree at seqlen_q == seqlen_k
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
    )
    if mask is not None:
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return out


def _visible(q, k, causal, key_padding_mask, cu_seqlens, sliding_window=None):
    """(b, 1, sq, sk) bool: which keys each query sees (bottom-right causal alignment)."""
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril(seqlen_k - seqlen_q)
    if sliding_window is not None:
        visible = visible.triu(seqlen_k - seqlen_q - sliding_window + 1)
        if not causal:  # bidirectional: as far on the other side
            visible = visible.tril(seqlen_k - seqlen_q + sliding_window - 1)
    visible = visible.expand(q.shape[0], 1, seqlen_q, seqlen_k)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
        if causal and seqlen_q == seqlen_k:
            # causal self-attention: the mask marks the padded queries too, whose rows give zeros
            visible = visible & key_padding_mask[:, None, :, None]
    if cu_seqlens is not None:
        sequence = _sequence_ids(cu_seqlens, q.shape[0], seqlen_q).to(q.device)
        visible = visible & (sequence[:, None, :, None] == sequence[:, None, None, :])
    return visible


def _sequence_ids(cu_seqlens, batch, seqlen):
    """(batch, seqlen): which packed sequence each token belongs to, from the boundaries one by
    one (plain Python: independent of the op's own conversion)."""
    rows = cu_seqlens.reshape(-1, cu_seqlens.shape[-1]).tolist()
    ids = torch.empty(len(rows), seqlen, dtype=torch.long)
    for r, bounds in enumerate(rows):
        for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            ids[r, start:end] = n
    return ids.expand(batch, -1)


def max_err(a, b) -> float:
    err = (a.double() - b.double()).abs()
    # NaN never passes: make it the largest possible error
    return float("inf") if torch.isnan(err).any() else err.max().item()


def assert_close_to_ref(name, ours, ref, torch_lowp, floor):
    """max|ours - ref| <= 2 * max|torch_lowp - ref| + floor, NaN never passes.

    torch_lowp is one result, or several of PyTorch's own low-precision attentions (its matmul-
    softmax path and its fused kernels): the bound is then the larger error of those that give
    no NaN, as either is what a user of PyTorch gets."""
    err = max_err(ours, ref)
    baselines = torch_lowp if isinstance(torch_lowp, (list, tuple)) else [torch_lowp]
    finite = [e for e in (max_err(t, ref) for t in baselines) if e != float("inf")]
    torch_err = max(finite, default=float("inf"))
    # a NaN in PyTorch's own result would make the bound infinite, and the check meaningless
    assert torch_err != float("inf"), f"{name}: PyTorch's low-precision attention gave NaN"
    bound = 2 * torch_err + floor
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g}"
