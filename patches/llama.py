"""LLaMA adapter: every ``LlamaAttention`` of a loaded model calls the kernels (see ``_base``)."""

from __future__ import annotations

from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention

from ._base import restore, route

MODEL_TYPE = "llama"
ATTENTION_CLASSES = (LlamaAttention,)


def apply(model: nn.Module) -> int:
    """Route every ``LlamaAttention`` in ``model`` through the kernels. Idempotent.

    Return:
        The number of attention modules now routed through the kernels.

    Raises:
        ValueError: ``model`` has no ``LlamaAttention``, or its attention cannot be routed.
    """
    return route(model, ATTENTION_CLASSES, MODEL_TYPE)


def revert(model: nn.Module) -> int:
    """Restore every patched attention module in ``model``; returns how many."""
    return restore(model)
