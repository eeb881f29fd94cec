"""GPT-2 adapter: route every ``GPT2Attention`` (self- and cross-attention) of a loaded model
through the Triton kernels.

The replacement forward is GPT2Attention's own (fused c_attn projection, KV / cross-attention
caches, c_proj and residual dropout), with the attention call going straight to
:func:`hf_flashattn.integration.attention_forward`. GPT-2's scaling rules
(``scale_attn_weights``, ``scale_attn_by_inverse_layer_idx``) live in ``module.scaling``, which
is passed on; ``reorder_and_upcast_attn`` needs nothing, as the kernels accumulate in float32.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from hf_flashattn.integration import attention_forward

from ._base import patch_forwards, restore_forwards

MODEL_TYPE = "gpt2"


def _heads(self: GPT2Attention, x: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen, hidden) -> (batch, heads, seqlen, head_dim)."""
    return x.view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)


def gpt2_attention_forward(
    self: GPT2Attention,
    hidden_states: torch.Tensor,
    past_key_values: Cache | None = None,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    output_attentions: bool | None = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``GPT2Attention.forward`` with the kernels for attention.

    Arguments:
        hidden_states: (batch_size, seqlen, hidden_size).
        past_key_values: the KV cache (an ``EncoderDecoderCache`` with cross-attention).
        attention_mask: whatever the model built (None, 2-D or 4-D; see hf_flashattn.integration).
        encoder_hidden_states: (batch_size, seqlen_enc, hidden_size) for cross-attention.
        encoder_attention_mask: the cross-attention mask.
        output_attentions: passed on, so that eager attention runs and returns the weights.

    Return:
        attn_output: (batch_size, seqlen, hidden_size).
        attn_weights: None, or (batch_size, heads, seqlen, seqlen_k) when eager ran.
    """
    is_cross_attention = encoder_hidden_states is not None
    cache, is_updated = past_key_values, False
    if isinstance(past_key_values, EncoderDecoderCache):
        is_updated = bool(past_key_values.is_updated.get(self.layer_idx))
        cache = (
            past_key_values.cross_attention_cache
            if is_cross_attention
            else past_key_values.self_attention_cache
        )

    if is_cross_attention:
        query = _heads(self, self.q_attn(hidden_states))
        attention_mask = encoder_attention_mask
        if cache is not None and is_updated:
            # After the first step the encoder's keys/values sit in the cross-attention cache.
            key, value = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
        else:
            key, value = (
                _heads(self, t)
                for t in self.c_attn(encoder_hidden_states).split(self.split_size, dim=2)
            )
    else:
        query, key, value = (
            _heads(self, t) for t in self.c_attn(hidden_states).split(self.split_size, dim=2)
        )

    if cache is not None and not (is_cross_attention and is_updated):
        key, value = cache.update(key, value, self.layer_idx)
        if is_cross_attention:
            past_key_values.is_updated[self.layer_idx] = True

    attn_output, attn_weights = attention_forward(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=self.attn_dropout.p if self.training else 0.0,
        scaling=self.scaling,
        output_attentions=output_attentions,
        **kwargs,
    )
    attn_output = attn_output.reshape(*attn_output.shape[:-2], -1).contiguous()
    attn_output = self.resid_dropout(self.c_proj(attn_output))
    return attn_output, attn_weights


def apply(model: torch.nn.Module) -> int:
    """Route every ``GPT2Attention`` in ``model`` through the kernels. Idempotent.

    Return:
        The number of attention modules now routed through the kernels.

    Raises:
        ValueError: ``model`` has no ``GPT2Attention``.
    """
    return patch_forwards(model, GPT2Attention, gpt2_attention_forward, MODEL_TYPE)


def revert(model: torch.nn.Module) -> int:
    """Restore the original forwards of every patched module in ``model``; returns how many."""
    return restore_forwards(model)
