"""Packed sequences: several sequences laid end to end along one row's sequence dimension.

Two forms of the same boundaries:

- ``cu_seqlens``, what callers give (flash-attn's and transformers' ``cu_seq_lens_*``): the
  cumulative lengths ``[0, len_0, len_0 + len_1, ..., seqlen]``, one row shared by the whole
  batch, or one row per batch element (``(batch, n + 1)``; rows with fewer sequences repeat
  their last value: empty sequences).
- token bounds, what the kernels read: an int32 ``(batch | 1, 2, seqlen)`` tensor holding, for
  each token, the start of its sequence and then the end. A query block then finds the keys
  it may see from two loads, and so does a key block its queries (kernels/fwd.py).

The conversions are tensor ops on the device; only the check of the values given reads them (a
host sync), once per boundaries tensor and never while compiling.
"""

from __future__ import annotations

import weakref

import torch


def cu_seqlens_from_starts(starts_here: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen + 1) int32 cu_seqlens from a (batch, seqlen) bool tensor that is True
    at every token starting a sequence (the first token always does)."""
    batch, seqlen = starts_here.shape
    starts_here = starts_here.clone()
    starts_here[:, 0] = True
    tokens = torch.arange(seqlen, device=starts_here.device, dtype=torch.int32)
    # the starts in order, then seqlen for every token that starts nothing
    starts = torch.where(starts_here, tokens, seqlen).sort(dim=-1).values
    return torch.cat((starts, starts.new_full((batch, 1), seqlen)), dim=-1)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen + 1) int32 cu_seqlens of the sequences packed in each row of
    ``position_ids`` (batch, seqlen): a sequence starts wherever the position does not follow
    the previous one by 1, as transformers' ``find_packed_sequence_indices`` decides it. A row
    that is one ordinary sequence (any first position, then consecutive) stays one sequence.
    """
    starts_here = torch.zeros_like(position_ids, dtype=torch.bool)
    starts_here[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return cu_seqlens_from_starts(starts_here)


def _check_layout(cu_seqlens, batch: int, seqlen_q: int, seqlen_k: int, device) -> None:
    """The rules on cu_seqlens' type, shape and device (cheap: no value read)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if seqlen_q != seqlen_k:
        raise ValueError(
            f"cu_seqlens packs sequences along one row, so seq_q must equal seq_k; got "
            f"seq_q={seqlen_q}, seq_k={seqlen_k}"
        )
    if cu_seqlens.dim() not in (1, 2) or cu_seqlens.shape[-1] < 2:
        raise ValueError(
            f"cu_seqlens must be (num_seqs + 1,) or (batch, num_seqs + 1), at least 2 values, "
            f"got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.dim() == 2 and cu_seqlens.shape[0] != batch:
        raise ValueError(f"cu_seqlens has {cu_seqlens.shape[0]} rows but the batch is {batch}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")


def _check_values(cu_seqlens: torch.Tensor, seqlen: int) -> None:
    """The rules on cu_seqlens' values (reads them: a host sync)."""
    rows = cu_seqlens.reshape(-1, cu_seqlens.shape[-1])
    if bool((rows[:, 0] != 0).any()) or bool((rows[:, -1] != seqlen).any()):
        raise ValueError(f"cu_seqlens must run from 0 to seq_len ({seqlen}) in every row")
    if bool((rows[:, 1:] < rows[:, :-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


def token_bounds(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(batch | 1, 2, seqlen) int32: each token's sequence start, then its sequence end."""
    rows = cu_seqlens.reshape(-1, cu_seqlens.shape[-1]).to(torch.int64)
    tokens = torch.arange(seqlen, device=cu_seqlens.device).expand(rows.shape[0], -1)
    # the sequence of token t: the last boundary <= t (empty sequences are skipped over)
    seq = torch.searchsorted(rows, tokens.contiguous(), right=True) - 1
    starts = rows.gather(1, seq)
    ends = rows.gather(1, seq + 1)
    return torch.stack((starts, ends), dim=1).to(torch.int32)


# transformers hands the same cu_seqlens to every layer: check and convert it once per forward.
_last_bounds: tuple[weakref.ref, int, int, torch.Tensor] | None = None


def segment_bounds(cu_seqlens, batch: int, seqlen_q: int, seqlen_k: int, device) -> torch.Tensor:
    """The kernels' token bounds (``token_bounds``) of ``cu_seqlens``, after every rule it must
    meet (errors name it), as (batch, 2, seqlen): one row of boundaries for every batch row is
    broadcast (batch stride 0; the kernels step by the batch stride)."""
    _check_layout(cu_seqlens, batch, seqlen_q, seqlen_k, device)
    return _checked_bounds(cu_seqlens, seqlen_q).expand(batch, -1, -1)


def _checked_bounds(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """``token_bounds`` after the value rules. Read and converted once per boundaries tensor,
    remembered by identity and version; while compiling the values go unchecked (no host sync)
    and nothing is remembered, nor for inference tensors (no version counter)."""
    global _last_bounds
    if torch.compiler.is_compiling():
        return token_bounds(cu_seqlens, seqlen)
    remember = not cu_seqlens.is_inference()
    memo = _last_bounds
    if remember and memo is not None and memo[0]() is cu_seqlens:
        if memo[1:3] == (cu_seqlens._version, seqlen):
            return memo[3]
    _check_values(cu_seqlens, seqlen)
    bounds = token_bounds(cu_seqlens, seqlen)
    if remember:
        _last_bounds = (weakref.ref(cu_seqlens), cu_seqlens._version, seqlen, bounds)
    return bounds
