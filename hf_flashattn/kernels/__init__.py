"""Triton kernels only: no validation, no autograd (that lives in hf_flashattn.op)."""

import os

# Triton reads TRITON_INTERPRET when @triton.jit decorates, i.e. when this package imports.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
