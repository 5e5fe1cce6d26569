"""
The tiny shapes world: the procedural videos, the reward detectors on them, the committed
pre-trained asset (loads strictly, its samples follow their prompts), and a 2-step smoke run of
the pre-training loop (tools/pretrain_tiny.py). Never retrains for real.

Run:  python -m pytest tests/test_tiny_world.py -q
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from model import CONFIGS, CausalWanModel
import pretrain_tiny
import tiny_world as tw
from frozen import to_pixels
from tiny_world import color_match, direction_match

ASSET = os.path.join(ROOT, "assets", "tiny_world.safetensors")
SWAP = {"red": "blue", "blue": "red", "green": "yellow", "yellow": "green",
        "left": "right", "right": "left", "up": "down", "down": "up"}


def swapped(prompt, kind):
    """The prompt with its colour (kind 0) or direction (kind 2) word replaced by another."""
    words = prompt.split()
    i = [w for w in words if w in SWAP][0 if kind == 0 else 1]
    return " ".join(SWAP[w] if w == i else w for w in words)


def test_prompts_and_parse():
    assert len(tw.PROMPTS) == 4 * 3 * 4 and len(set(tw.PROMPTS)) == len(tw.PROMPTS)
    assert tw.parse_prompt("a red circle moving left") == ("red", "circle", "left")
    with pytest.raises(ValueError):
        tw.parse_prompt("a red circle")  # no direction


def test_video_shape_range_and_determinism():
    g = torch.Generator().manual_seed(0)
    v = tw.render([tw.parse_prompt("a green triangle moving up")], 9, generator=g)[0]
    assert v.shape == (9, 3, 32, 32) and v.dtype == torch.float32
    assert v.min() == -1 and v.max() == 1  # black background, pure palette colour
    same = tw.render([("green", "triangle", "up")], 9, generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(v, same)  # the generator is the only randomness
    assert tw.render([("red", "square", "left")], 6, H=24, W=40).shape == (1, 6, 3, 24, 40)


def smeared(videos, trail=4):
    """Each frame with the last `trail` frames' shapes drawn into it: a shape smearing into a streak
    behind it as it moves (what RL on the centroid-based direction_progress learned to draw)."""
    frames = [videos[:, max(0, t - trail):t + 1].amax(1) for t in range(videos.shape[1])]
    return torch.stack(frames, 1)


def test_shape_detectors_see_through_smearing():
    """A crisp shape scores 1 on shape_match and shape_progress; the same motion smeared into a
    streak scores clearly lower on both (measured: 0.59 and 0.39 on average), further below the
    mass-based direction_progress, which keeps 0.75 for a streak whose mass still drifts the named
    way, and color_match, which keeps 1: the gap the shape detectors close."""
    g = torch.Generator().manual_seed(2)
    prompts = tw.PROMPTS
    crisp = to_pixels(tw.render([tw.parse_prompt(p) for p in prompts], 9, generator=g))
    smear = smeared(crisp)
    assert tw.shape_match(crisp, prompts).min() == 1 and tw.shape_progress(crisp, prompts).min() > 0.999
    assert (tw.shape_match(smear, prompts) < 0.7).all() and (tw.shape_progress(smear, prompts) < 0.7).all()
    assert tw.shape_progress(smear, prompts).mean() < tw.direction_progress(smear, prompts).mean() - 0.2
    assert tw.color_match(smear, prompts).min() > 0.99  # the colour detector sees nothing wrong
    # the wrong shape fits less well than the named one (circle and square are close: 69 of 81 pixels)
    swap = {"circle": "triangle", "square": "triangle", "triangle": "square"}
    other = [" ".join(swap.get(w, w) for w in p.split()) for p in prompts]
    assert (tw.shape_match(crisp, other) < 0.8).all()
    # standing still earns no progress, moving the opposite way earns -1
    still = crisp[:, :1].expand(-1, 9, -1, -1, -1)
    assert tw.shape_progress(still, prompts).abs().max() == 0
    assert tw.shape_progress(crisp.flip(1), prompts).max() < -0.99


def test_detectors_score_ground_truth():
    """Every prompt, 2 random starts each: ~1 for the named colour and direction, 0 for others."""
    g = torch.Generator().manual_seed(1)
    prompts = tw.PROMPTS * 2
    videos = to_pixels(tw.render([tw.parse_prompt(p) for p in prompts], 9, generator=g))
    assert color_match(videos, prompts).min() > 0.99
    assert direction_match(videos, prompts).min() > 0.99
    assert color_match(videos, [swapped(p, 0) for p in prompts]).max() < 0.01
    assert direction_match(videos, [swapped(p, 2) for p in prompts]).max() < 0.01


def test_wrap_around_keeps_the_shape_in_frame():
    """A long video stays valid: the shape never shrinks (it wraps), and the world is periodic."""
    g = torch.Generator().manual_seed(2)
    specs = [("yellow", s, d) for s in tw.SHAPES for d in ("left", "right", "up", "down")]
    v = tw.render(specs, 40, generator=g)  # 80 px of travel: at least two full wraps
    area = (v > 0).any(2).flatten(2).sum(2)  # [B, F] foreground pixels per frame
    assert (area == area[:, :1]).all() and (area > 30).all()
    period = 32 // tw.SPEED  # frames to travel once around the 32 px torus
    assert torch.equal(v[:, period], v[:, 0]) and not torch.equal(v[:, 1], v[:, 0])


@pytest.fixture(scope="module")
def pretrained_eval(pretrained):
    """The real 4-step AR sampler on 16 prompts (seeds not used in pre-training's own check)."""
    torch.manual_seed(0)
    return pretrain_tiny.evaluate_prompt_following(pretrained, n=16, frames=9, seed=123)


@pytest.fixture(scope="module")
def pretrained():
    assert os.path.exists(ASSET), "assets/tiny_world.safetensors missing: run python tools/pretrain_tiny.py"
    model = CausalWanModel(CONFIGS["tiny"])
    model.load_state_dict(load_file(ASSET), strict=True)  # base weights only, names match
    return model.eval()


def test_asset_metadata():
    meta = json.load(open(os.path.splitext(ASSET)[0] + ".json"))
    assert meta["config"]["dim"] == CONFIGS["tiny"].dim and meta["steps"] > 0
    assert meta["samples"]["color_acc"] > 0.5 and meta["samples"]["direction_acc"] > 0.5


def test_pretrained_samples_follow_colour(pretrained_eval):
    """Colour accuracy well above chance (1/4); measured 1.0 on these 16 prompts (direction 0.81)."""
    assert pretrained_eval["color_acc"] > 0.5, pretrained_eval


def test_pretrained_samples_follow_direction(pretrained_eval):
    """Direction accuracy well above chance (1/4). (A first asset with p_clean 0.25 and 1400 steps
    at batch 16 learnt colours but not motion: 0.375 on 64 samples.)"""
    assert pretrained_eval["direction_acc"] > 0.5, pretrained_eval


def test_pretraining_smoke(tmp_path):
    """Two optimizer steps on a tiny batch write a strictly loadable asset and its JSON."""
    out = str(tmp_path / "tw.safetensors")
    meta = pretrain_tiny.main(pretrain_tiny.Args(steps=2, batch=2, warmup=1, eval_n=2, eval_every=0, out=out))
    model = CausalWanModel(CONFIGS["tiny"])
    model.load_state_dict(load_file(out), strict=True)
    saved = json.load(open(str(tmp_path / "tw.json")))
    assert saved["steps"] == 2 and saved["batch"] == 2 and saved == json.loads(json.dumps(meta))
    assert saved["samples"]["n"] == 2 and saved["final_loss_smoothed"] > 0
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # renamed into place
