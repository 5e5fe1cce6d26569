"""
reward_hpsv3.py against HPSv3's own code: tests/fixtures/hpsv3/ holds a tiny random HPSv3 in the
released files' layout, fixed frames and prompts, and the scores hpsv3 1.0.0 (transformers 4.45.2)
gave them (tools/make_hpsv3_fixtures.py). Here our port, on the current transformers, scores the
same files. What no test here can tell: the scores of the real 7B weights (nothing is downloaded).

Run:  python -m pytest tests/test_hpsv3.py -q
"""
import json
import os

import pytest
import torch

import reward_hpsv3 as R
import reward_models
from rewards import parse_rewards, takes_frames

pytest.importorskip("transformers.models.qwen2_vl")
from safetensors.torch import load_file

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hpsv3")
TOL = 1e-3  # relative; measured: 5.5e-7


@pytest.fixture(scope="module")
def ref():
    """The fixture folder as the weights folder; their scores and the frames [B, F, 3, H, W]."""
    old, reward_models.WEIGHTS_DIR = reward_models.WEIGHTS_DIR, FIX
    with open(os.path.join(FIX, "scores.json")) as f:
        d = json.load(f)
    d["videos"] = load_file(os.path.join(FIX, "inputs.safetensors"))["videos"].float() / 255
    yield d
    reward_models.WEIGHTS_DIR = old


def rel(a, b):
    b = torch.as_tensor(b, dtype=torch.float32)
    return ((a - b).abs() / b.abs()).max().item()


# ---- the same numbers as HPSv3's own code


def test_frame_mu_and_video_reward_match_hpsv3_own_code(ref):
    mu = R.frame_scores(ref["videos"], ref["prompts"], frames=0)  # every frame, as released
    assert mu.shape == (2, 3) and mu.dtype == torch.float32
    assert rel(mu, ref["frame_mu"]) <= TOL
    video = R.hpsv3(ref["videos"], ref["prompts"], frames=0)
    assert video.shape == (2,) and rel(video, ref["video_top30"]) <= TOL
    # top 30% of 3 frames is the best one: not the mean
    assert not torch.allclose(video, torch.tensor(ref["frame_mu"]).mean(1), rtol=TOL)


