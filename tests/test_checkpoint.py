"""llama.training.checkpoint: round trip with tied weights, atomic publish and pruning, RNG states, and refusing
unsafe files."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from llama.model import Llama, LlamaConfig
from llama.training.checkpoint import (
    LATEST,
    MODEL_FILE,
    TRAINER_FILE,
    CheckpointError,
    checkpoint_name,
    find_checkpoint,
    list_checkpoints,
    load_model_weights,
    load_trainer_state,
    read_config,
    remove_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def tiny(**overrides) -> Llama:
    return Llama(LlamaConfig.from_preset("tiny", vocab_size=96, dim=64, **overrides))


def trained_pair(tie: bool) -> tuple[Llama, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = tiny(tie_embeddings=tie)
    optimizer = torch.optim.AdamW(model.configure_optimizer_groups(0.1), lr=1e-2)
    ids = torch.randint(0, 96, (2, 16))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    return model, optimizer


def save(out_dir: Path, step: int, model: Llama, optimizer=None, **kwargs) -> Path:
    state = {"step": step, "optimizer": optimizer.state_dict() if optimizer else None, "rng": rng_state()}
    return save_checkpoint(
        out_dir, checkpoint_name(step), model.state_dict(), state, {"model": {"dim": 64}, "step": step}, **kwargs
    )


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_restores_weights_and_optimizer(tmp_path, tie):
    model, optimizer = trained_pair(tie)
    path = save(tmp_path, 1, model, optimizer)
    with safe_open(str(path / MODEL_FILE), framework="pt") as f:
        names = set(f.keys())
    assert ("lm_head.weight" in names) != tie  # a tied matrix is stored once, under the embedding's name
    assert "model.embed_tokens.weight" in names

    fresh = tiny(tie_embeddings=tie)
    load_model_weights(path, fresh)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert (fresh.lm_head.weight is fresh.model.embed_tokens.weight) == tie
    state = load_trainer_state(path / TRAINER_FILE)
    fresh_optimizer = torch.optim.AdamW(fresh.configure_optimizer_groups(0.1), lr=1e-2)
    fresh_optimizer.load_state_dict(state["optimizer"])
    saved, loaded = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(saved[i]["exp_avg"], loaded[i]["exp_avg"]) for i in saved)
    assert read_config(path)["step"] == 1


def test_keeps_the_last_k_and_points_latest_at_the_newest(tmp_path):
    model = tiny()
    for step in range(1, 6):
        save(tmp_path, step, model, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert (tmp_path / LATEST).read_text().strip() == "step_000005"
    assert find_checkpoint(tmp_path) == tmp_path / "step_000005" == find_checkpoint(tmp_path / "step_000005")
    save(tmp_path, 5, model, keep_last=2)  # re-saving a step swaps the folder in place
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_a_killed_save_leaves_the_previous_checkpoint_in_charge(tmp_path):
    model = tiny()
    save(tmp_path, 2, model)
    torn = tmp_path / ".tmp-step_000004-999"  # what a save killed mid-way leaves
    torn.mkdir()
    (torn / MODEL_FILE).write_bytes(b"half")
    (tmp_path / "step_000003").mkdir()  # an incomplete folder is never a checkpoint
    assert find_checkpoint(tmp_path) == tmp_path / "step_000002"
    (tmp_path / LATEST).write_text("step_000009\n")  # latest naming a folder that is gone: fall back to the newest
    assert find_checkpoint(tmp_path) == tmp_path / "step_000002"
    remove_temporaries(tmp_path)
    assert not torn.exists()
    assert find_checkpoint(tmp_path / "nothing-here") is None


@pytest.mark.parametrize(
    "names",
    [
        (".old-step_000002-{pid}", ".tmp-step_000002-{pid}"),  # saves before engine.publish
        (".step_000002.old-{pid}", ".step_000002.tmp-{pid}"),
    ],
    ids=["legacy", "publish"],
)
def test_a_resave_killed_between_its_renames_is_put_back(tmp_path, names):
    """Re-saving step 2 moves it aside before renaming the new copy in; killed in between, the next start restores it
    (whatever process left it: the run is the folder's only writer)."""
    model = tiny()
    save(tmp_path, 2, model)
    old, new = (name.format(pid=os.getpid()) for name in names)  # a live pid: still cleaned up
    os.replace(tmp_path / "step_000002", tmp_path / old)
    (tmp_path / new).mkdir()  # the complete new copy that was about to be renamed in
    remove_temporaries(tmp_path)
    assert find_checkpoint(tmp_path) == tmp_path / "step_000002"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_a_resave_replaces_the_step_whole_and_leaves_no_temporaries(tmp_path):
    model = tiny()
    save(tmp_path, 2, model)
    first = (tmp_path / "step_000002" / MODEL_FILE).read_bytes()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save(tmp_path, 2, model)
    assert (tmp_path / "step_000002" / MODEL_FILE).read_bytes() != first
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


class RunsCode:
    """Unpickling this would call ``Path.touch(marker)``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_object_is_refused_with_one_line_and_never_run(tmp_path):
    path = save(tmp_path, 1, tiny())
    marker = tmp_path / "code-ran"
    torch.save({"step": 1, "payload": RunsCode(marker)}, path / TRAINER_FILE)
    with pytest.raises(CheckpointError) as info:
        load_trainer_state(path / TRAINER_FILE)
    message = str(info.value)
    assert message.startswith(f"refusing to load {path / TRAINER_FILE}") and "\n" not in message
    assert "it would load the global getattr" in message  # names what it refused (Path.touch pickles via getattr)
    assert not marker.exists()


def test_weights_of_another_model_are_refused(tmp_path):
    path = save(tmp_path, 1, tiny())
    with pytest.raises(CheckpointError, match="does not fit this model") as info:
        load_model_weights(path, Llama(LlamaConfig.from_preset("tiny", vocab_size=96, dim=128)))
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="missing"):
        load_model_weights(path, tiny(n_layers=3))
    (path / "config.json").write_text("{torn")
    with pytest.raises(CheckpointError, match="torn"):
        read_config(path)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    draw = lambda: (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(3))  # noqa: E731
    first = draw()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = draw()
    assert first[:3] == second[:3] and torch.equal(first[3], second[3])
