"""The one mechanism every adapter shares: bind a replacement ``forward`` to each attention module
of a loaded model, keeping what it replaced so that :func:`restore_forwards` undoes it exactly.

The replacement is an instance attribute, so the class (and every other model) is untouched and
reverting is deleting it again. Modules wrapped by accelerate hooks (``device_map=...``) keep
their hook: the hook calls ``module._old_forward``, so that is what gets replaced there.
"""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import nn

# Instance attribute holding (name of the replaced attribute, what it held or _ABSENT).
_SAVED = "_hf_flashattn_saved_forward"
_ABSENT = object()


def _target(module: nn.Module) -> str:
    return (
        "_old_forward"
        if hasattr(module, "_hf_hook") and "_old_forward" in vars(module)
        else "forward"
    )


def patch_forwards(model: nn.Module, attention_class: type, forward: Callable, family: str) -> int:
    """Bind ``forward`` as the forward of every ``attention_class`` module in ``model``.

    Idempotent: modules already patched are left alone.

    Arguments:
        model: a loaded transformers model (or any module containing the attention modules).
        attention_class: the attention module class to route through the kernels.
        forward: a function ``(self, hidden_states, ...)`` with the class forward's signature.
        family: the model family's name, for the error message.

    Return:
        The number of attention modules routed through the kernels (patched now or before).

    Raises:
        ValueError: ``model`` holds no ``attention_class`` module.
    """
    modules = [m for m in model.modules() if isinstance(m, attention_class)]
    if not modules:
        raise ValueError(
            f"no {attention_class.__name__} module in {type(model).__name__}: not a {family} model"
        )
    for module in modules:
        if _SAVED in vars(module):
            continue
        name = _target(module)
        setattr(module, _SAVED, (name, vars(module).get(name, _ABSENT)))
        setattr(module, name, types.MethodType(forward, module))
    return len(modules)


def restore_forwards(model: nn.Module) -> int:
    """Undo :func:`patch_forwards` on every module of ``model``, whatever adapter patched it.

    Return:
        The number of attention modules restored (0 when nothing was patched).
    """
    restored = 0
    for module in model.modules():
        saved = vars(module).pop(_SAVED, None)
        if saved is None:
            continue
        name, original = saved
        if original is _ABSENT:
            delattr(module, name)
        else:
            setattr(module, name, original)
        restored += 1
    return restored


def is_patched(module: nn.Module) -> bool:
    """Whether ``module``'s forward currently runs through an adapter."""
    return _SAVED in vars(module)
