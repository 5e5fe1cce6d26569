"""
claims.py --quick: the whole evidence pipeline (every claim's train.py runs, the held-out
evaluation, claims.json / claims.md / figures) on tiny budgets. Plumbing only: no verdicts.

Run:  python -m pytest tests/test_claims.py -q
"""
import json
import os
import subprocess
import sys

import pytest

import claims

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prompt_split_holds_out_one_shape_per_colour_and_direction():
    train_p, eval_p = claims.prompt_split()
    assert len(eval_p) == 16 and len(train_p) == 32 and not set(train_p) & set(eval_p)
    # every word of an eval prompt was seen in training
    seen = {w for p in train_p for w in p.split()}
    assert all(set(p.split()) <= seen for p in eval_p)


def test_compare_needs_a_clear_gap():
    assert claims.compare([1.0, 1.1, 1.2], [0.0, 0.1, 0.2])[0] == "better"
    assert claims.compare([0.0, 0.1, 0.2], [1.0, 1.1, 1.2])[0] == "worse"
    assert claims.compare([1.0, 1.5, 0.5], [0.9, 1.4, 0.6])[0] == "no difference"
    assert claims.compare([1.0], [0.0]) == ("no difference", None)  # one run each: no test


def test_quick_run_writes_every_output(tmp_path):
    out = tmp_path / "claims"
    r = subprocess.run([sys.executable, "tools/claims.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    report = json.loads((out / "claims.json").read_text())
    names = [c["name"] for c in report["claims"]]
    assert names == ["nft", "streaming", "hacking", "memory"]
    arms = {c["name"]: set(c["arms"]) for c in report["claims"]}
    assert arms["nft"] == {"base", "nft", "positive-only"}
    assert arms["streaming"] == {"base", "short-clip", "streaming"}
    assert arms["hacking"] == {"base", "single-reward", "multi-reward", "multi+selective"}
    for c in report["claims"]:
        assert (out / f"{c['name']}.png").stat().st_size > 0
        for arm in c["arms"].values():
            assert set(arm) == {"mean", "std", "runs"} and all(isinstance(x, float) for x in arm["runs"])
    # the streaming claim reports the first window too
    streaming = report["claims"][1]["details"]["streaming"]
    assert {"last_window", "first_window"} <= set(streaming)
    # each arm ran train.py with its own flags
    log = (out / "runs" / "nft" / "positive-only" / "seed0" / "train.log").read_text()
    assert "rewards ['direction_progress=1'" in log
    state = json.loads(next((out / "runs" / "nft" / "positive-only" / "seed0").glob("ckpt_*/state.json")).read_text())
    assert state["args"]["objective"] == "positive-only"
    assert "| nft |" in (out / "claims.md").read_text()
    # streaming's short-clip arm has nft's flags and seed: that run is reused, not repeated
    assert not (out / "runs" / "streaming" / "short-clip").exists()
    # ... and a causal sampler makes the first 6 frames of its 18-frame videos its 6-frame videos
    first = report["claims"][1]["details"]["short-clip"]["first_window"]["runs"]
    assert first == pytest.approx(report["claims"][0]["arms"]["nft"]["runs"], rel=1e-5)
