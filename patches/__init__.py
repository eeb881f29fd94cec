"""Adapters: route the attention modules of an already-loaded model through the Triton kernels,
without touching the model's config or any module's code, and undo it exactly.

    import hf_flashattn.patches
    hf_flashattn.patches.apply(model)    # picks the adapter by model.config.model_type
    hf_flashattn.patches.revert(model)   # the modules as they were

Installed as ``hf_flashattn.patches`` (setuptools package-dir); always import it by that name.
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from . import gpt2, llama
from ._base import is_patched, restore

# model_type -> adapter module: MODEL_TYPE, ATTENTION_CLASSES, apply(model), revert(model).
ADAPTERS: dict[str, ModuleType] = {adapter.MODEL_TYPE: adapter for adapter in (llama, gpt2)}


def apply(model: nn.Module) -> int:
    """Route the attention modules of ``model`` through the kernels, choosing the adapter by
    ``model.config.model_type``. Idempotent.

    Return:
        The number of attention modules now routed through the kernels.

    Raises:
        ValueError: no adapter for this model type (the message lists those there are), or its
            attention modules cannot be routed (see ``_base.route``).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"no hf_flashattn adapter for model_type {model_type!r}; adapters exist for: "
            f"{', '.join(sorted(ADAPTERS))}. Other models can use "
            'attn_implementation="triton_attention".'
        )
    return ADAPTERS[model_type].apply(model)


def revert(model: nn.Module) -> int:
    """Restore every patched attention module in ``model``, whatever adapter patched it.

    Return:
        The number of modules restored (0 when nothing was patched).
    """
    return restore(model)


__all__ = ["ADAPTERS", "apply", "gpt2", "is_patched", "llama", "revert"]
