"""The transformers hook: ``attn_implementation="triton_attention"``.

Three pieces, registered together by :func:`register`:

* :func:`attention_mask` (``AttentionMaskInterface``) builds the mask in the cheapest form the
  kernels take. transformers passes a function registered only in ``AttentionInterface`` no mask
  at all, which would silently drop padding.
* :func:`attention_forward` (``AttentionInterface``) normalises whatever mask it is given to
  (key-padding mask, causal flag, number of keys) and calls :func:`hf_flashattn.flash_attn`.
* Calls the kernels cannot serve (see :func:`hf_flashattn.support.unsupported_reason`) run the
  model's own ``eager_attention_forward`` with an additive mask, warning once per reason.

Mask forms, by what the attention function receives:

==========================  ======================================================================
``None``                    no padding; causal as the module says (``is_causal``)
2-D ``(batch, kv_len)``     bool key-padding mask (True = attend) over the first ``kv_len`` keys;
                            causal as the module says, bottom-right aligned to those keys; keys
                            from ``kv_len`` on (unused static-cache slots) are never attended
4-D ``(batch, 1, 1, k)``    key padding without causality (bidirectional masks); bool: known from
                            the shape, no value read; additive float: checked as below
4-D ``(batch, 1, q, k)``    anything else, bool or additive float, with eager's meaning: checked
                            once per mask tensor for being key padding + causal, else eager runs
                            (the check reads values: under torch.compile, a graph break)
2-D ``(batch, k + 1)``      int32: packed sequences, each row's cu_seqlens (our mask function's
                            form for transformers' packed-sequence mask; one longer than the
                            keys, which no padding mask is); causal within each
==========================  ======================================================================

The 2-D form is what transformers' own FlashAttention-2 mask function returns, so models that
support FA2 already pass it through untouched. Our mask function returns the full 4-D mask only
for patterns that are not plain causal or bidirectional by its arguments nor packed sequences
(sliding windows and chunks narrower than the keys, or/and overlays); those cost
O(seq_q * seq_k) once per forward, as in SDPA. Packed sequences are read from the mask function
and checked pair by pair, in slices of query rows: O(seq^2) work but O(seq) memory, once per
forward.
"""

from __future__ import annotations

import collections
import sys
import warnings
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import (
    and_masks,
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
)

from .op import flash_attn
from .packing import cu_seqlens_from_starts, token_bounds
from .support import narrower_window, sliding_window, unsupported_reason

ATTN_IMPLEMENTATION = "triton_attention"

# Additive-mask entries at or below this are masked: exp() of them underflows to exactly 0 in a
# float32 softmax. Covers -inf, finfo(dtype).min (transformers) and -1e4 (older BERT-style masks).
_MASKED_AT_OR_BELOW = -1.0e4


class EagerFallbackWarning(UserWarning):
    """An attention call ran eager attention because the kernels cannot serve it."""


class KernelMask(NamedTuple):
    """An attention mask in the form the kernels take.

    key_padding_mask: (batch_size, kv_len) bool, True = attend; None when every key is attended.
    causal: bottom-right aligned causal mask over the first ``kv_len`` keys.
    kv_len: keys ``[0, kv_len)`` take part; the rest (unused static-cache slots) never do.
    cu_seqlens: (batch_size, num_seqs + 1) int32 packed sequences per row (``flash_attn``'s
        argument), or None.
    key_lengths: (batch_size,) int32, in place of ``key_padding_mask`` (then None) where every
        row keeps a prefix of its keys (right padding): each row's count.
    """

    key_padding_mask: torch.Tensor | None
    causal: bool
    kv_len: int
    cu_seqlens: torch.Tensor | None = None
    key_lengths: torch.Tensor | None = None


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


