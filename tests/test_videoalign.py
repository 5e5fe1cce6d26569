"""
VideoAlign rewards (reward_videoalign.py) against the Astrolabe release's own code: the fixtures in
tests/fixtures/videoalign/ hold a tiny random Qwen2-VL base model and VideoReward checkpoint in the real
file layouts, two videos, and the scores THEIR VideoAlignScorer gave on transformers 4.45.2
(tools/make_videoalign_fixtures.py; versions in scores.json). Ours runs on the current transformers.
What no test here can tell: the scores of the real 2B weights (nothing is downloaded).

Run:  python -m pytest tests/test_videoalign.py -q
"""
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file

import reward_models
import reward_videoalign
from reward_videoalign import REWARDS

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "videoalign")
DIM = {"videoalign_vq": "VQ", "videoalign_mq": "MQ", "videoalign_ta": "TA", "videoalign_mq_rgb": "MQ_rgb"}


@pytest.fixture(scope="module")
def fixture():
    """The committed tiny files as WEIGHTS_DIR, the input videos and their scores."""
    with open(os.path.join(FIX, "scores.json")) as f:
        ref = json.load(f)
    old, reward_models.WEIGHTS_DIR = reward_models.WEIGHTS_DIR, os.path.join(FIX, "weights")
    yield load_file(os.path.join(FIX, "inputs.safetensors"))["videos"], ref
    reward_models.WEIGHTS_DIR = old


@pytest.mark.parametrize("load", ["released", "full"])
def test_scores_match_their_code(fixture, load):
    """VQ, MQ (grayscale), TA and MQ on RGB equal the release's scores to 1e-3 relative, for their
    loader (LoRA dropped) and for a strict load of every key (LoRA merged)."""
    videos, ref = fixture
    for name, fn in REWARDS.items():
        got, want = fn(videos, ref["prompts"], load=load), torch.tensor(ref["scores"][load][DIM[name]])
        assert got.shape == (2,) and got.dtype == torch.float32
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-6), (name, load, got, want)


def test_tokens_match_their_processor(fixture):
    """Our chat prompt and tokenizer give exactly the ids their processor gave (pads stripped)."""
    videos, ref = fixture
    model, tok, token_ids, pre, _, _ = reward_videoalign._model(*reward_videoalign._require("t"),
                                                                "released")
    _, grid = reward_videoalign._pixels(videos, False, pre)
    ids, mask = reward_videoalign._tokens(ref["prompts"], int(grid[0].prod()) // 4, tok, "cpu")
    assert grid.tolist() == ref["video_grid_thw"]
    assert [row[m.bool()].tolist() for row, m in zip(ids, mask)] == ref["input_ids"]
    assert all(sum(i == t for i in row) == 1 for row in ref["input_ids"] for t in token_ids)


def test_mq_sees_grayscale(fixture):
    """MQ scores torchvision's grayscale of the uint8 frames, as the release does: it equals MQ on RGB
    given those gray frames, and differs from MQ on the colour frames."""
    TF = pytest.importorskip("torchvision.transforms.functional")
    videos, ref = fixture
    gray = REWARDS["videoalign_mq"](videos, ref["prompts"])
    u8 = (videos * 255).round().clamp(0, 255).to(torch.uint8)
    pre_gray = TF.rgb_to_grayscale(u8.flatten(0, 1), num_output_channels=3).view_as(u8) / 255
    assert torch.allclose(REWARDS["videoalign_mq_rgb"](pre_gray, ref["prompts"]), gray, atol=1e-6)
    rgb = REWARDS["videoalign_mq_rgb"](videos, ref["prompts"])
    assert (gray - rgb).abs().min() > 1e-2


def test_missing_file_one_line(fixture, tmp_path):
    """A missing file stops the reward with one line naming it, its folder and its source, before any
    model loads; missing_videoalign_files lists it for start-up checks."""
    weights = tmp_path / "w"
    shutil.copytree(os.path.join(FIX, "weights"), weights)
    os.remove(weights / "VideoReward" / "checkpoint-11352" / "model.pth")
    reward_videoalign._model.cache_clear()
    old, reward_models.WEIGHTS_DIR = reward_models.WEIGHTS_DIR, str(weights)
    try:
        with pytest.raises(FileNotFoundError) as e:
            REWARDS["videoalign_mq"](torch.rand(1, 4, 3, 16, 16), ["a cat"])
        msg = str(e.value)
        assert "\n" not in msg and "videoalign_mq" in msg and "model.pth" in msg
        assert str(weights / "VideoReward") in msg and "huggingface.co/KlingTeam/VideoReward" in msg
        assert reward_videoalign._model.cache_info().currsize == 0  # nothing was built
        lines = reward_videoalign.missing_videoalign_files(["videoalign_mq", "hpsv2"])
        assert len(lines) == 1 and lines[0].startswith("videoalign_mq: checkpoint-<step>/model.pth")
        os.remove(weights / "Qwen2-VL-2B-Instruct" / "tokenizer.json")
        assert any("tokenizer.json" in line and "Qwen/Qwen2-VL-2B-Instruct" in line
                   for line in reward_videoalign.missing_videoalign_files())
        assert reward_videoalign.missing_videoalign_files(["hpsv2"]) == []
    finally:
        reward_models.WEIGHTS_DIR = old


def test_the_run_chooses_the_load_and_checks_the_files(fixture, tmp_path, monkeypatch):
    """train.py's --released.videoalign-load reaches a reward called without load= (LOAD; full by
    default, released under --exact-reference), and the start-up checks name a missing file and
    never probe these rewards (a probe would load the model)."""
    import checks
    import train
    videos, ref = fixture
    assert reward_videoalign.LOAD == "full" == train.Args().released.videoalign_load
    assert train.RELEASED["released"].videoalign_load == "released"
    monkeypatch.setattr(reward_videoalign, "LOAD", "released")
    got = REWARDS["videoalign_mq"](videos, ref["prompts"])
    assert torch.allclose(got, torch.tensor(ref["scores"]["released"]["MQ"]), rtol=1e-3, atol=1e-6)
    args = train.parse_args(["--rewards", "videoalign_mq=1", "color_match=1"])
    monkeypatch.setattr(reward_videoalign, "_require", lambda reward: pytest.fail(f"{reward} was probed"))
    assert checks.reward_probe(args, train.REGISTRY, "cpu") == []  # the cheap reward alone, fine
    monkeypatch.setattr(reward_models, "WEIGHTS_DIR", str(tmp_path))
    errors, _ = checks.check_args(args, 1, train.REGISTRY)
    assert any(e.startswith("--rewards: videoalign_mq: config.json in ") for e in errors), errors


def test_the_model_leaves_the_device_after_scoring(fixture, monkeypatch):
    """The model sits on the videos' device only while it scores (memory.VLM_REWARDS counts it so):
    every call ends with the cached model moved back to the CPU, also when scoring raises."""
    videos, ref = fixture
    model = reward_videoalign._model(*reward_videoalign._require("videoalign_vq"), "full")[0]  # the cached one
    moves, real_to = [], model.to
    monkeypatch.setattr(model, "to", lambda *a: (moves.append(str(a[0])), real_to(*a))[1])
    REWARDS["videoalign_vq"](videos, ref["prompts"], load="full")
    assert moves == ["cpu", "cpu"]  # to the videos' device (the CPU here), then back
    with pytest.raises(Exception):
        REWARDS["videoalign_vq"](videos, ref["prompts"][:0], load="full")  # no prompts: scoring fails
    assert moves == ["cpu"] * 4
