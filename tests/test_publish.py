"""engine.publish: a folder or a file appears whole or not at all, and what a dead process left is cleaned up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.publish import publish_directory, remove_stale_temporaries, temporary_sibling, write_text_atomic

DEAD_PID = 99999999  # no process has it


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_new_folder_appears_whole_and_a_failed_one_not_at_all(tmp_path):
    with publish_directory(tmp_path / "out") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-") and not (tmp_path / "out").exists()
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "out" / "a.txt").read_text() == "a" and hidden(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        with publish_directory(tmp_path / "other") as tmp:
            (tmp / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert not (tmp_path / "other").exists() and hidden(tmp_path) == []


def test_replacing_swaps_the_whole_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with publish_directory(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"] and hidden(tmp_path) == []


def test_stale_temporaries_of_dead_processes_go_and_a_moved_aside_folder_comes_back(tmp_path):
    dead_tmp = tmp_path / f".a.tmp-{DEAD_PID}"
    live_tmp = tmp_path / f".b.tmp-{os.getppid()}"  # a live process (the test runner's parent) may still write it
    moved = tmp_path / f".c.old-{DEAD_PID}"  # killed between the two renames of a replace
    for folder in (dead_tmp, live_tmp, moved):
        folder.mkdir()
    (moved / "kept.txt").write_text("kept")
    remove_stale_temporaries(tmp_path)
    assert not dead_tmp.exists() and live_tmp.exists()
    assert (tmp_path / "c" / "kept.txt").read_text() == "kept" and not moved.exists()
    remove_stale_temporaries(tmp_path, any_pid=True)  # the caller is the folder's only writer
    assert not live_tmp.exists()


def test_write_text_atomic_replaces_a_file_in_one_step(tmp_path):
    path = tmp_path / "latest"
    path.write_text("step_1\n")
    write_text_atomic(path, "step_2\n")
    assert path.read_text() == "step_2\n" and not temporary_sibling(path).exists()
