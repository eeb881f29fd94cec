"""What both examples do the same way: pick the device and the Triton mode, name the attention
path that actually ran, measure peak memory, find a default text.

Import this module, and call ``import_hf_flashattn`` before anything imports hf_flashattn:
Triton reads TRITON_INTERPRET when the kernels are decorated, i.e. when hf_flashattn imports.
"""

from __future__ import annotations

import os
import resource
import sys
import sysconfig
from pathlib import Path

import torch

# Real English text that ships with the machine: Debian/Ubuntu's GPL-3 (35 kB), else CPython's
# own LICENSE.txt, which every CPython install carries.
DEFAULT_TEXTS = (
    Path("/usr/share/common-licenses/GPL-3"),
    Path(sysconfig.get_path("stdlib")) / "LICENSE.txt",
)

PATH_NAMES = {"eager": "PyTorch eager", "sdpa": "PyTorch SDPA", "flex_attention": "FlexAttention"}


def default_text() -> Path:
    for path in DEFAULT_TEXTS:
        if path.is_file():
            return path
    raise SystemExit(
        f"none of the default texts exists ({', '.join(map(str, DEFAULT_TEXTS))}): pass --text FILE"
    )


def pick_device(requested: str | None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def import_hf_flashattn(device: str):
    """Import hf_flashattn (which registers ``triton_attention``) for ``device``.

    The kernels are Triton: on a CUDA device they compile; anywhere else they can only run
    through Triton's interpreter, which must be switched on before hf_flashattn is imported.
    """
    if not device.startswith("cuda"):
        if os.environ.get("TRITON_INTERPRET") != "1":
            if "hf_flashattn" in sys.modules:
                raise RuntimeError(
                    "hf_flashattn was imported before TRITON_INTERPRET=1 could be set"
                )
            os.environ["TRITON_INTERPRET"] = "1"
        print(
            f"device {device}, not CUDA: TRITON_INTERPRET=1, the Triton kernels run in the "
            "interpreter (slow; for checking results, not speed)"
        )
    import hf_flashattn

    return hf_flashattn


def is_interpreting() -> bool:
    from hf_flashattn.kernels import INTERPRETING

    return INTERPRETING


class KernelCalls:
    """Counts, while active, the calls of hf_flashattn.flash_attn that the transformers hook
    (``hf_flashattn.integration``) makes: one per attention layer that ran the kernels.

    The hook's reference to flash_attn is wrapped, not the op: eager calls run the kernels
    through an autograd Function and only compiled graphs through the custom op, so neither a
    dispatch mode on ``hf_flashattn::fwd`` nor anything below the hook sees every call.
    """

    def __enter__(self) -> KernelCalls:
        from hf_flashattn import integration

        self.count = 0
        self._integration, self._flash_attn = integration, integration.flash_attn

        def counting(*args, **kwargs):
            self.count += 1
            return self._flash_attn(*args, **kwargs)

        integration.flash_attn = counting
        return self

    def __exit__(self, *exc_info) -> None:
        self._integration.flash_attn = self._flash_attn


def attention_path(model, attn_implementation: str, forward) -> str:
    """Run ``forward()`` once (a warm-up) and say which attention code it ran.

    For ``triton_attention`` the kernel calls are counted against the model's attention layers:
    fewer calls than layers means hf_flashattn fell back to eager attention (an
    EagerFallbackWarning says why).
    """
    if attn_implementation != "triton_attention":
        with torch.no_grad():
            forward()
        return PATH_NAMES.get(attn_implementation, attn_implementation)
    with torch.no_grad(), KernelCalls() as calls:
        forward()
    layers = model.config.get_text_config().num_hidden_layers
    triton = "Triton interpreter (CPU)" if is_interpreting() else "compiled Triton (GPU)"
    if calls.count >= layers:
        return triton
    if calls.count == 0:
        return "fallback: eager"
    return f"{triton}, {calls.count} of {layers} layers (rest fell back to eager)"


class PeakMemory:
    """Peak memory since the last ``reset()``.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors allocated by PyTorch on the GPU, model
    weights included). CPU: the process's peak resident set size (Linux VmHWM, reset through
    /proc/self/clear_refs), i.e. everything the process holds: weights, activations, Python
    and allocator caches. Where that reset is unavailable, ru_maxrss: the peak since the
    process started, not per run.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.resettable = self.cuda or _reset_peak_rss()
        if self.cuda:
            self.measures = "torch.cuda.max_memory_allocated: PyTorch tensors on the GPU"
        elif self.resettable:
            self.measures = "peak resident set size of the whole process (VmHWM, reset per run)"
        else:
            self.measures = "peak resident set size since the process started (ru_maxrss)"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.resettable:
            _reset_peak_rss()

    def read_mib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        if self.resettable:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(c) for c in column) for column in zip(header, *rows, strict=True)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