# ---------------------------------------------------------------------------- mask function
def _base_pattern(mask_function: Callable, kv_length: int, kwargs: dict) -> Callable | None:
    """``causal_mask_function`` or ``bidirectional_mask_function`` when the call's pattern is that
    one (before padding), else None.

    Beyond the two functions themselves, this reads the arguments as transformers' own
    ``sdpa_mask`` does when it skips building a mask: ``allow_is_causal_skip`` /
    ``allow_is_bidirectional_skip`` say the pattern is causal / bidirectional without overlays
    (or/and mask functions, packed sequences and blocks turn them off), restricted to a local
    window (sliding window, chunk) of ``local_size`` keys, which changes nothing while
    ``kv_length < local_size``. Sliding-window models thus need no (q, k) mask while the window
    covers every key, and the decision reads no tensor, so it holds under torch.compile too.
    """
    if mask_function is causal_mask_function or mask_function is bidirectional_mask_function:
        return mask_function
    local_size = kwargs.get("local_size")
    if local_size is None or kv_length >= local_size:
        return None
    if kwargs.get("allow_is_causal_skip"):
        return causal_mask_function
    if kwargs.get("allow_is_bidirectional_skip"):
        return bidirectional_mask_function
    return None


def attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The ``AttentionMaskInterface`` function for ``triton_attention``.

    Called by transformers' ``create_causal_mask`` / ``create_bidirectional_mask`` /
    ``create_sliding_window_causal_mask`` with the same arguments as ``sdpa_mask``. Plain causal
    and plain bidirectional masks, and sliding windows that cover every key, are recognised from
    the arguments (see :func:`_base_pattern`) and never materialised as (seq_q, seq_k); anything
    else is built by ``sdpa_mask``.

    Arguments:
        batch_size, q_length, kv_length: sizes of the attention call.
        q_offset: position of the first query (a tensor for static caches).
        kv_offset: position of the first key.
        mask_function: transformers' mask pattern, (batch, head, q_idx, kv_idx) -> bool.
        attention_mask: (batch_size, >= kv_offset + kv_length or shorter) bool padding mask,
            True = real token; None without padding.
        kwargs: the rest of ``sdpa_mask``'s arguments (``local_size``, ``allow_is_causal_skip``,
            ``allow_is_bidirectional_skip``, ``device``, ...).

    Return:
        ``None``: causal, no padding, keys aligned to the queries (the common unpadded case).
        (batch_size, kv_len) bool: key padding over the first ``kv_len <= kv_length`` keys, causal.
        (batch_size, 1, 1, kv_length) bool: key padding, bidirectional.
        (batch_size, 1, q_length, kv_length) bool: a pattern the kernels may not express.
    """
    device = attention_mask.device if attention_mask is not None else kwargs.get("device", "cpu")
    padding = None
    if attention_mask is not None:
        padding = attention_mask.to(torch.bool)
        if (short := kv_offset + kv_length - padding.shape[-1]) > 0:
            # As transformers does: positions the 2-D mask does not cover are padding.
            padding = nn.functional.pad(padding, (0, short))
        padding = padding[:, kv_offset : kv_offset + kv_length]

    base = _base_pattern(mask_function, kv_length, kwargs)
    if base is bidirectional_mask_function:
        # Never None: the module may be a causal decoder run bidirectionally
        # (config.is_causal=False), and None would mean "causal as the module says". The
        # (batch, 1, 1, kv_length) bool form means key padding by its shape alone (kernel_mask
        # reads no value of it); .all() syncs the host, so when compiling keep the padding.
        if padding is not None and (_tracing() or not bool(padding.all())):
            return padding[:, None, None, :]
        unpadded = torch.ones((batch_size, 1, 1, kv_length), dtype=torch.bool, device=device)
        _remember(unpadded, q_length, kv_length, KernelMask(None, False, kv_length))
        return unpadded

    if base is causal_mask_function:
        # Query i (0-based in this call) sees keys j <= i + shift.
        shift = q_offset - kv_offset
        if not isinstance(shift, torch.Tensor) and shift == kv_length - q_length:
            # Bottom-right alignment, as the kernels do it (no cache, or a dynamic cache).
            if padding is None:
                return None
            return _key_padding(padding, q_length)
        if q_length == 1:
            # One query (static-cache decoding): causality is a prefix of the keys; fold it into
            # the padding vector with tensor ops so a compiled decode step never syncs.
            visible = torch.arange(kv_length, device=device) <= shift
            return visible.expand(batch_size, -1) if padding is None else padding & visible
        # Static-cache prefill: keys past the last query's position are empty slots; cutting them
        # off restores the bottom-right alignment (one host sync, on prefill only).
        kv_len = q_length + int(shift)
        if 0 < kv_len <= kv_length:
            if padding is None:
                return torch.ones((batch_size, kv_len), dtype=torch.bool, device=device)
            return padding[:, :kv_len]

    local_size = kwargs.get("local_size")
    windowed = local_size is not None and kv_length >= local_size  # no window in the kernels
    if attention_mask is None and not kwargs.get("use_vmap") and not windowed:
        packed = _packed_sequences(
            mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, device
        )
        if packed is not None:
            return packed

    kwargs = {
        k: v
        for k, v in kwargs.items()
        if k not in ("allow_is_causal_skip", "allow_is_bidirectional_skip")
    }
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        **kwargs,
    )


def _key_padding(padding: torch.Tensor, q_length: int) -> torch.Tensor | None:
    """A causal call's (batch, kv_len) padding mask as :func:`attention_mask` returns it: None
    when every key is kept (one host sync). Without a cache (training, a first prefill) the same
    sync also reads whether each row keeps a prefix of its keys (a padding collator's right
    padding); then every layer's call finds the rows' lengths memoised with the mask
    (:func:`kernel_mask`) and the kernels read no mask. Decoding steps skip that: the split-KV
    kernel reads a mask either way. When compiling, the mask as it is (no sync, no graph
    break)."""
    if _tracing():
        return padding
    kv_len = padding.shape[-1]
    if q_length != kv_len:
        return None if bool(padding.all()) else padding
    every_key, prefixes = torch.stack(
        (padding.all(), (padding[:, 1:] <= padding[:, :-1]).all())
    ).tolist()
    if every_key:
        return None
    if prefixes:
        lengths = padding.sum(-1, dtype=torch.int32)
        _remember(padding, q_length, kv_len, KernelMask(None, True, kv_len, None, lengths))
    return padding


# transformers' and_masks closures share one code object: that a mask function is one can be
# seen while compiling (its closure cannot)
_AND_MASKS_CODE = and_masks(causal_mask_function).__code__

# Query rows of a mask function evaluated at once while checking for packed sequences: bounds
# that check's memory to batch x _CHECK_ROWS x seq booleans.
_CHECK_ROWS = 256


def _packed_sequences(
    mask_function: Callable,
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor,
    kv_offset: int,
    device,
) -> torch.Tensor | None:
    """Packed sequences (transformers' mask when position_ids restart: causal within each
    sequence of a row), as the (batch_size, seq + 1) int32 cu_seqlens of each row; None for
    any other pattern.

    Read from the mask function itself, evaluated on index tensors as ``sdpa_mask`` does: a
    sequence starts at each token that may not see the token before it; then every (query,
    key) pair is checked against causal-within-sequence, _CHECK_ROWS query rows at a time
    (O(seq^2) work once per forward, O(seq) memory per row of the batch), so no other pattern is
    ever taken for it.

    While compiling no value can be read, and transformers cannot tell either: every compiled
    forward without a cache (training) gets causal AND-ed with a packed-sequence mask, packed or
    not. Then an ``and_masks`` combination is taken as packing (the other mask functions, or
    and-ed ones too, run eager as before) and the same check becomes a device-side assert.
    """
    if isinstance(q_offset, torch.Tensor):
        return None
    if _tracing() and getattr(mask_function, "__code__", None) is not _AND_MASKS_CODE:
        return None
    if q_offset != 0 or kv_offset != 0 or q_length != kv_length or q_length < 2:
        return None
    batch = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    head = torch.zeros((1, 1, 1, 1), dtype=torch.long, device=device)
    tokens = torch.arange(kv_length, device=device)
    try:
        sees_previous = mask_function(
            batch, head, tokens[1:].view(1, 1, -1, 1), tokens[:-1].view(1, 1, -1, 1)
        )
        starts_here = torch.zeros((batch_size, kv_length), dtype=torch.bool, device=device)
        starts_here[:, 1:] = ~torch.as_tensor(sees_previous, device=device).view(-1, kv_length - 1)
        if not _tracing() and not bool(starts_here.any()):
            return None  # one sequence per row: not packing (sdpa_mask builds what it is)
        cu_seqlens = cu_seqlens_from_starts(starts_here)
        start = token_bounds(cu_seqlens, kv_length)[:, 0]
        cols = tokens.view(1, 1, 1, -1)
        agrees = torch.ones((), dtype=torch.bool, device=device)
        for first in range(0, q_length, _CHECK_ROWS):
            rows = tokens[first : first + _CHECK_ROWS].view(1, 1, -1, 1)
            allowed = mask_function(batch, head, rows, cols)
            expected = (cols <= rows) & (cols >= start[:, None, first : first + _CHECK_ROWS, None])
            agrees = agrees & (allowed == expected).all()
    except (IndexError, RuntimeError, TypeError, ValueError):
        return None  # a mask function that takes no index tensors: not transformers' packing
    if _tracing():
        torch._assert_async(
            agrees,
            "hf_flashattn: under torch.compile, a mask combined with and_masks was taken for "
            "packed sequences and is not; run this model uncompiled, or with a cache",
        )
    elif not bool(agrees):
        return None
    return cu_seqlens


# ---------------------------------------------------------------------------- mask normalisation
def _causal_pattern(
    q_len: int, kv_len: int, device, window: int | None = None, causal: bool = True
) -> torch.Tensor:
    """(q_len, kv_len) bool, bottom-right aligned: query i sees keys j <= i + kv_len - q_len,
    and with a sliding window only those j > i + kv_len - q_len - window; not causal, the
    window's keys on both sides (j < i + kv_len - q_len + window), as flash_attn's."""
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    cols = torch.arange(kv_len, device=device)[None, :]
    if window is None:
        return cols <= rows
    ahead = cols <= rows if causal else cols < rows + window
    return ahead & (cols > rows - window)


def _analyse_4d(
    mask: torch.Tensor, q_len: int, k_len: int, window: int | None = None
) -> KernelMask | None:
    """Express a 4-D (batch | 1, heads | 1, q_len | 1, k_len) mask as key padding + causal
    (within the attention call's sliding ``window``, if one narrower than the keys is given)."""
    if mask.shape[-1] != k_len or mask.shape[-2] not in (1, q_len):
        return None
    if mask.dtype == torch.bool and mask.shape[1:3] == (1, 1):
        # Key padding by its shape alone (our mask function's bidirectional form): no value is
        # read, so a compiled model keeps one graph.
        return KernelMask(mask[:, 0, 0, :], False, k_len)
    if _tracing():
        # What remains needs the mask's values (a (q, k) pattern built by another
        # implementation's mask function, e.g. a model loaded with sdpa and then patched, under
        # transformers 5.17): reading them would break the graph, so eager attention runs.
        return None
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask == 0
        if not bool((allowed | (mask <= _MASKED_AT_OR_BELOW)).all()):
            return None  # a real bias, not just 0 / -inf
    if mask.shape[-2] == 1:
        # One row for all queries: key padding only. With a single query causality is void too.
        kpm = allowed[:, 0, 0, :]
        if not bool((allowed == kpm[:, None, None, :]).all()):  # heads disagree
            return None
        return KernelMask(None if bool(kpm.all()) else kpm, False, k_len)
    result = _match(allowed, q_len, k_len, window)
    if result is None:
        # Keys no query sees may be unused slots (a static cache's tail, with the causal mask
        # written with offsets): cutting them off restores the bottom-right alignment.
        seen = allowed.flatten(0, 2).any(0)
        kv_len = int(seen.nonzero().max()) + 1 if bool(seen.any()) else k_len
        if kv_len < k_len:
            result = _match(allowed[..., :kv_len], q_len, kv_len, window)
    return result


def _match(
    allowed: torch.Tensor, q_len: int, kv_len: int, window: int | None = None
) -> KernelMask | None:
    """Whether a 4-D bool mask equals key padding (+ bottom-right causal), and which. With a
    sliding window narrower than the keys: key padding within that window, causal (Mistral) or
    on both sides (ModernBERT's local layers), or None."""
    if narrower_window(window, q_len, kv_len) is not None:
        # The padding of keys no query sees does not matter (the window hides them): take the
        # keys some query sees as the padding row.
        kpm = allowed[:, 0].any(-2)
        padded = kpm[:, None, None, :]
        for causal in (True, False):
            pattern = _causal_pattern(q_len, kv_len, allowed.device, window, causal)
            if bool((allowed == (padded & pattern)).all()):
                return KernelMask(None if bool(kpm.all()) else kpm, causal, kv_len)
        return None
    # With bottom-right causality the last query sees every key, so its row is the padding.
    kpm = allowed[:, 0, -1, :]
    padded = kpm[:, None, None, :]
    if bool((allowed == (padded & _causal_pattern(q_len, kv_len, allowed.device))).all()):
        causal = True
    elif bool((allowed == padded).all()):
        causal = False
    else:
        return None
    return KernelMask(None if bool(kpm.all()) else kpm, causal, kv_len)


# transformers hands the same mask tensor to every layer: analyse it once per forward. The memo
# holds the masks weakly and keeps only a compact copy of any padding row, never a view: a view
# would keep a (batch, 1, seq, seq) mask allocated after the forward. The last few masks: models
# with sliding-window and full layers (Gemma 2, gpt-oss) make one of each per forward.
_ANALYSES_KEPT = 4
_analyses: collections.deque[tuple[weakref.ref, int, int, int, int | None, KernelMask | None]] = (
    collections.deque(maxlen=_ANALYSES_KEPT)
)


def _remember(
    mask: torch.Tensor, q_len: int, k_len: int, result: KernelMask | None, window=None
) -> KernelMask | None:
    """Memoise ``result`` for ``mask`` (not while tracing, nor for inference tensors, which have
    no version counter) and return what the memo holds, so every call sees the same object."""
    if _tracing() or mask.is_inference():
        return result
    if result is not None and result.key_padding_mask is not None:
        compact = result.key_padding_mask.clone(memory_format=torch.contiguous_format)
        result = result._replace(key_padding_mask=compact)
    _analyses.append((weakref.ref(mask), mask._version, q_len, k_len, window, result))
    return result


def kernel_mask(
    attention_mask: torch.Tensor | None,
    causal: bool,
    q_len: int,
    k_len: int,
    window: int | None = None,
) -> KernelMask | None:
    """Normalise an attention mask (any form in the module docstring) for the kernels.

    Arguments:
        attention_mask: None, (batch_size, kv_len) bool, (batch_size, kv_len + 1) int32 packed
            sequences' cu_seqlens, or 4-D (batch, 1, seqlen_q | 1, seqlen_k) bool (True =
            attend) or additive float (0 = attend).
        causal: the module's causality, used for None and 2-D masks (4-D masks carry their own).
        q_len, k_len: seqlen_q and seqlen_k of the attention call.
        window: the call's sliding window (the module's), or None. A 4-D mask then matches
            key padding + causal within it (transformers' sliding-window layers build one).

    Return:
        A :class:`KernelMask`, or None when the mask is not key padding + causal (within the
        window).
    """
    if attention_mask is None:
        return KernelMask(None, causal, k_len)
    if attention_mask.dim() == 2 and attention_mask.dtype == torch.int32:
        # our mask function's packed sequences: each row's cu_seqlens, causal within each
        if q_len != k_len or attention_mask.shape[-1] != k_len + 1:
            raise ValueError(
                f"a packed-sequence mask (batch, seq + 1) needs seq_q == seq_k; got mask "
                f"{tuple(attention_mask.shape)} for seq_q={q_len}, seq_k={k_len}"
            )
        return KernelMask(None, True, k_len, attention_mask)
    if attention_mask.dim() == 2:
        if attention_mask.shape[-1] > k_len:
            raise ValueError(
                f"2-D attention_mask covers {attention_mask.shape[-1]} keys, but there are {k_len}"
            )
        kv_len = attention_mask.shape[-1]
        # right padding, seen by attention_mask(): the rows' lengths (no memo while tracing)
        known = None if _tracing() else _recalled(attention_mask, q_len, kv_len, None)
        if known is not None:
            return KernelMask(None, causal, kv_len, key_lengths=known.key_lengths)
        return KernelMask(attention_mask.to(torch.bool), causal, kv_len)
    if attention_mask.dim() != 4:
        raise ValueError(
            f"attention_mask must be None, 2-D or 4-D, got shape {tuple(attention_mask.shape)}"
        )
    # No memo while tracing (a graph has no tensor identity) nor for inference tensors (no version
    # counter to notice in-place edits).
    if _tracing() or attention_mask.is_inference():
        return _analyse_4d(attention_mask, q_len, k_len, window)
    known = _recalled(attention_mask, q_len, k_len, window)
    if known is not None:
        return known
    result = _analyse_4d(attention_mask, q_len, k_len, window)
    return _remember(attention_mask, q_len, k_len, result, window)


def _recalled(mask: torch.Tensor, q_len: int, k_len: int, window) -> KernelMask | None:
    """What :func:`_remember` holds for ``mask`` (unchanged since) and these sizes, or None."""
    for memo in reversed(_analyses):
        if memo[0]() is mask and memo[1:5] == (mask._version, q_len, k_len, window):
            return memo[5]
    return None


# ---------------------------------------------------------------------------- eager fallback
def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _generic_eager_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """Eager attention for modules whose modeling file has no ``eager_attention_forward``."""
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _eager_function(module: nn.Module) -> Callable:
    modeling = sys.modules.get(type(module).__module__)
    return getattr(modeling, "eager_attention_forward", _generic_eager_attention)


def _additive_mask(
    attention_mask: torch.Tensor | None,
    causal: bool,
    query: torch.Tensor,
    key: torch.Tensor,
    sliding_window: int | None,
) -> torch.Tensor | None:
    """The (batch, 1, seqlen_q, seqlen_k) additive mask eager attention takes (as eager_mask
    builds it), or None when nothing is masked."""
    dtype = query.dtype
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool:
            return attention_mask
        return torch.where(
            attention_mask,
            torch.zeros((), dtype=dtype, device=query.device),
            torch.finfo(dtype).min,
        )
    q_len, k_len = query.shape[2], key.shape[2]
    km = kernel_mask(attention_mask, causal, q_len, k_len)
    cols = torch.arange(k_len, device=query.device)
    allowed = (cols < km.kv_len)[None, :].expand(q_len, -1)
    if km.cu_seqlens is not None:
        # packed sequences: each query sees its own sequence's keys only
        start, end = token_bounds(km.cu_seqlens, k_len).unbind(1)
        allowed = (cols >= start[:, :, None]) & (cols < end[:, :, None])
    if km.causal or sliding_window is not None:
        rows = torch.arange(q_len, device=query.device)[:, None] + (km.kv_len - q_len)
        if km.causal:
            allowed = allowed & (cols[None, :] <= rows)
        if sliding_window is not None:
            allowed = allowed & (cols[None, :] > rows - sliding_window)
            if not km.causal:  # bidirectional: as far on the other side
                allowed = allowed & (cols[None, :] < rows + sliding_window)
    allowed = allowed[:, None] if allowed.dim() == 3 else allowed[None, None]
    if km.key_padding_mask is not None:
        kpm = nn.functional.pad(km.key_padding_mask, (0, k_len - km.kv_len))
        allowed = allowed & kpm[:, None, None, :]
    if bool(allowed.all()):
        return None
    return torch.where(
        allowed, torch.zeros((), dtype=dtype, device=query.device), torch.finfo(dtype).min
    )


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    # warnings.warn breaks a compiled graph (fullgraph=True fails on it): while tracing, stay
    # silent; the same model run uncompiled names the reason.
    if reason not in _warned and not _tracing():
        _warned.add(reason)
        warnings.warn(
            f"hf_flashattn: running eager attention: {reason}", EagerFallbackWarning, stacklevel=3
        )


# ---------------------------------------------------------------------------- attention function
def _autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in autocast's dtype while autocast is on for their device, else as given.

    sdpa is on autocast's lower-precision list and transformers' FA2 path casts to the target
    dtype; the kernels take the same route. It matters with float32 weights under autocast
    (``Trainer(bf16=True)``): rotary embeddings multiply bf16 q/k by float32 cos/sin, so q and k
    arrive in float32 while v is bf16. Like autocast, float64 is left alone (and runs eager).
    """
    device_type = tensors[0].device.type
    # Only the kernels' devices: asking about others raises. (torch.amp.is_autocast_available
    # would say so too, but dynamo on torch 2.11 cannot trace it and breaks the graph there.)
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors
    )


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``AttentionInterface`` function for ``triton_attention``.

    Grouped-query attention: ``heads_q`` must be a multiple of ``heads_kv``; K/V go to the kernels
    unexpanded. Causality comes from ``kwargs["is_causal"]`` if given, else ``module.is_causal``
    (default True), and is bottom-right aligned, as decoding with a KV cache needs. Under
    autocast, query/key/value are cast to its dtype first (as sdpa's are), and so is the output.

    Arguments:
        module: the attention module (reads ``is_causal``, ``training``, ``sliding_window``).
        query: (batch_size, heads_q, seqlen_q, head_dim).
        key: (batch_size, heads_kv, seqlen_k, head_dim).
        value: (batch_size, heads_kv, seqlen_k, head_dim).
        attention_mask: None, 2-D or 4-D, in any form of the module docstring.
        scaling: float, default ``head_dim ** -0.5``. Multiplies q @ k^T (GPT-2 passes its own).
        dropout: float, default 0. Dropout probability (transformers passes 0 unless training).
        kwargs: other keyword arguments from the model: ``sliding_window`` (causal, or
            bidirectional with ``is_causal`` False: the kernels take both); ``softcap`` (Gemma
            2's logit soft-capping); ``s_aux`` (attention sinks, gpt-oss's: one logit per query
            head that joins each row's softmax and contributes no value);
            ``output_attentions`` and ``position_bias`` send the call to eager attention.

    Return:
        attn_output: (batch_size, seqlen_q, heads_q, head_dim), contiguous.
        attn_weights: None, or (batch_size, heads_q, seqlen_q, seqlen_k) when eager ran.
    """
    query, key, value = _autocast_inputs(query, key, value)
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    q_len, k_len = query.shape[2], key.shape[2]
    window = narrower_window(sliding_window(module, kwargs), q_len, k_len)
    km = kernel_mask(attention_mask, causal, q_len, k_len, window)
    reason = unsupported_reason(
        module,
        query,
        key,
        value,
        kwargs,
        mask_expressible=km is not None,
    )
    if reason is not None:
        _warn_once(reason)
        mask = _additive_mask(attention_mask, causal, query, key, sliding_window(module, kwargs))
        return _eager_function(module)(
            module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if km.kv_len < k_len:
        key, value = key[:, :, : km.kv_len], value[:, :, : km.kv_len]
    kpm = km.key_padding_mask
    if kpm is not None and kpm.shape[0] != query.shape[0]:
        kpm = kpm.expand(query.shape[0], -1)  # a 4-D mask broadcast over the batch
    cu_seqlens = km.cu_seqlens
    if cu_seqlens is None and attention_mask is None:
        cu_seqlens = _flash_kwargs_packing(kwargs, query.shape[0], q_len, k_len)
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor):
            raise TypeError(
                f"s_aux must be a tensor of attention sinks, got {type(sinks).__name__}"
            )
        if tuple(sinks.shape) != (query.shape[1],):
            raise ValueError(
                f"s_aux must hold one attention sink per query head, shape ({query.shape[1]},); "
                f"got {tuple(sinks.shape)}"
            )
    out = flash_attn(
        query,
        key,
        value,
        causal=km.causal,
        scale=scaling,
        dropout_p=dropout,
        key_padding_mask=kpm,
        key_lengths=km.key_lengths,
        cu_seqlens=cu_seqlens,
        sliding_window=narrower_window(window, q_len, km.kv_len),  # unused cache slots cut
        softcap=kwargs.get("softcap"),
        return_lse=sinks is not None,
        out_layout="bshd",
    )
    if sinks is not None:
        return _with_sinks(*out, sinks), None
    return out, None


def _with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """The attention output with sinks, from the kernels' output without them: a sink adds
    exp(sink) to each row's softmax denominator and nothing to its sum of values, so the row
    scales by exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink) (what transformers'
    flex_attention path does with flex's lse). The backward reaches q and k through lse (the
    kernels take its gradient) and the sinks through this product. Rows with nothing to attend
    (lse -inf) stay zero. ``out`` (batch, seq_q, heads_q, head_dim), contiguous, lse (batch,
    heads_q, seq_q); returns out's shape, contiguous."""
    keep = torch.sigmoid(lse - sinks.to(lse.dtype)[None, :, None])  # (batch, heads, seq), fp32
    # in out's dtype, so autograd keeps no float32 copy
    return out * keep.transpose(1, 2).unsqueeze(-1).to(out.dtype)


# The last (cu_seq_lens_q, cu_seq_lens_k) pair found equal: transformers hands every layer the
# same kwargs, so the comparison (a host sync) runs once per forward.
_equal_cu_pair: tuple[weakref.ref, weakref.ref, int, int] | None = None


def _flash_kwargs_packing(kwargs: dict, batch: int, q_len: int, k_len: int):
    """The packed sequences transformers' FlashAttention kwargs give
    (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``): ``cu_seq_lens_q`` and
    ``cu_seq_lens_k`` over one packed row (batch 1), the same boundaries for queries and keys.
    Their ``max_length_*`` / ``max_seqlen_*`` companions are not needed: the kernels read each
    token's sequence bounds. None when absent, or when they describe anything else (the mask
    alone governs then, as in eager attention)."""
    global _equal_cu_pair
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if not isinstance(cu_q, torch.Tensor) or batch != 1 or q_len != k_len:
        return None
    if cu_k is None or cu_k is cu_q:
        return cu_q
    if cu_q.is_inference() or cu_k.is_inference():  # no version counters to memoise on
        return cu_q if not _tracing() and torch.equal(cu_q, cu_k) else None
    memo = _equal_cu_pair
    versions = (cu_q._version, cu_k._version)
    if memo is not None and memo[0]() is cu_q and memo[1]() is cu_k and memo[2:] == versions:
        return cu_q
    if _tracing() or not torch.equal(cu_q, cu_k):
        return None
    _equal_cu_pair = (weakref.ref(cu_q), weakref.ref(cu_k), *versions)
    return cu_q


def register() -> None:
    """Register ``"triton_attention"`` with transformers' ``AttentionInterface`` and
    ``AttentionMaskInterface``. Idempotent; ``import hf_flashattn`` calls it.

    Afterwards ``from_pretrained(..., attn_implementation="triton_attention")``, ``from_config``
    and ``model.set_attn_implementation("triton_attention")`` accept the name. (Names containing
    "flash" would be routed to transformers' flash-attn loader instead.)
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, attention_mask)
