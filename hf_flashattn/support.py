"""What the kernels can serve, in one place: the feature list the README draws on, and the one
predicate the transformers integration asks before each attention call.

Everything that :func:`unsupported_reason` turns away runs through the model's own eager
attention instead (see ``hf_flashattn.integration``), with one warning per reason.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .kernels import INTERPRETING
from .op import MAX_HEAD_DIM, SUPPORTED_DTYPES

try:
    # Private to transformers 5.x (the collector of hooked outputs, see _attentions_requested):
    # a release without it must not stop hf_flashattn from importing.
    from transformers.utils.output_capturing import _active_collector
except ImportError:
    _active_collector = None

SUPPORTED_FEATURES: dict[str, str] = {
    "dtypes": "float16, bfloat16 and float32 (query, key and value in one dtype)",
    "mixed precision": "under torch.autocast (Trainer(bf16=True) / (fp16=True)) the kernels run "
    "in the autocast dtype, as sdpa does",
    "head sizes": f"1 to {MAX_HEAD_DIM}",
    "grouped-query / multi-query attention": "query heads a multiple of key/value heads; "
    "K/V are never copied",
    "causal attention": "bottom-right aligned, so decoding with a KV cache (fewer queries than "
    "keys) is exact",
    "padding": "left and right padding, as a boolean key-padding mask; key blocks past a row's "
    "last kept key (or before its first) are skipped; in causal self-attention padded queries "
    "give zeros and are skipped too (as FlashAttention-2's unpadded path; eager attends there); "
    "right padding alone (a padding collator's) reaches the kernels as each row's length "
    "(`flash_attn(key_lengths=...)`), and no block reads a mask",
    "packed sequences": "several sequences in one row, each attending only within itself: "
    "recognised from transformers' packed-sequence mask (position_ids restarting, no cache; "
    "the pattern is checked pair by pair, once per forward) or from "
    "`cu_seq_lens_q`/`cu_seq_lens_k` keywords; `flash_attn(cu_seqlens=...)`; compiled, where "
    "no value can be read, transformers' and_masks combination is taken for packing and the "
    "same check runs as a device-side assert",
    "decoding": "few query rows per K/V head (one token, or a short chunk) split the keys over "
    "the GPU (flash-decoding), the query heads of a GQA group sharing each K/V load",
    "static KV caches": "unused cache slots are cut off before the kernel runs",
    "bidirectional attention": "encoders, cross-attention and decoders with config.is_causal=False",
    "sliding window": "causal (Mistral, Gemma 2/3, Qwen2) and bidirectional (ModernBERT, "
    "EmbeddingGemma) sliding windows: each query block visits only the keys in its window; "
    "transformers' windowed mask is checked once per forward, so compiled, a window narrower "
    "than the keys runs eager",
    "logit soft-capping": "Gemma 2's attn_logit_softcapping: scores capped as softcap * "
    "tanh(s / softcap) inside every kernel, the backward through the cap's derivative",
    "attention sinks": "gpt-oss's learnable per-head sinks (s_aux): the kernels' output scaled "
    "by each row's sigmoid(lse - sink), gradients to the sinks included",
    "dropout": "on the attention probabilities, drawn inside the kernel, one byte per "
    "probability as FlashAttention-2 draws it: the rate applied is the requested one rounded to "
    "1/256 (op.applied_dropout_rate), and kept values scale by exactly that rate's 1 / (1 - p)",
    "training": "forward and backward kernels; gradient checkpointing",
    "torch.compile": "the kernels are torch.library custom ops (hf_flashattn::fwd / ::bwd); "
    "causal, bidirectional and sliding-window (window covering the keys) models, padded or not, "
    "compile with fullgraph=True, also without a cache (training), where transformers adds "
    "its packed-sequence mask to every forward, and with dynamic shapes",
    "devices": "CUDA GPUs; the CPU only through Triton's interpreter (TRITON_INTERPRET=1), "
    "for tests",
    "sizes": "any batch x heads and sequence length that fits in memory (one launch-grid axis, "
    "64-bit offsets; a 128k-token causal forward + backward runs in linear memory); dropout "
    "never repeats its mask within a tensor",
    "16-bit gradients": "within twice the error of PyTorch's own 16-bit attention (its fused sdpa "
    "kernels or its matmul-softmax path). At nearly one-hot softmaxes (logits with a spread of ~10 "
    "or more) dq and dk err as FlashAttention-2's and cuDNN's do (measured equal on an H200), up "
    "to ~4x the matmul-softmax path: all three form delta = rowsum(dO * O) from the 16-bit output "
    "(an exact correction cost 7-14% of forward + backward, so it is not used: "
    "benchmarks/NOTES.md)",
    "non-finite inputs": "NaN/Inf in a query row gives NaN in that row; NaN in a key or value "
    "gives NaN in the rows that attend it (keys hidden by key_padding_mask must still be "
    "finite); never an error or a hang",
}

# Why a call runs eager attention instead. Each value is the text of the (single) warning.
FALLBACK_REASONS: dict[str, str] = {
    "output_attentions": "output_attentions=True: the kernels never materialise the attention "
    "weights",
    "dtype": "query/key/value dtype is not one of float16, bfloat16, float32, or they differ "
    "outside autocast",
    "head_size": f"head size above {MAX_HEAD_DIM}, or value head size differs from query/key "
    "head size",
    "device": "tensors are not on a CUDA GPU (the CPU needs TRITON_INTERPRET=1 before "
    "hf_flashattn is imported)",
    "position_bias": "an additive position bias",
    "mask": "the attention mask is not key padding + causal or packed sequences (an arbitrary "
    "additive bias, chunked or blockwise attention)",
}


def _attentions_requested(kwargs: Mapping[str, object]) -> bool:
    if kwargs.get("output_attentions"):
        return True
    # Some models (GPT-2) swallow output_attentions before the attention call and collect the
    # weights with hooks instead; transformers' collector then holds an "attentions" list for
    # the forward in flight.
    collected = _active_collector.get() if _active_collector is not None else None
    return isinstance(collected, dict) and "attentions" in collected


def sliding_window(module: nn.Module, kwargs: Mapping[str, object]) -> int | None:
    """The call's sliding window: ``kwargs["sliding_window"]``, else ``module.sliding_window``."""
    window = kwargs.get("sliding_window")
    if window is None:
        # Not getattr(module, name, None): a name the module lacks goes through
        # nn.Module.__getattr__, which raises and catches (~1 us on every layer's call).
        window = vars(module).get("sliding_window")
        if window is None and hasattr(type(module), "sliding_window"):  # class attr, property
            window = module.sliding_window
    return window


