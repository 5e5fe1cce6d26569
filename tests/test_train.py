"""
train.py as a user runs it: the artifacts of a short run, exact resume, the same numbers under
torchrun with 2 processes, user reward files, selective mode, and the non-finite-loss guard.
Runs are tiny (16x16 pixels, 3 frames, 4 videos per step) so the file takes well under a minute.

Run:  python -m pytest tests/test_train.py -q
"""
import doctest
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import evaluation
import tiny_world
import common
import train

SMALL = ["--height", "16", "--width", "16", "--num-frames", "3", "--window", "0", "--prompts-per-step", "2",
         "--group-size", "2", "--micro-batch", "2", "--eval-prompts", "2", "--no-progress"]
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
TIMING = ("time/", "mem/")  # measurements, not results
RUN_ID = ("lineage",)  # which run wrote a row: drawn at random per run


def run(args, out, cmd=None):
    cmd = cmd or [sys.executable, "train.py"]
    r = subprocess.run(cmd + SMALL + ["--out-dir", str(out)] + args, cwd=ROOT, capture_output=True,
                       text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def rows(out, evals=False):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rs = [json.loads(line) for line in f]
    return [r for r in rs if ("eval/reward_mean" in r) == evals]


def strip_times(r):
    """A row's results: without its measurements and the id of the run that wrote it."""
    return {k: v for k, v in r.items() if not k.startswith(TIMING) and k not in RUN_ID}


def test_help_is_instant_and_offline():
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       env=ENV, timeout=60)
    assert r.returncode == 0 and "--rewards" in r.stdout and "--group-size" in r.stdout
    assert "Presets" in r.stdout


def test_smoke_artifacts(tmp_path):
    out = tmp_path / "run"
    run(["--steps", "2", "--ckpt-every", "1", "--eval-every", "2", "--keep-ckpts", "1",
         "--rewards", "colorfulness=1", "sharpness=0.5"], out)
    ck = out / "ckpt_000002"
    assert sorted(os.listdir(out)) == ["before_after.mp4", "before_after.png", "ckpt_000002", "eval",
                                       "metrics.jsonl", "reward_curve.png", "run.json"]  # keep-ckpts 1
    for f in ["adapters.safetensors", "optim.safetensors", "state.json", "lora/adapter_model.safetensors",
              "lora/adapter_config.json", "lora/pytorch_lora_weights.safetensors"]:
        assert (ck / f).is_file(), f
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 2 and state["args"]["steps"] == 2
    train_rows = rows(out)
    assert [r["step"] for r in train_rows] == [1, 2]
    for key in ["step", "reward_mean", "rewards/colorfulness/mean", "rewards/sharpness/mean", "loss", "kl",
                "r_mean", "mask_frac", "grad_norm", "lr", "time/step_s"]:
        assert key in train_rows[0], key
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)
    # diagnostics (docs/metrics.md): rewards that tell videos apart, θ_old trailing θ after the first update
    d1, d2 = train_rows
    assert d1["diag/flat_groups"] == d2["diag/flat_groups"] == 0 and d1["diag/r_dev"] > 0.01
    assert d1["diag/theta_old_mse"] == 0 < 1e-11 < d2["diag/theta_old_mse"], (d1, d2)  # linear: old = 0.001 θ_0 + 0.999 θ_1
    assert d1["diag/ref_share"] == 0 < d2["diag/ref_share"] < 1e-3  # θ = the base before the first update
    assert d2["diag/ref_share"] == pytest.approx(1e-4 * d2["kl"] / d2["loss"])
    ev = rows(out, evals=True)
    assert [r["step"] for r in ev] == [0, 2] and "eval/rewards/sharpness/mean" in ev[0]
    assert sorted(os.listdir(out / "eval")) == ["step_000000.mp4", "step_000002.mp4"]
    # the total is the weighted sum of the logged rewards
    r0 = train_rows[0]
    assert abs(r0["reward_mean"] - (r0["rewards/colorfulness/mean"] + 0.5 * r0["rewards/sharpness/mean"])) < 1e-5


