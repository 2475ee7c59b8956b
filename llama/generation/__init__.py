"""Generation: the KV cache, the logits rules (``sampling``), ``generate``, beam search, and loading a checkpoint
or Hugging Face folder for inference (``load``). Import the modules themselves (``llama.generation.generate``);
this package re-exports nothing, so the model can import the KV cache without importing generation."""
