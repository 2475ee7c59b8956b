"""bench/gpu_check.py's stage flow on the CPU: time boxes, failures, the budget, results kept when cut short.

The stages here are small Python commands; what is asserted is what the runner does with them (which
status each gets, what lands in the output folder), never how long anything takes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402

PY = sys.executable
FOREVER = [PY, "-c", "import time; time.sleep(600)"]
DEAF = [PY, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"]


def stage(name: str, argv: list[str], seconds: float = 60, **kw) -> gpu_check.Stage:
    return gpu_check.Stage(name, seconds, argv, f"{name} stage", **kw)


def test_each_stage_gets_its_status_and_results_are_collected(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(gpu_check, "RESULTS", results)
    monkeypatch.setattr(gpu_check, "GRACE_S", 1.0)
    writes = [PY, "-c", f"open({str(results / 'train.json')!r}, 'w').write('{{}}')"]
    plan = [
        stage("writes", writes, collects=["train.json", "absent.json"]),
        stage("fails", [PY, "-c", "raise SystemExit(3)"]),
        stage("hangs", FOREVER, seconds=1),
        stage("deaf", DEAF, seconds=1),  # ignores SIGINT: killed after the grace period
        stage("after", [PY, "-c", "print('still runs')"]),
    ]
    out = tmp_path / "out"
    summary = gpu_check.run_check(plan, budget=600, out=out)
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status == {
        "writes": "passed",
        "fails": "failed",
        "hangs": "timed out",
        "deaf": "timed out",
        "after": "passed",
    }
    assert summary["stages"][1]["returncode"] == 3 and summary["stages"][3]["returncode"] == -signal.SIGKILL
    assert summary["ok"] is False
    assert (out / "train.json").read_text() == "{}" and not (out / "absent.json").exists()
    assert json.loads((out / "gpu_check.json").read_text()) == summary
    log = (out / "stages.log").read_text()
    assert "===== hangs (1 s box)" in log and "still runs" in log


def test_a_spent_budget_skips_stages_but_keeps_the_report(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "GRACE_S", 1.0)
    plan = [
        stage("long", FOREVER, seconds=600),
        stage("skipped", [PY, "-c", "pass"]),
        stage("report", [PY, "-c", "print('report')"], seconds=30, always=True),
    ]
    summary = gpu_check.run_check(plan, budget=40, out=tmp_path)  # 30 s kept for the report: "long" gets 10
    status = [s["status"] for s in summary["stages"]]
    assert status == ["timed out", "not run (budget spent)", "passed"]


RUNNER = """
import sys
sys.path.insert(0, {bench!r})
import gpu_check
marker = {marker!r}
gpu_check.PLAN = [gpu_check.Stage("first", 60, [sys.executable, "-c", "pass"], "ok"),
                  gpu_check.Stage("stuck", 600, [sys.executable, "-c",
                      "import time; open(" + repr(marker) + ", 'w').write('x'); time.sleep(600)"], "hangs"),
                  gpu_check.Stage("never", 60, [sys.executable, "-c", "pass"], "not reached")]
raise SystemExit(gpu_check.main(["--out", {out!r}]))
"""


def test_sigterm_keeps_what_finished(tmp_path):
    marker, out = tmp_path / "started", tmp_path / "out"
    code = RUNNER.format(bench=str(REPO / "bench"), marker=str(marker), out=str(out))
    proc = subprocess.Popen([PY, "-c", code], cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():  # the marker the stuck stage writes: then the first stage has finished
            assert proc.poll() is None, f"the runner exited ({proc.returncode}) before the stuck stage started"
            assert time.monotonic() < deadline, "the stuck stage never started"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 1
    finally:
        proc.kill()
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["interrupted"] == "SIGTERM"
    assert [s["status"] for s in summary["stages"]] == ["passed", "not run", "not run"]


def test_the_real_plan_names_files_that_exist():
    for s in gpu_check.PLAN:
        for arg in s.argv:
            if arg.startswith(("bench/", "tests/")):
                path = REPO / arg.split("::")[0]
                assert path.exists(), f"stage {s.name}: {arg} does not exist"
                if "::" in arg:
                    assert f"def {arg.split('::')[1]}(" in path.read_text(), f"stage {s.name}: no test {arg}"
    assert gpu_check.main(["--list"]) == 0
    with pytest.raises(SystemExit):
        gpu_check.main(["--only", "no-such-stage"])


def test_profile_stage_runs_on_cpu_and_writes_its_table(tmp_path):
    """bench/profile_step.py --smoke: ours (Triton interpreter) and transformers, one tiny step each."""
    pytest.importorskip("transformers")
    out = tmp_path / "profile_step.json"
    proc = subprocess.run(
        [PY, "bench/profile_step.py", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["impl"] for r in runs] == ["triton", "hf"]
    for r in runs:
        assert r["top"] and r["wall_ms_per_step"] > 0 and r["gpu_busy_share"] is None  # no GPU: no busy share
    assert "#### minimind-26m triton fp32" in out.with_suffix(".md").read_text()
