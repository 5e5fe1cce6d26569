"""
The user's worst day: every flag out of range, every file missing or broken, a resume with
changed flags, a damaged checkpoint, a reused out-dir, two runs in one folder, a kill -9 at a
random moment, weights that blow up. Each case must end in a one-line message before anything
loads, or be handled without losing or mixing a run.

Run:  python -m pytest tests/test_worst_day.py -q
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import checks
import reward_models
import rewards
import runs
import sample
import train
from common import UsageError
from test_train import ENV, ROOT, SMALL, rows, run, strip_times


def problems(tmp_path, *flags, monkeypatch=None):
    """The lines of the UsageError train.main raises for these flags (nothing may load first)."""
    if monkeypatch is not None:  # loading anything before the checks is a failure of its own
        monkeypatch.setattr(train, "load_base", lambda *a, **k: pytest.fail("the model loaded first"))
        monkeypatch.setattr(train, "FrozenParts", lambda *a, **k: pytest.fail("umT5 / the VAE loaded first"))
    out = ["--out-dir", str(tmp_path / "run")] if "--out-dir" not in flags else []
    with pytest.raises(UsageError) as e:
        train.main(train.parse_args(SMALL + list(flags) + out))
    return str(e.value).splitlines()


@pytest.mark.parametrize("flags,message", [
    (["--micro-batch", "0"], "--micro-batch 0: must be >= 1"),
    (["--prompts-per-step", "0"], "--prompts-per-step 0: must be >= 1"),
    (["--group-size", "0"], "--group-size 0: must be >= 1"),
    (["--num-frames", "0"], "--num-frames 0: must be >= 1"),
    (["--window", "-3"], "--window -3: must be >= 0"),
    (["--eval-prompts", "0"], "--eval-prompts 0: must be >= 1"),
    (["--steps", "0", "--eval-every", "0"], "--steps 0: must be >= 1"),
    (["--keep-ckpts", "0"], "--keep-ckpts 0: must be >= 1"),
    (["--keep-ckpts", "-1"], "--keep-ckpts -1: must be >= 1"),
    (["--lr", "inf"], "--lr inf: must be a finite number > 0"),
    (["--lr", "-1e-3"], "--lr -0.001: must be a finite number > 0"),
    (["--local-attn", "4", "--sink", "3"], "--local-attn 4 --sink 3: rolling cache"),
    (["--height", "18"], "--height 18 --width 16: must be multiples of 4"),
    (["--num-frames", "4"], "must be multiples of the block size 3"),
    (["--micro-batch", "3"], "micro-batches of 3"),
    (["--rewards", "nope=1"], "unknown reward 'nope'"),
    (["--rewards", "hpsv2=1"], "hpsv2: HPS_v2.1_compressed.pt in"),
    (["--selective", "--rewards", "flicker=1"], "--selective needs at least two rewards"),
    (["--resume", "/nowhere"], "--resume /nowhere: no intact checkpoint"),
    (["--ckpt", "/nowhere.pt"], "not found: --ckpt /nowhere.pt"),
    (["--window-select", "random_choice"], "--window-starts []: give block-aligned starts"),
    (["--rewards"], "--rewards: none given; name at least one"),
    (["--rollout-batch", "-1"], "--rollout-batch -1: must be >= 0"),
    (["--out-dir", ""], "--out-dir '': give a folder name"),
])
def test_bad_flags_fail_in_one_line_before_anything_loads(tmp_path, monkeypatch, flags, message):
    monkeypatch.setattr(reward_models, "WEIGHTS_DIR", str(tmp_path))  # no learned-reward weights here
    lines = problems(tmp_path, *flags, monkeypatch=monkeypatch)
    assert any(message in line for line in lines), lines
    assert not (tmp_path / "run").exists()  # nothing written


def test_every_problem_at_once_exit_2_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--micro-batch", "0", "--lr", "nan", "--rewards", "nope",
                        "--prompt-file", str(tmp_path), "--out-dir", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines), lines
    assert "--prompt-file" in r.stderr and "not a file" in r.stderr
    assert not (tmp_path / "o").exists()


def test_prompt_file_and_out_dir_problems(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert any("no prompts in it" in line for line in problems(tmp_path, "--prompt-file", str(empty)))
    assert any("--prompt-file" in line and "not a file" in line for line in problems(tmp_path, "--prompt-file", str(tmp_path)))
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert any("is a file, not a folder" in line for line in problems(tmp_path, "--out-dir", str(afile)))
    if checks.importlib.util.find_spec("wandb") is None:
        assert any("--track needs the wandb package" in line for line in problems(tmp_path, "--track"))


# a user's reward file that cannot work, and how its one line must read
BROKEN_REWARDS = {
    "import torch\ndef r(videos):\n    return videos.mean((1, 2, 3, 4))\n": "takes 1 positional argument but 2",
    "import torch\ndef r(videos, prompts):\n    return videos.mean((2, 3, 4))\n":
        "returned shape (2, 3), expected (2,)",
    "def r(videos, prompts):\n    raise RuntimeError('no GPU here')\n": "RuntimeError: no GPU here",
    "import torch\ndef r(videos, prompts):\n    return torch.full((len(videos),), 1e39, dtype=torch.float64)\n":
        "beyond float32's range (largest |score| 1e+39",
}


@pytest.mark.parametrize("code", BROKEN_REWARDS)
def test_a_broken_reward_is_one_line_naming_it_and_its_file_before_anything_loads(tmp_path, monkeypatch, code):
    f = tmp_path / "mine.py"
    f.write_text(code)
    lines = problems(tmp_path, "--rewards", "color_match=1", f"{f}:r=0", monkeypatch=monkeypatch)
    assert len(lines) == 1 and lines[0].startswith(f"--rewards mine.r ({f}): on a probe video"), lines
    assert BROKEN_REWARDS[code] in lines[0]


def test_a_reward_that_writes_into_its_videos_changes_nothing_for_the_others(tmp_path):
    f = tmp_path / "vandal.py"
    f.write_text("import torch\ndef zero(videos, prompts):\n    videos.zero_()\n    return torch.zeros(len(videos))\n")
    v = torch.rand(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    before = v.clone()
    alone = rewards.MultiReward(["colorfulness=1"]).score(v, ["a", "b"])
    both = rewards.MultiReward([f"{f}:zero=0", "colorfulness=1"]).score(v, ["a", "b"])  # weight 0: logged only
    assert torch.equal(both["colorfulness"], alone["colorfulness"]) and alone["colorfulness"].min() > 0
    assert torch.equal(v, before)  # nor the videos the caller keeps (the eval mp4)


def test_user_files_and_folders_that_break_fail_in_one_line(tmp_path, monkeypatch):
    latin = tmp_path / "prompts.txt"
    latin.write_bytes("a red circle moving left\na blue café\n".encode("latin-1"))
    assert problems(tmp_path, "--prompt-file", str(latin), monkeypatch=monkeypatch) == [
        f"--prompt-file {latin}: not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"]
    exits = tmp_path / "exits.py"
    exits.write_text("import sys\nsys.exit(3)\n")
    assert any(f"running '{exits}' called exit(3)" in line
               for line in problems(tmp_path, "--rewards", f"{exits}:r=1", monkeypatch=monkeypatch))
    afile = tmp_path / "afile"
    afile.write_text("x")
    afile.chmod(0o755)  # even an executable file is no folder
    assert problems(tmp_path, "--out-dir", str(afile / "sub"), monkeypatch=monkeypatch) == [
        f"--out-dir {afile / 'sub'}: {afile} is a file, not a folder"]
    empty = tmp_path / "empty_lora"
    empty.mkdir()
    assert any(f"--lora-init {empty}: no adapter_model.safetensors" in line
               for line in problems(tmp_path, "--lora-init", str(empty), monkeypatch=monkeypatch))


def test_a_flag_error_under_torchrun_is_printed_once_by_rank_0(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py"] + SMALL + ["--lr", "-1", "--out-dir", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.stderr.count("error: --lr -1.0: must be a finite number > 0") == 1, r.stderr
    # torchrun then reports the failed ranks in its own words (its report, not ours to silence): our
    # code 2, and no traceback of train.py's (torchrun's own follows its "Traceback" line)
    assert "exitcode  : 2" in r.stderr and "train.py\", line" not in r.stderr


def test_settings_that_cannot_learn_warn(tmp_path):
    const = tmp_path / "const.py"
    const.write_text("import torch\ndef one(videos, prompts):\n    return torch.ones(len(videos))\n")
    r = run(["--steps", "3", "--eval-every", "0", "--group-size", "1", "--micro-batch", "2", "--prompts-per-step", "2",
             "--window-starts", "0", "--released.aux-rewards", "2", "--prompts", "a purple cat",
             "--rewards", f"{const}:one=1"], tmp_path / "run")
    out = r.stdout
    assert "--group-size 1: every advantage is 0" in out
    assert "--window-starts is used only by --window-select random_choice" in out
    assert "--released.aux-rewards: used only with --selective" in out
    assert "prompt(s) the tiny model cannot read" in out and "a purple cat" in out
    assert "in most prompt groups every video got the same reward" in out
    assert "threads: " in out


# ---- resume: flags checked against the checkpoint, damaged files skipped

@pytest.fixture()
def two_steps(tmp_path):
    out = tmp_path / "run"
    run(["--steps", "2", "--ckpt-every", "1", "--keep-ckpts", "3", "--eval-every", "0"], out)
    return out


def test_resume_refuses_changed_flags(two_steps):
    lines = problems(two_steps.parent, "--steps", "4", "--ckpt-every", "1", "--keep-ckpts", "3", "--eval-every",
                     "0", "--resume", "latest", "--out-dir", str(two_steps), "--seed", "7", "--rewards",
                     "colorfulness=1", "--height", "32")
    for flag in ("--seed 7", "--rewards ['colorfulness=1']", "--height 32"):
        assert any(line.startswith(flag) and "the checkpoint was trained with" in line for line in lines), lines
    lines = problems(two_steps.parent, "--steps", "2", "--resume", "latest", "--out-dir", str(two_steps),
                     "--ckpt-every", "1", "--keep-ckpts", "3", "--eval-every", "0")
    assert any("already at step 2" in line for line in lines)


def test_resume_applies_a_deliberate_change(two_steps):
    r = run(["--steps", "3", "--ckpt-every", "1", "--keep-ckpts", "3", "--eval-every", "0", "--resume", "latest",
             "--lr", "5e-4"], two_steps)
    assert "resume: --lr 0.0005 (was 0.001)" in r.stdout
    assert [x["lr"] for x in rows(two_steps)] == [1e-3, 1e-3, 5e-4]


@pytest.mark.parametrize("damaged", ["adapters.safetensors", "optim.safetensors", "state.json"])
def test_damaged_newest_checkpoint_falls_back(two_steps, damaged):
    f = two_steps / "ckpt_000002" / damaged
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # a half-written file
    with open(two_steps / "metrics.jsonl", "a") as m:
        m.write('{"step": 3, "rew')  # half a row, as a full disk leaves it
    r = run(["--steps", "3", "--ckpt-every", "1", "--keep-ckpts", "3", "--eval-every", "0", "--resume", "latest"],
            two_steps)
    assert f"ckpt_000002 is damaged" in r.stdout and "resumed from" in r.stdout and "ckpt_000001" in r.stdout
    assert "dropped 2 row(s)" in r.stdout  # step 2's row (after the checkpoint used) and the half row
    assert [x["step"] for x in rows(two_steps)] == [1, 2, 3]
    json.loads((two_steps / "ckpt_000002" / "state.json").read_text())  # rewritten whole at step 2


# ---- one run per out-dir

def test_reused_out_dir_refuses_then_overwrite_replaces(two_steps):
    lines = problems(two_steps.parent, "--out-dir", str(two_steps))
    assert any("holds another run (2 checkpoint(s), a metrics.jsonl)" in line for line in lines)
    run(["--steps", "1", "--eval-every", "0", "--overwrite", "--ckpt-every", "1"], two_steps)
    assert sorted(p.name for p in two_steps.glob("ckpt_*")) == ["ckpt_000001"]  # the old run is gone
    assert [x["step"] for x in rows(two_steps)] == [1]


# a process that holds an out-dir's lock (runs.take_lock) until it is killed
HOLD = "import sys, time, runs; runs.take_lock(sys.argv[1]); print('held', flush=True); time.sleep(120)"


def test_lock_stops_a_second_live_run_and_a_stale_one_does_not(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lines = problems(tmp_path, "--out-dir", str(out))
        assert any(f"a live run (pid {holder.pid} on {socket.gethostname()})" in line for line in lines), lines
        with pytest.raises(UsageError, match="a live run"):  # taking it is atomic, not check-then-write
            runs.take_lock(str(out))
    finally:
        holder.kill()
        holder.wait()
    # the holder died and left its lock file; the pid written in it now names a live process (this
    # one: as when the pid was reused): nobody holds the lock, so it is stale all the same
    (out / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    run(["--steps", "1", "--eval-every", "0"], out)
    assert not (out / ".lock").exists()  # released at the end


def test_two_concurrent_runs(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py"] + SMALL + ["--steps", "30", "--eval-every", "0",
                                                                     "--out-dir", str(out)],
                             cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (out / ".lock").exists() and time.time() < deadline:
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "train.py"] + SMALL + ["--out-dir", str(out), "--resume", "latest"],
                                cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"a live run (pid {first.pid} on " in second.stderr
    finally:
        first.kill()
        first.wait()


def test_kill_9_at_a_random_moment_then_resume_is_exact(tmp_path):
    common = SMALL + ["--steps", "4", "--ckpt-every", "1", "--keep-ckpts", "4", "--eval-every", "0"]
    ref, victim = tmp_path / "ref", tmp_path / "victim"
    run(common[len(SMALL):], ref)
    t_run = sum(r["time/step_s"] for r in rows(ref))
    delay = random.Random(os.getpid()).uniform(0.3, 1.0) * (t_run + 3)  # anywhere in the run, start-up included
    p = subprocess.Popen([sys.executable, "train.py"] + common + ["--out-dir", str(victim)], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    if (victim / "ckpt_000004").is_dir():  # killed after its last checkpoint (drawing the figures, exiting)
        # the training is complete: a resume has nothing left to train and says so in one line
        again = subprocess.run([sys.executable, "train.py"] + common + ["--out-dir", str(victim), "--resume", "latest"],
                               cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert again.returncode == 2 and "already at step 4" in again.stderr
    else:
        resume = ["--resume", "latest"] if victim.exists() else []
        run(common[len(SMALL):] + resume, victim)
    assert [strip_times(r) for r in rows(victim)] == [strip_times(r) for r in rows(ref)], f"killed after {delay:.1f} s"


# ---- memory: a peak that cannot fit stops before anything loads

def test_a_peak_that_cannot_fit_stops_before_loading(tmp_path, monkeypatch, capsys):
    import memory
    assert memory.available("cpu")[0] > 0  # this machine's MemAvailable (Linux)
    monkeypatch.setattr(memory, "available", lambda device: (1e6, "the memory available"))  # 1 MB left
    lines = problems(tmp_path, monkeypatch=monkeypatch)
    assert len(lines) == 1 and lines[0].startswith("the memory model predicts a peak of 0.0 GB, more than the "
                                                   "memory available (0.0 GB); levers: --grad-checkpointing"), lines
    assert lines[0].endswith("or --ignore-memory-check to go on anyway") and not (tmp_path / "run").exists()
    with pytest.raises(UsageError, match="more than the memory available"):  # sample.py, before loading
        sample.main(sample.Args(num_frames=3, height=16, width=16, out=str(tmp_path / "v.mp4")))
    monkeypatch.undo()
    monkeypatch.setattr(memory, "available", lambda device: (1e6, "the memory available"))
    train.main(train.parse_args(SMALL + ["--steps", "1", "--eval-every", "0", "--ignore-memory-check",
                                         "--out-dir", str(tmp_path / "run")]))
    assert "(going on: --ignore-memory-check)" in capsys.readouterr().out
    assert [x["step"] for x in rows(tmp_path / "run")] == [1]


# ---- weights that blow up never ship

def test_non_finite_weights_stop_before_saving(tmp_path, monkeypatch):
    step = torch.optim.AdamW.step

    def blow_up(self, *a, **k):
        step(self, *a, **k)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.fill_(float("nan"))
    monkeypatch.setattr(torch.optim.AdamW, "step", blow_up)
    out = tmp_path / "run"
    with pytest.raises(UsageError, match="made the LoRA weights non-finite"):
        train.main(train.parse_args(SMALL + ["--steps", "2", "--ckpt-every", "1", "--eval-every", "0",
                                             "--out-dir", str(out)]))
    assert not list(out.glob("ckpt_*")) and not (out / "lora").exists()


def test_rewards_refuse_non_finite_pixels():
    v = torch.rand(2, 3, 3, 8, 8)
    v[1, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite pixels"):
        rewards.MultiReward(["flicker=1"]).score(v, ["a", "b"])


def test_metrics_are_strict_json(tmp_path, monkeypatch):
    import nft_loss
    monkeypatch.setattr(nft_loss, "nft_policy_loss", lambda *a, **k: torch.tensor(float("nan")))
    with pytest.raises(UsageError):
        train.main(train.parse_args(SMALL + ["--steps", "5", "--eval-every", "0", "--out-dir", str(tmp_path / "r")]))

    def no_constants(name):
        raise ValueError(f"{name} in metrics.jsonl")
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    parsed = [json.loads(line, parse_constant=no_constants) for line in lines]
    assert parsed[0]["grad_norm"] is None and parsed[0]["skipped"] is True


# ---- sample.py

def test_sample_flags_fail_before_loading(tmp_path):
    def lines(**kw):
        with pytest.raises(UsageError) as e:
            sample.main(sample.Args(**kw))
        return str(e.value)
    assert "not multiples of the block size 3" in lines(switch_frames=[4], prompts=["a", "b"], num_frames=9)
    assert "makes 2 segments but 1 --prompts" in lines(switch_frames=[3], num_frames=9)
    assert "strictly increasing" in lines(switch_frames=[6, 3], prompts=["a", "b", "c"], num_frames=9)
    assert "outside the video" in lines(switch_frames=[9], prompts=["a", "b"], num_frames=9)
    assert "--num-frames 10" in lines(num_frames=10)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):  # root may write anywhere
        assert "cannot write into" in lines(out=str(ro / "v.mp4"))
    assert "is a folder" in lines(out=str(tmp_path))
    # a name ffmpeg cannot write H.264 into is refused up front, not after sampling
    for name in ("v.txt", "v.webm", "v"):
        assert "not a video file name; end it in .mp4, .mov, .mkv, .avi" in lines(out=str(tmp_path / name))
    assert "--prompts: give at least one prompt" in lines(prompts=[])


def test_sample_several_prompts_write_one_file_each(tmp_path):
    sample.main(sample.Args(prompts=["a red circle moving left", "a blue square moving up"], num_frames=3,
                            height=16, width=16, out=str(tmp_path / "clip.mov")))
    assert sorted(os.listdir(tmp_path)) == ["clip_0.mov", "clip_1.mov"]
    assert (tmp_path / "clip_0.mov").read_bytes() != (tmp_path / "clip_1.mov").read_bytes()
