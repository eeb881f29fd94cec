"""hf_flashattn: FlashAttention-2 in Triton for HuggingFace Transformers.

``import hf_flashattn`` registers ``attn_implementation="triton_attention"`` with transformers.
"""

from .integration import ATTN_IMPLEMENTATION, register
from .op import flash_attn

register()

__all__ = ["ATTN_IMPLEMENTATION", "flash_attn", "register"]
__version__ = "0.1.0"