def test_tokens_and_pixels_are_those_hpsv3_feeds(ref):
    """The first frame's input ids (chat template, expanded image pads, <|Reward|>) and pixel
    values (PIL resize, normalise, patch order) are what their processor made."""
    model, tok, pre = R.load_hpsv3(*R._require(), torch.float32)
    frame = (ref["videos"][0, 0] * 255).round().to(torch.uint8)
    pix, grid = R.frame_patches(frame, pre)
    first = ref["first_frame"]
    assert [list(grid)] == first["image_grid_thw"] and list(pix.shape) == first["pixel_values_shape"]
    assert pix.double().sum().item() == pytest.approx(first["pixel_values_sum"], rel=1e-7)
    ids, mask = R.encode(tok, [R.chat_text(ref["prompts"][0], grid[1] * grid[2] // 4)], 0)
    assert ids[0].tolist() == first["input_ids"] and mask.all()
    assert first["input_ids"].count(ref["reward_token_id"]) == 1
    assert model.ids[R.REWARD_TOKEN] == ref["reward_token_id"]


def test_smart_resize_matches_theirs(ref):
    for size, hw in ref["smart_resize_256x28x28"].items():
        assert list(R.smart_resize(*map(int, size.split("x")))) == hw, size


def test_scores_see_uint8_frames_and_ignore_batching(ref):
    """Frames are rounded to uint8 as the released code does (a sub-level change is invisible),
    and the padding of a 4-image batch does not move a score (batch=1: no padding)."""
    v = ref["videos"] + (torch.rand(ref["videos"].shape, generator=torch.Generator().manual_seed(0))
                         - 0.5) * 0.9 / 255
    mu = R.frame_scores(v, ref["prompts"], frames=0, batch=1)
    assert rel(mu, ref["frame_mu"]) <= TOL


# ---- frames, files, keys


def test_frames_keyword_picks_frames_as_the_other_learned_rewards(ref):
    assert takes_frames(R.hpsv3)
    assert R.FRAMES == reward_models.FRAMES  # 8 by default: all 3 here
    two = R.frame_scores(ref["videos"], ref["prompts"], frames=2)  # first and last frame
    assert rel(two, torch.tensor(ref["frame_mu"])[:, [0, 2]]) <= TOL
    (_, fn, _), = parse_rewards(["hpsv3"], registry=R.REWARDS, frames=1)  # --released.reward-frames
    assert rel(fn(ref["videos"], ref["prompts"]), torch.tensor(ref["frame_mu"])[:, 0]) <= TOL


def test_missing_file_is_one_line_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(reward_models, "WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(R, "load_hpsv3", lambda *a: pytest.fail("loaded despite a missing file"))
    assert len(reward_models.missing_weights(["hpsv3"])) == 4
    with pytest.raises(FileNotFoundError) as e:
        R.hpsv3(torch.rand(1, 2, 3, 8, 8), ["a"])
    msg = str(e.value)
    assert "\n" not in msg and "Qwen2-VL-7B-Instruct/config.json" in msg and str(tmp_path) in msg
    assert "huggingface.co/Qwen/Qwen2-VL-7B-Instruct" in msg
    base_only(tmp_path)  # the base folder's three files: the checkpoint is what is missing then
    assert [m.split()[1] for m in reward_models.missing_weights(["hpsv3"])] == ["HPSv3.safetensors"]
    with pytest.raises(FileNotFoundError, match=r"HPSv3.safetensors in .*/MizzenAI/HPSv3$"):
        R.hpsv3(torch.rand(1, 2, 3, 8, 8), ["a"])


def base_only(root):
    """The three files we read of the base folder, without its weights (model.safetensors)."""
    os.makedirs(root / R.BASE)
    for f in R.BASE_FILES:
        os.symlink(os.path.join(FIX, R.BASE, f), root / R.BASE / f)


def test_base_weights_are_not_needed(ref, tmp_path, monkeypatch):
    """HPSv3.safetensors holds every tensor: the 7B base shards need not be downloaded."""
    base_only(tmp_path)
    os.symlink(os.path.join(FIX, R.CHECKPOINT), tmp_path / R.CHECKPOINT)
    monkeypatch.setattr(reward_models, "WEIGHTS_DIR", str(tmp_path))
    assert reward_models.missing_weights(["hpsv3"]) == []
    mu = R.frame_scores(ref["videos"], ref["prompts"], frames=1)
    assert rel(mu, torch.tensor(ref["frame_mu"])[:, :1]) <= TOL


def test_checkpoint_keys_are_mapped_strictly():
    sd = {"model.norm.weight": 1, "visual.merger.ln_q.weight": 2, "rm_head.5.bias": 3,
          "lm_head.weight": 4}
    assert R.convert_keys(sd) == {"vlm.language_model.norm.weight": 1,
                                  "vlm.visual.merger.ln_q.weight": 2, "head.5.bias": 3}
    with pytest.raises(KeyError, match="unexpected"):
        R.convert_keys({**sd, "score.weight": 5})
    with pytest.raises(KeyError, match="lacks"):
        R.convert_keys({k: v for k, v in sd.items() if k != "lm_head.weight"})


def test_the_model_leaves_the_device_after_scoring(ref, monkeypatch):
    """The 7B model sits on the videos' device only while it scores (memory.VLM_REWARDS counts it
    so): the last move of the cached model is back to the CPU, also when scoring fails."""
    model, _, _ = R.load_hpsv3(*R._require(), torch.float32)  # the cached object frame_scores uses
    moves, real_to = [], model.to
    monkeypatch.setattr(model, "to", lambda device: (moves.append(str(device)), real_to(device))[1])
    R.frame_scores(ref["videos"], ref["prompts"], frames=1)
    assert moves == ["cpu", "cpu"]  # to the videos' device (the CPU here), then back
    with pytest.raises(Exception):
        R.frame_scores(ref["videos"], ref["prompts"][:0], frames=1)  # no prompts: scoring fails
    assert moves == ["cpu"] * 4  # there and back again, though the scoring raised
