"""GRPO step benchmark: ours (``llama.training.rollouts`` + ``llama.training.grpo.GRPO``) vs TRL's ``GRPOTrainer`` on
the same model (our checkpoint exported by ``llama.formats.hf.export_hf``), the same prompts, the same reward, the
same sampling settings and the same objective (β = 0, ε = 0.2, token-level normalisation: ours ``token``, TRL
``loss_type="dapo"``; advantages standardised per group: ours ``scale_rewards=True``, TRL ``"group"``).

    pytest bench/test_grpo_step.py --benchmark-only                # CPU: fp32; CUDA: bf16, measured memory
    pip install -e '.[bench]'                                      # TRL (the TRL rows skip without it)

A GRPO step is a rollout (sample G completions of each of P prompts, score them) and an update on it; the two are
measured apart, then a short run end to end:

* ``test_grpo_generate``: one rollout's sampling. *ours*: ``Replies.__call__`` (what ``RolloutSource`` calls: the
  batched KV-cache ``llama.generation.generate.generate``, then decoding and the reward) under the run's autocast,
  a new seed each call. *trl*: ``GRPOTrainer._generate_single_turn`` (TRL's own generation path without vLLM:
  left-padding, ``unwrap_model_for_generation``, ``model.generate(**inputs, generation_config=trainer.
  generation_config)``, masking after EOS) on the prompts ``_tokenize_prompts`` rendered. These are private methods:
  TRL's public API only generates inside ``training_step``, together with the update. Decoding and scoring are not
  in TRL's row (``_generate`` does them after); they are microseconds at this size. Sampling: temperature 1,
  top-p 1, top-k off, stop at ``</s>`` or ``<|im_end|>``, at most ``max_new_tokens``. tokens = completion tokens
  sampled (stop token included), averaged over the calls; a fresh random model rarely stops early, so nearly
  P × G × ``max_new_tokens``.
* ``test_grpo_update``: one optimizer step on one rollout of P × G sequences: zero the gradients, the loss's forward,
  backward, AdamW; no clipping, no generation in the timed step (the rollout is sampled once before timing, by each
  side's own code: ``RolloutSource.next_batch`` for ours, ``GRPOTrainer._prepare_inputs`` for TRL). *ours*:
  ``GRPO.loss`` (one forward whose head gives the completion tokens' log-probs without full logits on the Triton
  path), ``adamw`` of ``finetune_setup``. *trl*: ``trainer.compute_loss`` under ``compute_loss_context_manager`` (its
  fused LM head, which also computes the entropy of every completion token for its metrics),
  ``accelerator.backward``, its own optimizer's step. With one update per rollout both detach the ratio (ρ = 1), so
  the first loss is −Σ A·(completion tokens) ÷ all completion tokens on both sides, and each side's is checked
  against that formula on its own batch. tokens = non-pad tokens forwarded (prompt + completion); positions =
  the tensor positions the forward runs (ours right-padded rows, TRL left-padded prompts + right-padded completions).
* ``test_grpo_train``: ``train_steps`` steps end to end in a fresh process each: ours ``python -m llama.grpo`` (its
  ``main``), TRL ``GRPOTrainer(...).train()`` with ``max_steps``; both clip the gradient norm at 1, neither
  validates; ours writes its final checkpoint, a loss plot and TensorBoard events, TRL saves nothing. Wall seconds
  and peak RSS of the process tree (``bench/peak_rss.py``: imports included), the training loop's own seconds
  (ours: ``time`` of its last metrics line; TRL: ``train_runtime``), the CUDA peak inside the process on a GPU.

Memory as in ``finetune_setup``: the tracked peak of live tensor storage during one real call (``MemTracker``), and
``torch.cuda.max_memory_allocated`` on CUDA. Shapes: :data:`CPU_SHAPE` on CPU with ``finetune_setup.CPU_SIZE``,
:data:`GPU_SHAPE` with ``GPU_SIZE`` on CUDA. Prompts: the first single-turn prompts of
``../shared/data/medicalgpt/dpo_zh_500.jsonl`` whose chat-template rendering fits :data:`PROMPT_TOKENS` (ours and
TRL's tokenization are checked equal). Reward: ``length:N:N:N`` (``llama.rewards``) with N = ``max_new_tokens``, the
same function on both sides, so rewards differ within a group and advantages are not zero. Rows go to
``bench/.results/finetune.json``; ratios are ours ÷ TRL (speeds: tokens/s, or TRL's seconds ÷ ours; memory: ours'
÷ TRL's).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
from benchlib import BENCH, PYTHON, REPO, Recorder, rounds, versions
from finetune_setup import (
    DPO_PAIRS,
    MIB,
    FinetuneModel,
    adamw,
    autocast_for,
    cuda_peak_mb,
    device_peak,
    load_ours,
    memory_tracker,
    precision_name,
    time_steps,
    timing,
    tracked_peak,
)

logger = logging.getLogger(__name__)

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
IMPLS = ("ours", "trl")
EPSILON = 0.2
LR = 1e-4
PROMPT_TOKENS = 64  # prompts whose chat rendering fits this many tokens
LOSS_TOLERANCE = 1e-5 if not ON_GPU else 1e-3
RESULT_TAG = "GRPO_RESULT "  # the end-to-end child's last line: this tag and a JSON object


@dataclass(frozen=True)
class Shape:
    """One GRPO step: ``prompts`` × ``group`` completions of up to ``max_new_tokens``; ``train_steps`` end to end."""

    prompts: int
    group: int
    max_new_tokens: int
    train_steps: int

    @property
    def rows(self) -> int:
        return self.prompts * self.group

    @property
    def reward(self) -> str:
        n = self.max_new_tokens
        return f"length:{n}:{n}:{n}"  # 1 − |characters − n| ÷ n, at least 0: differs within a group

    @property
    def label(self) -> str:
        return f"{self.prompts} prompts x {self.group}, {self.max_new_tokens} new tokens"


#: CPU: the whole file stays near a minute or two on 2 cores.
CPU_SHAPE = Shape(prompts=2, group=8, max_new_tokens=32, train_steps=4)
#: CUDA: a step of a small GRPO run on one card.
GPU_SHAPE = Shape(prompts=4, group=8, max_new_tokens=64, train_steps=3)
SHAPE = GPU_SHAPE if ON_GPU else CPU_SHAPE


def require_trl() -> None:
    for name in ("trl", "datasets", "transformers"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed: the TRL rows are left out (pip install -e '.[bench]')")


# ---------------------------------------------------------------- prompts and the reward


@dataclass
class GrpoPrompts:
    """The step's prompts: their texts, ours (chat-rendered ids) and a prompts file for ``python -m llama.grpo``."""

    texts: list[str]
    ours: list[Any]  # llama.training.rollouts.Prompt
    path: Path


