"""The compact Llama, its one training loop and the task CLIs (``python -m llama.pretrain``, ``llama.quickstart``)."""

from .model import PRESETS, Llama, LlamaConfig, LlamaOutput

__all__ = ["PRESETS", "Llama", "LlamaConfig", "LlamaOutput"]
