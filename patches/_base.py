"""The one mechanism every adapter shares: make chosen attention modules of a loaded model call
the kernels, without replacing any of their code.

transformers' attention modules pick their attention function at every call from
``self.config._attn_implementation`` (through ``ALL_ATTENTION_FUNCTIONS``); everything else in
their forward (projections, rotary embedding, KV-cache updates, dropout) is theirs and changes
from release to release. So an adapter replaces only what each module reads there: the module's
``config`` becomes a :class:`KernelRoutedConfig`, a live view of the model's config in which
``_attn_implementation`` names ``triton_attention``. The modules' forwards, the model's config and
every other module stay untouched, and :func:`restore` puts the original config object back.

The model keeps building its masks for the implementation it was loaded with (eager, sdpa, or
transformers' FlashAttention-2), and the attention function understands each of those forms.
"""

from __future__ import annotations

import copy
import inspect

from torch import nn

from hf_flashattn.integration import ATTN_IMPLEMENTATION

# transformers' masks whose form hf_flashattn.integration.attention_forward reads (None, 2-D or
# 4-D tensors). flex_attention's BlockMask is not a tensor.
_UNDERSTOOD_MASKS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", ATTN_IMPLEMENTATION)


class KernelRoutedConfig:
    """The config a patched attention module sees: reads and writes go to the model's own config
    (so later changes to it still reach the module), except ``_attn_implementation``.

    ``original`` lives in an ordinary instance ``__dict__`` (no ``__slots__``): dynamo guards
    on ``config.__dict__``, and on torch 2.11 a slotted view failed that guard."""

    def __init__(self, original):
        object.__setattr__(self, "original", original)

    @property
    def _attn_implementation(self) -> str:
        return ATTN_IMPLEMENTATION

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "original"), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.original, name, value)

    def __deepcopy__(self, memo):
        # A copied model keeps its modules patched, on its own copy of the config.
        return KernelRoutedConfig(copy.deepcopy(self.original, memo))

    def __reduce__(self):
        return KernelRoutedConfig, (self.original,)

    def __repr__(self) -> str:
        return f"KernelRoutedConfig({self.original!r})"


def dispatches_through_interface(module: nn.Module) -> bool:
    """Whether ``module`` chooses its attention function from ``self.config._attn_implementation``
    (transformers' attention interface), read from its forward's code without running it."""
    forward = inspect.unwrap(type(module).forward)  # past decorators such as deprecate_kwarg
    code = getattr(forward, "__code__", None)
    return (
        code is not None
        and "_attn_implementation" in code.co_names
        and "config" in code.co_names
        and hasattr(module, "config")
    )


def route(model: nn.Module, attention_classes: tuple[type, ...], family: str) -> int:
    """Make every ``attention_classes`` module of ``model`` call the kernels. Idempotent.

    Arguments:
        model: a loaded transformers model (or any module containing the attention modules).
        attention_classes: the attention module classes of the family.
        family: the model family's name, for error messages.

    Return:
        The number of attention modules routed through the kernels (now or before).

    Raises:
        ValueError: ``model`` holds no such module; one of them does not dispatch through
            transformers' attention interface (nothing is patched then); or the model builds
            flex_attention's BlockMask, which the kernels do not read.
    """
    modules = [m for m in model.modules() if isinstance(m, attention_classes)]
    if not modules:
        names = ", ".join(c.__name__ for c in attention_classes)
        raise ValueError(f"no {names} module in {type(model).__name__}: not a {family} model")
    # Check every module before patching any, so a refusal leaves the model as it was.
    for module in modules:
        if not dispatches_through_interface(module):
            cls = type(module)
            raise ValueError(
                f"{cls.__module__}.{cls.__qualname__} does not choose its attention function "
                "from config._attn_implementation (transformers' AttentionInterface), so it "
                "cannot be routed to the kernels; models from such modeling files can use "
                'attn_implementation="triton_attention" only if they dispatch that way'
            )
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation is not None and implementation not in _UNDERSTOOD_MASKS:
        raise ValueError(
            f"{type(model).__name__} runs {implementation!r}, whose masks the kernels do not "
            f"read; call model.set_attn_implementation('sdpa') before patching"
        )
    for module in modules:
        if not is_patched(module):
            module.config = KernelRoutedConfig(module.config)
    return len(modules)


def restore(model: nn.Module) -> int:
    """Undo :func:`route` on every module of ``model``, whatever adapter patched it.

    Return:
        The number of attention modules restored (0 when nothing was patched).
    """
    restored = 0
    for module in model.modules():
        if is_patched(module):
            module.config = module.config.original
            restored += 1
    return restored


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` currently calls the kernels through an adapter."""
    return isinstance(vars(module).get("config"), KernelRoutedConfig)