def single_turn_prompts(tokenizer: Any, count: int, max_tokens: int) -> list[tuple[int, str, list[int]]]:
    """The first ``count`` single-turn prompts of the DPO pairs whose chat rendering fits ``max_tokens``: (line,
    text, ids)."""
    from llama.generate import prompt_text

    found = []
    for line, raw in enumerate(DPO_PAIRS.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        turns = json.loads(raw)["conversations"]
        if len(turns) != 1 or turns[0]["from"] not in ("human", "user"):
            continue
        ids = tokenizer.encode(prompt_text(turns[0]["value"], chat=True, system=None))
        if len(ids) <= max_tokens:
            found.append((line, turns[0]["value"], ids))
            if len(found) == count:
                return found
    raise RuntimeError(f"{DPO_PAIRS}: fewer than {count} single-turn prompts fit {max_tokens} tokens")


@pytest.fixture(scope="module")
def grpo_prompts(finetune_model: FinetuneModel) -> GrpoPrompts:
    from engine.tokenizer import load_tokenizer
    from llama.training.rollouts import Prompt

    tokenizer = load_tokenizer(finetune_model.tokenizer_dir)
    found = single_turn_prompts(tokenizer, SHAPE.prompts, PROMPT_TOKENS)
    folder = finetune_model.folder / "grpo"
    folder.mkdir(exist_ok=True)
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": t}, ensure_ascii=False) + "\n" for _, t, _ in found), "utf-8")
    ours = [Prompt(line, text, ids, {}) for line, text, ids in found]
    return GrpoPrompts([text for _, text, _ in found], ours, path)


def score_fn(spec: str) -> Callable[[str, str, Any], tuple[float, dict[str, float]]]:
    """``llama.rewards.score`` bound to the one reward ``spec``, as ``llama.grpo`` binds ``--reward``."""
    from llama.rewards import parse_rewards, score

    return partial(score, parse_rewards([spec]))


def trl_reward(spec: str) -> Callable[..., list[float]]:
    """The same reward as a TRL reward function: the prompt's text and each completion's content."""
    scorer = score_fn(spec)

    def length_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        return [scorer(p[-1]["content"], c[0]["content"], {})[0] for p, c in zip(prompts, completions)]

    return length_reward


def generation_peak(step: Callable[[], Any], model: torch.nn.Module) -> dict[str, int]:
    """``tracked_peak`` for a generation call: ``MemTracker`` refuses a second forward of the same root module without
    a backward in between (a decode step each), so its per-module statistics are cleared after each forward; the
    peak it keeps is the device's, over the whole call."""
    tracker = memory_tracker(model)
    tracker.track_external(model)
    handle = model.register_forward_hook(lambda *args: tracker.reset_mod_stats())
    try:
        with tracker:
            step()
    finally:
        handle.remove()
    return device_peak(tracker, DEVICE.type)


# ---------------------------------------------------------------- ours


def ours_replies(setup: FinetuneModel, shape: Shape) -> Any:
    """``Replies`` as ``llama.grpo.configure`` builds it for ``--max-new-tokens`` and the reward (T 1, no top-p/k)."""
    from engine.tokenizer import load_tokenizer
    from llama.generation.generate import stop_token_ids
    from llama.training.rollouts import Replies, Sampling

    tokenizer = load_tokenizer(setup.tokenizer_dir)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return Replies(
        Sampling(shape.max_new_tokens, 1.0, 1.0, 0),
        score_fn(shape.reward),
        (shape.reward,),
        tokenizer.decode,
        stop_token_ids(tokenizer),
        pad_id,
        tokenizer.vocab_size,
    )


def ours_settings(shape: Shape) -> Any:
    from llama.training.grpo import GRPOSettings

    return GRPOSettings(group_size=shape.group, epsilon=EPSILON, epsilon_high=EPSILON, beta=0.0, loss_type="token")


def ours_generate(setup: FinetuneModel, prompts: GrpoPrompts) -> tuple[Callable[[], int], dict[str, Any]]:
    """One rollout's sampling and scoring, a new seed each call; the step returns the completion tokens."""
    model = load_ours(setup.checkpoint, DEVICE).eval()
    replies, seeds = ours_replies(setup, SHAPE), itertools.count()

    def step() -> int:
        with autocast_for(DEVICE):
            scored = replies(model, prompts.ours, SHAPE.group, seed=next(seeds))
        return sum(len(c) for c in scored.completions)

    return step, {"memory": lambda: generation_peak(step, model)}


def ours_update(setup: FinetuneModel, prompts: GrpoPrompts) -> tuple[Callable[[], torch.Tensor], dict[str, Any]]:
    """``RolloutSource`` samples one rollout of P × G (one micro-batch, accumulation 1); the step is ``GRPO.loss``,
    backward and AdamW on it."""
    from llama.training.grpo import GRPO
    from llama.training.objectives import IGNORE_INDEX
    from llama.training.rollouts import PromptFiles, RolloutSource

    model = load_ours(setup.checkpoint, DEVICE)
    settings, replies = ours_settings(SHAPE), ours_replies(setup, SHAPE)
    files = PromptFiles(prompts.path, {}, len(prompts.ours), sum(len(p.ids) for p in prompts.ours), replies.vocab_size)
    source = RolloutSource(prompts.ours, files, settings, replies, seed=0)
    run = SimpleNamespace(sharded=False, model=model, autocast=autocast_for(DEVICE), cfg=SimpleNamespace(grad_accum=1))
    source.bind(run)
    model.eval()  # as the loop samples
    batch = {k: v.to(DEVICE) for k, v in source.next_batch(SHAPE.rows).items()}
    model.train()
    objective = GRPO(settings, replies.reward_names)
    optimizer = adamw(model, DEVICE)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast_for(DEVICE):
            loss, _ = objective.loss(model, batch)
        loss.backward()
        optimizer.step()
        return loss.detach()

    mask = (batch["labels"] != IGNORE_INDEX).float()
    facts = {
        "tokens": int(batch["lengths"].sum()),
        "completion_tokens": int(mask.sum()),
        "positions": int(batch["input_ids"].numel()),
        "expected_loss": float(-(batch["advantages"][:, None].float() * mask).sum() / mask.sum()),
        "reward_mean": float(batch["reward_total"].mean()),
        "memory": lambda: tracked_peak(step, [model], optimizer, DEVICE.type),
    }
    return step, facts


def ours_train_argv(setup: FinetuneModel, prompts: GrpoPrompts, out: Path) -> list[str]:
    """``python -m llama.grpo`` for ``SHAPE.train_steps`` steps of one rollout each, the settings of the rows above."""
    argv = ["--init", str(setup.checkpoint), "--prompts", str(prompts.path), "--reward", SHAPE.reward]
    argv += ["--out-dir", str(out), "--steps", str(SHAPE.train_steps), "--lr", str(LR), "--warmup-steps", "0"]
    argv += ["--batch-size", str(SHAPE.rows), "--grad-accum", "1", "--group-size", str(SHAPE.group)]
    argv += ["--max-new-tokens", str(SHAPE.max_new_tokens), "--epsilon", str(EPSILON), "--loss-type", "token"]
    argv += ["--log-every", "1", "--eval-every", "0", "--save-every", "0", "--seed", "0", "--no-progress"]
    return argv + ["--profile", "auto" if ON_GPU else "cpu", "--kernels", "auto"]


# ---------------------------------------------------------------- TRL


def trl_config(output_dir: Path, max_steps: int) -> Any:
    """``GRPOConfig`` for one rollout of P × G per step, generated and trained in one step (no accumulation), with
    the objective of ours. TRL's defaults ``gradient_checkpointing=True`` and ``bf16=True`` are set to match ours."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=SHAPE.rows,
        gradient_accumulation_steps=1,
        num_generations=SHAPE.group,
        max_completion_length=SHAPE.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        epsilon=EPSILON,
        num_iterations=1,
        loss_type="dapo",
        scale_rewards="group",
        mask_truncated_completions=False,
        gradient_checkpointing=False,
        bf16=ON_GPU,
        fp16=False,
        learning_rate=LR,
        max_steps=max_steps,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not ON_GPU,
        seed=0,
    )


def trl_trainer(export_dir: Path, texts: list[str], output_dir: Path, max_steps: int = 1) -> Any:
    """``GRPOTrainer`` on the exported model, the prompts as conversational records and the reward."""
    import datasets
    import transformers
    from trl import GRPOTrainer

    model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, attn_implementation="sdpa")
    tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": t}]} for t in texts])
    return GRPOTrainer(
        model=model,
        reward_funcs=[trl_reward(SHAPE.reward)],
        args=trl_config(output_dir, max_steps),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def prepared(trainer: Any) -> Any:
    """The trainer's model after ``accelerator.prepare``, as ``train`` leaves it (``model_wrapped`` set)."""
    model = trainer.accelerator.prepare(trainer.model)
    trainer.model_wrapped = model
    trainer.current_gradient_accumulation_steps = 1  # what ``train`` sets before its first step
    return model


def trl_generate(setup: FinetuneModel, prompts: GrpoPrompts) -> tuple[Callable[[], int], dict[str, Any]]:
    """TRL's generation path on the P × G prompts (each repeated G times, as its sampler repeats them)."""
    trainer = trl_trainer(setup.export_dir, prompts.texts, setup.folder / "grpo" / "trl-generate")
    model = prepared(trainer)
    model.train()  # as during ``train``
    conversations = [[{"role": "user", "content": t}] for t in prompts.texts for _ in range(SHAPE.group)]
    prompt_ids, _, fields = trainer._tokenize_prompts(conversations)
    ours = [p.ids for p in prompts.ours for _ in range(SHAPE.group)]
    assert [list(ids) for ids in prompt_ids] == ours, "TRL's chat rendering differs from ours"

    def step() -> int:
        completions, _ = trainer._generate_single_turn(prompt_ids, None, fields, SHAPE.group)
        return sum(len(c) for c in completions)

    return step, {"memory": lambda: generation_peak(step, trainer.model)}


def trl_update(setup: FinetuneModel, prompts: GrpoPrompts) -> tuple[Callable[[], torch.Tensor], dict[str, Any]]:
    """One rollout by ``_prepare_inputs`` (what ``training_step`` calls first); the step is ``compute_loss``,
    backward and the optimizer's step."""
    trainer = trl_trainer(setup.export_dir, prompts.texts, setup.folder / "grpo" / "trl-update")
    model = prepared(trainer)
    optimizer = trainer.accelerator.prepare(trainer.create_optimizer())
    model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))

    def step() -> torch.Tensor:
        model.train()
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs)
        trainer.accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    mask = inputs["completion_mask"].float()
    advantages = inputs["advantages"].float()
    facts = {
        "tokens": int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum()),
        "completion_tokens": int(mask.sum()),
        "positions": int(inputs["prompt_ids"].numel() + inputs["completion_ids"].numel()),
        "expected_loss": float(-(advantages[:, None] * mask).sum() / inputs["num_items_in_batch"].float()),
        "memory": lambda: tracked_peak(step, [trainer.model], optimizer, DEVICE.type),
    }
    return step, facts


