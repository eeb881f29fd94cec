"""GPT-2 adapter: every ``GPT2Attention`` (self- and cross-attention) of a loaded model calls the
kernels (see ``_base``).

GPT-2's scaling rules (``scale_attn_weights``, ``scale_attn_by_inverse_layer_idx``) reach the
kernels through the ``scaling`` the module passes; ``reorder_and_upcast_attn`` needs nothing, as
the kernels accumulate in float32.
"""

from __future__ import annotations

from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from ._base import restore, route

MODEL_TYPE = "gpt2"
ATTENTION_CLASSES = (GPT2Attention,)


def apply(model: nn.Module) -> int:
    """Route every ``GPT2Attention`` in ``model`` through the kernels. Idempotent.

    Return:
        The number of attention modules now routed through the kernels.

    Raises:
        ValueError: ``model`` has no ``GPT2Attention``, or its attention cannot be routed.
    """
    return route(model, ATTENTION_CLASSES, MODEL_TYPE)


def revert(model: nn.Module) -> int:
    """Restore every patched attention module in ``model``; returns how many."""
    return restore(model)
