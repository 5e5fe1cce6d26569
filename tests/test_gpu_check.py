"""
tools/gpu_check.py before a GPU session: its small mode (--tiny, the same parts at small shapes)
runs end to end on a CPU and every part reports; a part past its budget is stopped and recorded
while the check goes on; a package that cannot be imported stops it before any part, in one line;
train.py's step clock on CUDA times each part's queued kernels in that part's lap.

Test:  OMP_NUM_THREADS=1 python -m pytest tests/test_gpu_check.py -q      (CPU, ~45 s)
"""
import json
import os
import subprocess
import sys
import types

import pytest

pytest.importorskip("diffusers")  # the real presets' VAE and umT5 stand-ins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import common
import gpu_check

ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def test_tiny_mode_runs_every_part(tmp_path):
    r = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["env"]["tiny"]  # no CUDA: small shapes by themselves
    assert [n for n in gpu_check.BUDGET_S if "error" in res[n]] == [], {n: res[n].get("log_tail") for n in res}
    assert res["parity"]["ok"] and res["tiny"]["ok"] and res["tiny"]["resume_equal"]
    assert sorted(res["tiny"]["window_starts"]) == [0, 3]  # a plain and a streaming step
    for v in res["parity"]["sets"].values():  # float32 replays the fixtures; bf16 is near, not equal
        assert max(v["max_diff"].values()) <= 1e-4 and 0 < v["bf16_rel_l2"] <= gpu_check.BF16_BOUND
    bench = res["bench"]
    assert bench["latent_fps"] > 0 and bench["ckpt"]["seconds"] > 0 and bench["ckpt"]["predicted_mb"] > 0
    whole, tiled = bench["vae"]
    assert tiled["tile"] and tiled["predicted_mb"] < whole["predicted_mb"]
    for name, preset in [("full", "self-forcing"), ("24gb", "self-forcing-24gb")]:
        assert res[name]["preset"] == preset and res[name]["steps"] == 2 and res[name]["predicted_gib"] > 0
    report = (tmp_path / "gpu_check.txt").read_text()
    assert "resume from step 1: the same step-2 row" in report and "failed: none" in report


def test_a_late_part_is_stopped_and_the_check_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.BUDGET_S, "tiny", 1)  # three train.py runs cannot finish in 1 s
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    gpu_check.main(gpu_check.Args(out=str(tmp_path), parts=("tiny", "parity")))
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["tiny"]["error"] == "over its budget of 1 s"
    assert res["parity"]["ok"]  # the next part ran
    assert "failed: ['tiny']" in (tmp_path / "gpu_check.txt").read_text()


def test_a_package_that_cannot_be_imported_stops_it_before_any_part(tmp_path):
    # a diffusers that fails on import as the real one does when a need of its own is missing
    (tmp_path / "fake" / "diffusers").mkdir(parents=True)
    (tmp_path / "fake" / "diffusers" / "__init__.py").write_text(
        "raise ImportError(\"No package metadata was found for requests\\nTry: pip install ...\")\n")
    env = dict(ENV, PYTHONPATH=str(tmp_path / "fake"))
    r = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == ("gpu check stopped before any part: cannot import diffusers: "
                                                 "No package metadata was found for requests")
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert res["error"] == ["diffusers: No package metadata was found for requests"]
    assert res["env"]["transformers"] and "diffusers" not in res["env"]
    assert not list((tmp_path / "out").glob("part_*.json"))  # no part ran


def test_a_step_clock_lap_on_cuda_counts_the_kernels_still_queued(monkeypatch):
    # CUDA without a GPU: a fake clock, and a synchronize that "runs" the queued kernels by advancing it
    clock_now, queued = [100.0], [0.0]

    def synchronize():
        clock_now[0] += queued[0]
        queued[0] = 0.0
    monkeypatch.setattr(common, "time", types.SimpleNamespace(time=lambda: clock_now[0]))
    monkeypatch.setattr(common.torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(common.torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(common.torch.cuda, "memory_allocated", lambda: 0)
    monkeypatch.setattr(common.torch.cuda, "max_memory_allocated", lambda: 0)
    clock = common.StepClock("cuda:0")
    queued[0] = 5.0  # the rollout queued 5 s of kernels and the host ran ahead
    clock.lap("rollout")
    clock.lap("reward")  # nothing queued
    row = clock.row(0.0)
    assert row["time/rollout_s"] == 5.0 and row["time/reward_s"] == 0.0 and row["time/step_s"] == 5.0
