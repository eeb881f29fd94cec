"""hf_flashattn: FlashAttention-2 in Triton for HuggingFace Transformers.

``import hf_flashattn`` registers ``attn_implementation="triton_attention"`` with transformers.
"""

from .op import flash_attn

__all__ = ["flash_attn"]
__version__ = "0.1.0"
