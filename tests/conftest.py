"""Test setup. Without a CUDA GPU the kernels run through Triton's interpreter, which Triton
reads when @triton.jit decorates: so TRITON_INTERPRET is set here, before hf_flashattn (and
its kernel modules) are imported by any test."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(
        reason="needs a CUDA GPU; this machine has none (torch.cuda.is_available() is False)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def kernel_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every flash_attn call the transformers integration makes; the
    kernels still run."""
    from hf_flashattn import integration  # imported here, after TRITON_INTERPRET is settled

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return flash_attn(*args, **kwargs)

    flash_attn = integration.flash_attn
    monkeypatch.setattr(integration, "flash_attn", spy)
    return calls


@pytest.fixture
def poisoned_allocations(monkeypatch) -> None:
    """Every tensor made by torch.empty / empty_like / empty_strided arrives full of poison
    (NaN; the minimum for integers; True for bool), so an element a kernel leaves unwritten
    shows, here and on the GPU alike (the CPU's allocator does not reliably hand back a
    poisoned, freed block, so poisoning one first would test nothing there)."""

    def poisoned(allocate):
        def allocate_poisoned(*args, **kwargs):
            t = allocate(*args, **kwargs)
            if t.is_floating_point():
                return t.fill_(float("nan"))
            if t.dtype == torch.bool:
                return t.fill_(True)
            return t.fill_(torch.iinfo(t.dtype).min)

        return allocate_poisoned

    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, poisoned(getattr(torch, name)))
