"""
A run is one lineage (runs.py): resume never mixes runs, a start never deletes what it did not
write, and two starts into one folder never both run. Each case is a small real run (16x16
pixels, 3 frames, 4 videos per step) or the checks alone (nothing loads).

Run:  python -m pytest tests/test_lineage.py -q
"""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

import checks
import runs
import train
from common import UsageError, find_file
from test_train import ENV, ROOT, SMALL, rows

FAST = ["--ckpt-every", "1", "--keep-ckpts", "9", "--eval-every", "0"]


def problems(out, *flags):
    """The lines of the UsageError train.main raises for these flags (the checks stop it first)."""
    with pytest.raises(UsageError) as e:
        train.main(train.parse_args(SMALL + list(flags) + ["--out-dir", str(out)]))
    return str(e.value).splitlines()


def main(flags, out, capsys=None):
    """A run in this process (no interpreter start-up: seconds less per run); returns what it printed."""
    train.main(train.parse_args(SMALL + list(flags) + ["--out-dir", str(out)]))
    return capsys.readouterr().out if capsys else ""


def logged(out):
    """Complete rows in out/metrics.jsonl so far (a run may be writing one)."""
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def state(ckpt):
    return json.loads((ckpt / "state.json").read_text())


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """A run of 3 steps with a checkpoint after each; tests work on copies (the `run` fixture)."""
    out = tmp_path_factory.mktemp("lineage") / "run"
    main(["--steps", "3"] + FAST, out)
    return out


@pytest.fixture()
def done(three_steps, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    return out


def test_ctrl_c_before_the_first_checkpoint_then_resume_latest_keeps_no_stale_rows(tmp_path, capsys):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "train.py"] + SMALL + ["--steps", "50", "--ckpt-every", "0",
                                                                 "--eval-every", "0", "--out-dir", str(out)],
                         cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while logged(out) < 2:  # two steps logged, no checkpoint yet
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130 and "Traceback" not in err and "interrupted: --resume latest" in err, err[-2000:]
    printed = main(["--steps", "2", "--resume", "latest"] + FAST, out, capsys)  # as the out-dir message advises
    assert "no checkpoint of the run" in printed and "starting fresh" in printed
    assert "dropped" in printed  # the interrupted run's rows, said in one line
    assert [x["step"] for x in rows(out)] == [1, 2]  # once each


def test_a_branch_replaces_what_came_after_its_checkpoint_and_latest_follows_it(done, capsys):
    first = state(done / "ckpt_000003")["lineage"]["id"]
    # a new lr from step 1, then interrupted after step 2 (its ckpt_000002 replaces the first run's)
    out = main(["--steps", "2", "--resume", str(done / "ckpt_000001"), "--lr", "5e-4"] + FAST, done, capsys)
    assert "resume: branch" in out
    assert "dropped 2 row(s) after step 1" in out  # the first run's steps 2 and 3
    branch = state(done / "ckpt_000002")["lineage"]
    assert branch["id"] != first and branch["ancestry"] == [[first, 1]]
    # --resume latest continues the branch (ckpt_000002), not the first run's newer ckpt_000003
    out = main(["--steps", "4", "--resume", "latest", "--lr", "5e-4"] + FAST, done, capsys)
    assert "resumed from" in out and "ckpt_000002 at step 2" in out
    assert "skipped ckpt_000003: of another run or an abandoned branch" in out
    rs = rows(done)
    assert [x["step"] for x in rs] == [1, 2, 3, 4]
    assert [x["lr"] for x in rs] == [1e-3, 5e-4, 5e-4, 5e-4]
    assert [x["lineage"] for x in rs] == [first] + [branch["id"]] * 3
    assert runs.read_lineage(str(done))["id"] == branch["id"]


def test_a_checkpoint_whose_name_and_step_disagree_is_refused(done):
    shutil.copytree(done / "ckpt_000001", done / "ckpt_000007")  # step 1 under the name of step 7
    lines = problems(done, "--steps", "9", "--resume", str(done / "ckpt_000007"))
    assert any("folder name says step 7 but its state.json says step 1" in line for line in lines), lines
    # --resume latest passes over it (noted as damaged) to the newest good one
    path, saved, notes, errors = checks.find_resume(train.parse_args(SMALL + ["--resume", "latest", "--out-dir",
                                                                              str(done)]))
    assert path.endswith("ckpt_000003") and not errors and any("ckpt_000007 is damaged" in n for n in notes)


def test_pruning_never_counts_a_foreign_checkpoint(done):
    foreign = done / "ckpt_000099"  # another run's checkpoint dropped into the folder
    shutil.copytree(done / "ckpt_000003", foreign)
    s = state(foreign)
    s["step"], s["lineage"] = 99, {"id": "0ther0ne", "ancestry": []}
    (foreign / "state.json").write_text(json.dumps(s))
    main(["--steps", "4", "--resume", "latest", "--ckpt-every", "1", "--keep-ckpts", "1", "--eval-every", "0"], done)
    assert sorted(p.name for p in done.glob("ckpt_*")) == ["ckpt_000004", "ckpt_000099"]


