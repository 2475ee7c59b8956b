"""The compact Llama, its one training loop and the task CLIs.

``python -m llama.quickstart | llama.pretrain | llama.sft | llama.chat | llama.evaluate | llama.export``
(each with ``--help``); in Python: :class:`Llama`, :class:`LlamaConfig`, :func:`generate`, :func:`generate_text`.
"""

from .generation.generate import generate, generate_text
from .model import PRESETS, Llama, LlamaConfig, LlamaOutput, ModelOptions

__all__ = ["PRESETS", "Llama", "LlamaConfig", "LlamaOutput", "ModelOptions", "generate", "generate_text"]
