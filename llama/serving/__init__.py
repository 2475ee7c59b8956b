"""The OpenAI-compatible HTTP server behind ``python -m llama.serve``, one job per module.

- :mod:`.schemas`: the request bodies (checked by pydantic) and the response/chunk shapes;
- :mod:`.errors`: OpenAI-style error bodies (``{"error": {"message", "type", "param", "code"}}``) for every failure;
- :mod:`.templates`: chat messages → the prompt text the checkpoint was fine-tuned on (ChatML, think on/off);
- :mod:`.detokenize`: a row's token ids → streamed text: whole characters, stop strings, reasoning split off;
- :mod:`.batcher`: concurrent requests grouped into one batched ``generate`` call in a worker thread;
- :mod:`.app`: the FastAPI application tying them together (and the web chat page at ``/``, ``static/index.html``);
- :mod:`.background`: the server in a background thread on a free port (tests, benchmarks, notebooks).
"""