# ---------------------------------------------------------------- end to end, in a child process


def e2e_child(side: str, spec: str) -> None:
    """Run ``SHAPE.train_steps`` GRPO steps of ``side`` (``spec``: JSON of what it needs) and print
    :data:`RESULT_TAG` + ``{"loop_s": ..., "cuda_peak_mb": ...}``; ``test_grpo_train`` starts this in a fresh
    process."""
    config = json.loads(spec)
    if side == "ours":
        from llama import grpo
        from llama.training.metrics import read_metrics

        if grpo.main(config["argv"]) != 0:
            raise SystemExit("python -m llama.grpo failed")
        records = read_metrics(Path(config["out"]) / "metrics.jsonl")
        loop_s, steps = float(records[-1]["time"]), int(records[-1]["step"])
    else:
        trainer = trl_trainer(Path(config["export"]), config["texts"], Path(config["out"]), SHAPE.train_steps)
        output = trainer.train()
        loop_s, steps = float(output.metrics["train_runtime"]), int(output.global_step)
    peak = torch.cuda.max_memory_allocated() / MIB if torch.cuda.is_available() else None
    print(RESULT_TAG + json.dumps({"loop_s": loop_s, "steps": steps, "cuda_peak_mb": peak}), flush=True)


def e2e_command(side: str, setup: FinetuneModel, prompts: GrpoPrompts) -> list[str]:
    out = setup.folder / "grpo" / f"e2e-{side}"
    if side == "ours":
        spec = {"argv": ours_train_argv(setup, prompts, out), "out": str(out)}
    else:
        spec = {"export": str(setup.export_dir), "texts": prompts.texts, "out": str(out)}
    code = (
        f"import sys; sys.path[:0] = [{str(BENCH)!r}, {str(REPO)!r}]; import test_grpo_step; "
        f"test_grpo_step.e2e_child({side!r}, {json.dumps(spec)!r})"
    )
    return [PYTHON, "-c", code]