def test_default_base_is_the_tiny_world_from_any_directory(tmp_path):
    """`python train.py` fine-tunes the committed shapes-world model, wherever it is started from,
    with the prompt-aware rewards; `--ckpt None` gives the random init."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + SMALL + ["--steps", "1", "--eval-every", "0"]
    a = subprocess.run(cmd + ["--out-dir", str(tmp_path / "a")], cwd=tmp_path, capture_output=True,
                       text=True, env=ENV, timeout=600)
    b = subprocess.run(cmd + ["--out-dir", str(tmp_path / "b"), "--ckpt", "None"], cwd=tmp_path,
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-2000:] + b.stderr[-2000:]
    assert "randomly initialised" not in a.stdout and "randomly initialised" in b.stdout
    ra, rb = rows(tmp_path / "a")[0], rows(tmp_path / "b")[0]
    assert {"rewards/shape_match/mean", "rewards/color_match/mean"} <= set(ra)
    # the pre-trained world draws the named colour; a random init does not
    assert ra["rewards/color_match/mean"] > 0.5 > rb["rewards/color_match/mean"]


def test_eval_prompts_span_colours_shapes_and_directions():
    """The fixed eval prompts (and so the before/after figure) are not one corner of the prompt set:
    the 4 the default run shows name 4 colours, all 3 shapes and 4 directions (taking every 12th
    prompt gave four "... circle moving left")."""
    picked = evaluation.pick_eval_prompts(tiny_world.PROMPTS, 4)
    assert len(set(picked)) == 4 and set(picked) <= set(tiny_world.PROMPTS)
    words = set(" ".join(picked).split())
    assert set(tiny_world.COLOR_WORDS) <= words
    assert set(tiny_world.SHAPES) <= words and set(tiny_world.DIRECTION_WORDS) <= words
    assert evaluation.pick_eval_prompts(["a", "b"], 4) == ["a", "b"]  # never more than there are
    assert doctest.testmod(evaluation).failed == 0


def test_resume_is_exact(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--ckpt-every", "2", "--eval-every", "0", "--keep-ckpts", "3"]
    run(["--steps", "4"] + common, a)
    run(["--steps", "2"] + common, b)
    with open(b / "metrics.jsonl", "a") as f:  # a crashed run may have logged past its checkpoint
        f.write(json.dumps({"step": 3, "reward_mean": -1.0}) + "\n")
    run(["--steps", "4", "--resume", "latest"] + common, b)
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb, strict=True):
        assert strip_times(x) == strip_times(y)
    assert ra[3]["loss"] != ra[2]["loss"]  # the comparison is not trivially true


def test_torchrun_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--steps", "2", "--ckpt-every", "0", "--eval-every", "0", "--rewards", "colorfulness=1"]
    run(common, one)
    run(common, two, cmd=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "train.py"])
    ra, rb = rows(one), rows(two)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2]  # both ran, both logged
    for x, y in zip(ra, rb, strict=True):
        for k in ["reward_mean", "rewards/colorfulness/mean", "loss", "kl", "r_mean", "grad_norm",
                  "diag/flat_groups", "diag/r_dev", "diag/theta_old_mse", "diag/ref_share"]:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-7), k


def test_impossible_layout_fails_clearly(tmp_path):
    r = subprocess.run([sys.executable, "train.py"] + SMALL + ["--micro-batch", "3", "--out-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode != 0 and "micro-batches of 3" in r.stderr


def test_user_reward_file_selective_mode_and_the_other_options(tmp_path):
    """A user reward file, selective mode, and every non-default objective option in one run."""
    f = tmp_path / "mine.py"
    f.write_text("def score(videos, prompts):\n    return videos.mean(dim=(1, 2, 3, 4))\n")
    out = tmp_path / "run"
    run(["--steps", "2", "--ckpt-every", "0", "--eval-every", "0", "--selective", "--prompts-per-step", "4",
         "--rewards", f"{f}:score=1", "colorfulness=1", "--released.train-timesteps", "raw", "--window-context", "noisy",
         "--ckpt", "None",
         "--adaptive-weight", "--reward-norm", "per-reward", "--old-decay", "delayed", "--no-global-std"], out)
    rs = rows(out)
    assert "rewards/mine.score/mean" in rs[0]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["grad_norm"] > 0 for r in rs)
    # the selective mask picks a strict subset (the top u; ties at the threshold may leave none)
    assert all(r["mask_frac"] < 1 for r in rs) and any(r["mask_frac"] > 0 for r in rs)
    # --old-decay delayed: θ_old = θ for 75 steps, so x̂_θ and x̂_old differ only by float rounding
    assert all(r["diag/theta_old_mse"] < 1e-11 for r in rs), [r["diag/theta_old_mse"] for r in rs]


def test_a_reward_that_cannot_tell_videos_apart_is_named(tmp_path):
    """Every group flat (a constant reward): r = 1/2 everywhere, the diagnostics say so and one
    warning names the reason after 3 steps."""
    f = tmp_path / "const.py"
    f.write_text("import torch\ndef score(videos, prompts):\n    return torch.zeros(len(videos))\n")
    r = run(["--steps", "4", "--ckpt-every", "0", "--eval-every", "0", "--rewards", f"{f}:score=1"], tmp_path / "run")
    rs = rows(tmp_path / "run")
    assert all(x["diag/flat_groups"] == 1 and x["diag/r_dev"] == 0 for x in rs)
    log = r.stdout + r.stderr
    assert log.count("warning: steps 1-3: in most prompt groups every video got the same reward (2 per") == 1, log[-3000:]


def test_diagnostics_arithmetic():
    """evaluation.diagnostics on hand-made numbers: which groups are flat, |r - 1/2|, the reference share."""
    total = torch.tensor([1.0, 1.0, 0.2, 0.7, 3.0, 3.0 + 1e-6])  # 3 groups of 2: equal, apart, within 1e-5
    r = torch.tensor([0.5, 0.5, 0.1, 0.9, 0.5, 0.5])
    d = evaluation.diagnostics(total, r, 2, {"loss": 0.5, "kl": 1000.0, "theta_old": 0.25}, kl_weight=1e-4)
    assert d["diag/flat_groups"] == pytest.approx(2 / 3)
    assert d["diag/r_dev"] == pytest.approx(0.8 / 6)
    assert d["diag/ref_share"] == pytest.approx(0.2) and d["diag/theta_old_mse"] == 0.25


def test_non_finite_loss_skips_then_stops(tmp_path, monkeypatch):
    args = train.parse_args(SMALL + ["--steps", "5", "--eval-every", "0", "--ckpt-every", "0",
                                     "--out-dir", str(tmp_path)])
    import nft_loss
    monkeypatch.setattr(nft_loss, "nft_policy_loss", lambda *a, **k: torch.tensor(float("nan")))
    with pytest.raises(common.UsageError, match="non-finite loss"):
        train.main(args)
    rs = rows(tmp_path)
    assert [r["skipped"] for r in rs] == [True, True]  # the third raises before logging
    assert not any(p.name.startswith("ckpt") for p in tmp_path.iterdir())
    shutil.rmtree(tmp_path)