def narrower_window(window: int | None, q_len: int, kv_len: int) -> int | None:
    """``window`` where it hides some key, else None. Inside the window every query sees every
    key (the farthest pair is max(q_len, kv_len) - 1 apart): the window changes nothing there,
    and plain attention is exact (and cheaper: no block needs the window's mask)."""
    return window if window is not None and max(q_len, kv_len) > window else None


def unsupported_reason(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kwargs: Mapping[str, object],
    *,
    mask_expressible: bool,
) -> str | None:
    """Why the kernels cannot serve this attention call, or None when they can.

    Arguments:
        module: the attention module transformers calls the attention function for.
        query: (batch_size, heads_q, seqlen_q, head_dim).
        key: (batch_size, heads_kv, seqlen_k, head_dim).
        value: (batch_size, heads_kv, seqlen_k, head_dim_v).
        kwargs: the extra keyword arguments transformers passed to the attention function.
        mask_expressible: whether the attention mask is key padding + (bottom-right) causal,
            within the call's sliding window if it has one.

    Return:
        A value of :data:`FALLBACK_REASONS`, or None.
    """
    if _attentions_requested(kwargs):
        return FALLBACK_REASONS["output_attentions"]
    if (
        query.dtype not in SUPPORTED_DTYPES
        or key.dtype != query.dtype
        or value.dtype != query.dtype
    ):
        return FALLBACK_REASONS["dtype"]
    if query.shape[-1] > MAX_HEAD_DIM or value.shape[-1] != query.shape[-1]:
        return FALLBACK_REASONS["head_size"]
    if not (query.device.type == "cuda" or (query.device.type == "cpu" and INTERPRETING)):
        return FALLBACK_REASONS["device"]
    if kwargs.get("position_bias") is not None:
        return FALLBACK_REASONS["position_bias"]
    if not mask_expressible:
        return FALLBACK_REASONS["mask"]
    return None