def test_resume_into_a_folder_holding_another_run_is_refused(done, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"lineage": {"id": "0ther0ne", "ancestry": []}}))
    (other / "metrics.jsonl").write_text(json.dumps({"step": 1, "lineage": "0ther0ne"}) + "\n")
    lines = problems(other, "--steps", "5", "--resume", str(done / "ckpt_000002"))
    assert any("the out-dir holds another run (lineage 0ther0ne" in line for line in lines), lines
    # an empty folder, or the checkpoint's own, takes it
    for out in (tmp_path / "empty", done):
        args = train.parse_args(SMALL + ["--steps", "5", "--resume", str(done / "ckpt_000002"), "--out-dir", str(out)])
        assert checks.check_run(args, 1, train.REGISTRY)[1] == str(done / "ckpt_000002")


def test_overwrite_deletes_only_its_own_files_and_start_up_keeps_a_users_backups(done):
    (done / "notes.txt").write_text("mine")
    (done / "notes.tmp1").write_text("mine too")
    shutil.copytree(done / "ckpt_000002", done / "ckpt_000002.old1")  # a user's backup
    (done / "ckpt_000003" / "why.txt").write_text("a note inside a checkpoint")
    lines = problems(done, "--steps", "1", "--overwrite")
    assert any("--overwrite deletes only this project's files" in line and "4 other(s)" in line
               and "notes.txt" in line and "ckpt_000002.old1" in line and "ckpt_000003/why.txt" in line
               for line in lines), lines
    # what a killed write leaves (write_atomic's temporaries), at the top and in eval/, goes at the next
    # start; the user's look-alikes stay
    (done / "metrics.astrolabe-tmp4242.jsonl").write_text("{")
    (done / "eval").mkdir(exist_ok=True)
    (done / "eval" / "step_000002.astrolabe-tmp4242.mp4").write_text("half")
    main(["--steps", "4", "--resume", "latest"] + FAST, done)
    assert not (done / "metrics.astrolabe-tmp4242.jsonl").exists()
    assert not (done / "eval" / "step_000002.astrolabe-tmp4242.mp4").exists()
    assert (done / "notes.tmp1").read_text() == "mine too" and (done / "ckpt_000002.old1" / "state.json").exists()
    # moved away, --overwrite replaces the run, and only the run
    for name in ("notes.txt", "notes.tmp1", "ckpt_000002.old1", "ckpt_000003/why.txt"):
        shutil.move(done / name, done.parent / name.replace("/", "_"))
    (done / "wandb").mkdir()  # --track's folder: Weights & Biases' own, left as it is
    main(["--steps", "1", "--overwrite"] + FAST, done)
    assert sorted(p.name for p in done.iterdir()) == ["before_after.mp4", "before_after.png", "ckpt_000001",
                                                       "metrics.jsonl", "reward_curve.png", "run.json", "wandb"]
    assert [x["step"] for x in rows(done)] == [1]


def test_two_runs_started_at_the_same_moment_one_runs(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py"] + SMALL + ["--steps", "2", "--eval-every", "0", "--out-dir", str(out)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.communicate(timeout=600)[1], p.returncode)[::-1] for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "a live run" in refused or "another run wrote there" in refused or "holds another run" in refused
    assert [x["step"] for x in rows(out)] == [1, 2]  # one run's rows, not two interleaved


def test_resume_keeps_the_base_and_lora_init_keeps_its_alpha(done, tmp_path):
    lines = problems(done, "--steps", "5", "--resume", "latest", "--ckpt", "None")
    assert any(line.startswith("--ckpt None: not the file the checkpoint was trained with") for line in lines), lines
    base = tmp_path / "moved.safetensors"  # the same file elsewhere: a move, not a change
    shutil.copy(find_file("assets/tiny_world.safetensors"), base)
    args = train.parse_args(SMALL + ["--steps", "5", "--resume", "latest", "--out-dir", str(done), "--ckpt", str(base)])
    checks.check_run(args, 1, train.REGISTRY)
    data = bytearray(base.read_bytes())
    data[len(data) // 2] ^= 1  # one bit in the middle of the weights
    base.write_bytes(bytes(data))
    lines = problems(done, "--steps", "5", "--resume", "latest", "--ckpt", str(base))
    assert any(line.startswith(f"--ckpt {base}: not the file") for line in lines), lines
    # --lora-init: its adapter_config.json's alpha is the run's, or a clear error
    lora = tmp_path / "lora"
    shutil.copytree(done / "ckpt_000003" / "lora", lora)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps(dict(cfg, lora_alpha=32.0)))
    lines = problems(tmp_path / "fresh", "--lora-init", str(lora))
    assert any("--lora-alpha 16.0: the --lora-init adapter was trained with alpha 32.0" in line for line in lines)
    assert checks.lora_init_errors(train.parse_args(SMALL + ["--lora-init", str(lora), "--lora-alpha", "32"])) == []
