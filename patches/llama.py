"""LLaMA adapter: route every ``LlamaAttention`` of a loaded model through the Triton kernels.

The replacement forward is LlamaAttention's own (projections, rotary embedding, KV cache), with
the attention call going straight to :func:`hf_flashattn.integration.attention_forward` instead
of through ``config._attn_implementation``; so it works whatever implementation the model was
loaded with, and the mask the model builds for that implementation is understood as it is.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaAttention

from hf_flashattn.integration import attention_forward

from ._base import patch_forwards, restore_forwards

MODEL_TYPE = "llama"


def llama_attention_forward(
    self: LlamaAttention,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values: Cache | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``LlamaAttention.forward`` with the kernels for attention.

    Arguments:
        hidden_states: (batch_size, seqlen, hidden_size).
        position_embeddings: (cos, sin), each (batch_size, seqlen, head_dim).
        attention_mask: whatever the model built (None, 2-D or 4-D; see hf_flashattn.integration).
        past_key_values: the KV cache, updated in place.

    Return:
        attn_output: (batch_size, seqlen, hidden_size).
        attn_weights: None, or (batch_size, heads, seqlen, seqlen_k) when eager ran.
    """
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = modeling_llama.apply_rotary_pos_emb(query, key, cos, sin)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    attn_output, attn_weights = attention_forward(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=self.attention_dropout if self.training else 0.0,
        scaling=self.scaling,
        **kwargs,
    )
    attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
    return attn_output, attn_weights


def apply(model: torch.nn.Module) -> int:
    """Route every ``LlamaAttention`` in ``model`` through the kernels. Idempotent.

    Return:
        The number of attention modules now routed through the kernels.

    Raises:
        ValueError: ``model`` has no ``LlamaAttention``.
    """
    return patch_forwards(model, LlamaAttention, llama_attention_forward, MODEL_TYPE)


def revert(model: torch.nn.Module) -> int:
    """Restore the original forwards of every patched module in ``model``; returns how many."""
    return restore_forwards(model)