def e2e_result(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_TAG)]
    if not lines:
        raise RuntimeError(f"the end-to-end child printed no {RESULT_TAG.strip()} line:\n{stdout[-2000:]}")
    return json.loads(lines[-1][len(RESULT_TAG) :])


# ---------------------------------------------------------------- the benchmarks


def _row(case: str, impl: str, setup: FinetuneModel) -> dict[str, Any]:
    size = setup.size
    return {
        "case": case,
        "impl": impl,
        "size": size.name,
        "dim": size.dim,
        "n_layers": size.n_layers,
        "vocab": size.config().vocab_size,
        "prompts": SHAPE.prompts,
        "group": SHAPE.group,
        "rows": SHAPE.rows,
        "max_new_tokens": SHAPE.max_new_tokens,
        "reward": SHAPE.reward,
        "beta": 0.0,
        "epsilon": EPSILON,
        "loss_type": "token (ours) / dapo (TRL)",
        "precision": precision_name(DEVICE),
    }


def _environment() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "threads": torch.get_num_threads(), **versions(ON_GPU), "trl": _version("trl")}


def _memory(facts: dict[str, Any], step: Callable[[], Any]) -> dict[str, Any]:
    memory = cuda_peak_mb(step) if ON_GPU else {}
    tracked = facts["memory"]()
    return {**memory, "tracked_mb": tracked["total"] / MIB, "tracked_device": DEVICE.type, "tracked_by_kind": tracked}


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_generate(
    benchmark: Any, recorder: Recorder, finetune_model: FinetuneModel, grpo_prompts: GrpoPrompts, impl: str
) -> None:
    if impl != "ours":
        require_trl()
    benchmark.group = f"GRPO generation {finetune_model.size.name} {SHAPE.label} {precision_name(DEVICE)}"
    torch.manual_seed(0)
    make = ours_generate if impl == "ours" else trl_generate
    sample, facts = make(finetune_model, grpo_prompts)
    counts: list[int] = []

    def step() -> None:
        counts.append(sample())

    step()
    assert 0 < counts[0] <= SHAPE.rows * SHAPE.max_new_tokens, counts
    times = time_steps(benchmark, step, ON_GPU, rounds(5))
    if benchmark.disabled or not times:
        return
    row = {
        **_row("grpo-generate", impl, finetune_model),
        "tokens": sum(counts) / len(counts),
        "positions": SHAPE.rows * SHAPE.max_new_tokens,
        "calls": len(counts),
        **timing(times),
        **_memory(facts, step),
        **_environment(),
    }
    row["tokens_per_s"] = row["tokens"] / (row["ms"] / 1e3)
    recorder.add("finetune", row)
    benchmark.extra_info.update({"ms_per_call": round(row["ms"], 1), "tokens_per_s": round(row["tokens_per_s"])})
    logger.info("generate %s: %s", impl, json.dumps({k: row[k] for k in ("ms", "tokens", "tokens_per_s")}))


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_update(
    benchmark: Any, recorder: Recorder, finetune_model: FinetuneModel, grpo_prompts: GrpoPrompts, impl: str
) -> None:
    if impl != "ours":
        require_trl()
    benchmark.group = f"GRPO update {finetune_model.size.name} {SHAPE.label} {precision_name(DEVICE)}"
    if ON_GPU:
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    step, facts = (ours_update if impl == "ours" else trl_update)(finetune_model, grpo_prompts)
    first_loss = float(step())
    assert math.isfinite(first_loss) and abs(first_loss - facts["expected_loss"]) < LOSS_TOLERANCE, (
        f"{impl}: first loss {first_loss}, expected −Σ A·tokens ÷ tokens = {facts['expected_loss']}"
    )
    times = time_steps(benchmark, step, ON_GPU, rounds(5))
    if benchmark.disabled or not times:
        return
    row = {
        **_row("grpo-update", impl, finetune_model),
        **{k: facts[k] for k in ("tokens", "completion_tokens", "positions", "expected_loss")},
        **timing(times),
        "first_loss": first_loss,
        **_memory(facts, step),
        **_environment(),
    }
    row["tokens_per_s"] = row["tokens"] / (row["ms"] / 1e3)
    row["completion_tokens_per_s"] = row["completion_tokens"] / (row["ms"] / 1e3)
    recorder.add("finetune", row)
    benchmark.extra_info.update({"ms_per_step": round(row["ms"], 1), "tokens_per_s": round(row["tokens_per_s"])})
    logger.info("update %s: %s", impl, json.dumps({k: row[k] for k in ("ms", "tokens", "tokens_per_s", "tracked_mb")}))


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_train(
    benchmark: Any, recorder: Recorder, finetune_model: FinetuneModel, grpo_prompts: GrpoPrompts, impl: str
) -> None:
    if impl != "ours":
        require_trl()
    from peak_rss import run_measured

    benchmark.group = f"GRPO {SHAPE.train_steps} steps end to end {finetune_model.size.name} {SHAPE.label}"
    command = e2e_command(impl, finetune_model, grpo_prompts)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs: list[Any] = []
    benchmark.pedantic(lambda: runs.append(run_measured(command, cwd=str(REPO), env=env)), rounds=1, iterations=1)
    run = runs[-1].check(f"the {impl} GRPO run")
    result = e2e_result(run.stdout)
    assert result["steps"] == SHAPE.train_steps, result
    if benchmark.disabled:
        return
    row = {
        **_row("grpo-train", impl, finetune_model),
        "steps": result["steps"],
        "wall_s": run.seconds,
        "loop_s": result["loop_s"],
        "s_per_step": result["loop_s"] / result["steps"],
        "peak_rss_mb": run.peak_rss_mb,
        **({"cuda_peak_mb": result["cuda_peak_mb"]} if result.get("cuda_peak_mb") is not None else {}),
        **_environment(),
    }
    recorder.add("finetune", row)
    benchmark.extra_info.update({"loop_s": round(row["loop_s"], 2), "peak_rss_mb": round(row["peak_rss_mb"])})
    logger.info("train %s: %s", impl, json.dumps({k: row[k] for k in ("wall_s", "loop_s", "peak_rss_mb")}))


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
