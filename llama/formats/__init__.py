"""Other people's formats: Hugging Face Llama folders in and out (``hf``, ``hf_io``)."""
