"""
Rewards: every registered reward keeps the one signature; each weight-free score moves the right
way on a video built to tell (sharp vs blurred, static vs blinking, red vs blue, left vs right);
user files load by path with clear errors; MultiReward validates and sums; the docstring
examples in rewards.py are true.

Run:  python -m pytest tests/test_rewards.py -q
"""
import doctest
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import reward_models
import rewards
import tiny_world
from rewards import (REWARDS, MultiReward, RewardError, get_reward, grayscale,
                     parse_rewards, top_fraction)
from tiny_world import color_match, direction_match, direction_progress, size_constancy

ALL = {**REWARDS, **tiny_world.REWARDS}  # the generic rewards and the shapes world's detectors

F, H, W = 8, 32, 32


def square_video(color=(1.0, 0.0, 0.0), dx=0, dy=0, bg=0.0, size=6, frames=F):
    """[1, F, 3, H, W]: a `size` square of `color` on a plain `bg` background, moving (dx, dy)
    pixels per frame from the centre."""
    v = torch.full((1, frames, 3, H, W), bg)
    for t in range(frames):
        y, x = H // 2 - size // 2 + dy * t, W // 2 - size // 2 + dx * t
        v[0, t, :, y:y + size, x:x + size] = torch.tensor(color).view(3, 1, 1)
    return v


# ---- one signature for every registered reward


@pytest.mark.parametrize("name", sorted(set(ALL) - set(reward_models.LEARNED)))
def test_shape_dtype_range_on_random_videos(name):
    torch.manual_seed(0)
    videos = torch.rand(3, F, 3, H, W)
    out = ALL[name](videos, ["a red square moving left", "a blue circle moving up", "noise"])
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    hi = {"sharpness": 16.0, "colorfulness": 2.0}.get(name, 1.0)  # the rest are in [0, 1]
    lo = -1.0 if name in ("direction_progress", "shape_progress") else 0.0  # the opposite way scores below 0
    assert (out >= lo).all() and (out <= hi).all(), out


@pytest.mark.parametrize("name", sorted(set(ALL) - set(reward_models.LEARNED)))
def test_single_frame_and_half_precision(name):
    out = ALL[name](torch.rand(2, 1, 3, 16, 16).half(), ["red left", "blue up"])
    assert out.shape == (2,) and torch.isfinite(out).all()


# ---- each weight-free reward moves the right way


def test_sharpness_checkerboard_beats_its_blur():
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    board = ((yy // 2 + xx // 2) % 2).float().expand(1, F, 3, H, W).contiguous()
    blurred = torch.nn.functional.avg_pool2d(board.view(F * 3, 1, H, W), 3, 1, 1,
                                             count_include_pad=False).view_as(board)
    s_sharp, s_blur = rewards.sharpness(torch.cat([board, blurred]), ["", ""])
    assert s_sharp > 2 * s_blur > 0


def test_colorfulness_saturated_beats_gray():
    torch.manual_seed(0)
    color = torch.rand(1, F, 3, H, W)
    gray = color.mean(2, keepdim=True).expand_as(color)
    c_color, c_gray = rewards.colorfulness(torch.cat([color, gray]), ["", ""])
    assert c_gray.abs() < 1e-6 and c_color > 0.1


def test_flicker_static_beats_blinking():
    static = torch.full((1, F, 3, H, W), 0.5)
    blink = static.clone()
    blink[:, ::2] = 0.9  # brightness jumps every frame
    f_static, f_blink = rewards.flicker(torch.cat([static, blink]), ["", ""])
    assert f_static == 1.0 and f_blink == pytest.approx(1 - 0.4, abs=1e-6)


def test_smoothness_steady_motion_beats_jerky_motion():
    steady = square_video(dx=1)
    jerky = steady[:, [0, 5, 1, 6, 2, 7, 3, 4]]  # same frames, shuffled in time
    s_steady, s_jerky = rewards.smoothness(torch.cat([steady, jerky]), ["", ""])
    assert s_steady > s_jerky and s_steady > 0.95


def test_motion_moving_square_beats_static_square():
    moving, static = square_video(dx=1), square_video(dx=0)
    m_moving, m_static = rewards.motion(torch.cat([moving, static]), ["", ""])
    assert m_static == 0.0 and m_moving > 0.05  # 12 of the top-51 changed pixels, each 1/3


def test_grayscale_hides_a_colour_only_change():
    # two colours with the same BT.601 luma: (0.5, 0.5, 0.5) and (0.5 + a, 0.5 - a*0.299/0.587, 0.5)
    a = 0.4
    c1, c2 = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.5 + a, 0.5 - a * 0.299 / 0.587, 0.5])
    v = torch.stack([c1 if t % 2 else c2 for t in range(F)]).view(1, F, 3, 1, 1)
    v = v.expand(1, F, 3, H, W)
    assert rewards.motion(v, [""]) > 0.1  # RGB: the colour swap looks like motion
    assert REWARDS["motion_gray"](v, [""]).abs() < 1e-6  # grayscale: nothing moves
    seen = []
    spy = grayscale(lambda x, p: seen.append(x) or torch.zeros(x.shape[0]))
    spy(torch.rand(2, 3, 3, 4, 4), ["", ""])
    assert seen[0].shape == (2, 3, 3, 4, 4) and torch.equal(seen[0][:, :, 0], seen[0][:, :, 2])


def test_top_fraction_by_hand():
    s = torch.tensor([[0., 9., 1., 8., 2., 7., 3., 6., 4., 5.],
                      [1., 1., 1., 1., 1., 1., 1., 1., 1., 10.]])
    assert top_fraction(s).tolist() == [8.0, 4.0]  # top 3 of 10: (9+8+7)/3 and (10+1+1)/3
    assert top_fraction(s[:, :3]).tolist() == [9.0, 1.0]  # floor(0.9) -> at least one frame
    assert top_fraction(s, frac=1.0).tolist() == s.mean(1).tolist()


def test_color_match_names_the_right_colour():
    red_left = square_video((1.0, 0.0, 0.0), dx=-1)
    dark_blue = square_video((0.0, 0.0, 0.6), dx=-1, bg=0.3)  # shaded colour, gray background
    v = torch.cat([red_left, red_left, red_left, dark_blue, dark_blue])
    out = color_match(v, ["a red square moving left", "a blue square moving left",
                                  "a square moving left", "a Blue box", "a magenta box"])
    assert out.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert color_match(torch.zeros(1, F, 3, H, W), ["a red square"]).item() == 0.0


def test_direction_match_names_the_right_direction():
    left, down = square_video(dx=-1), square_video(dy=2)
    v = torch.cat([left] * 4 + [down] * 2 + [square_video()])
    prompts = ["moving left", "moving right", "going up", "a square", "moving down", "moving left",
               "moving left"]
    out = direction_match(v, prompts)
    assert out.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # the last one stands still


def test_direction_progress_partial_credit_and_wrap_around():
    def wrapping(dx, frames=F, stop=()):  # a 6 px square, dx px/frame, wrapping around the frame
        v, x = torch.zeros(1, frames, 3, H, W), W - 8
        for t in range(frames):
            x = x if t in stop else x + dx
            v[0, t, :, 13:19, torch.arange(x, x + 6) % W] = 1.0
        return v
    speed = 2 / W  # 2 px per frame counts as full speed
    full, half, back = wrapping(2), wrapping(1), wrapping(-2)
    stop_go = wrapping(2, stop=(2, 3, 4, 5))  # moves on 3 of 7 frame pairs
    v, ps = torch.cat([full, half, back, stop_go, full]), ["moving right"] * 4 + ["a square"]
    out = direction_progress(v, ps, speed=speed)
    assert torch.allclose(out, torch.tensor([1.0, 0.5, -1.0, 3 / 7, 0.0]), atol=1e-4)
    # the same videos through a plain centroid: crossing the edge reads as a jump the wrong way
    assert direction_match(full, ["moving right"]).item() < 1.0


def test_size_constancy_moving_is_fine_fading_and_smearing_are_not():
    steady = square_video(dx=1)
    fading = steady.clone()
    fading[0, F // 2:] *= 0.0  # the square vanishes half-way
    smear = steady.clone()
    smear[0, -1, :, H // 2 - 3:H // 2 + 3, :W // 2] = 1.0  # the last frame grows a streak
    out = size_constancy(torch.cat([steady, fading, smear]), [""] * 3)
    assert out[0] == 1.0 and out[1] == 0.0 and 0.5 < out[2] < 0.8, out  # smear: 1 - (96/36)/8


# ---- user reward files and the registry


def write(tmp_path, text, name="user_reward.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_user_reward_file_loads_once_and_is_called(tmp_path):
    path = write(tmp_path, "import torch\nCALLS = []\nCALLS.append(1)\n"
                           "def score(videos, prompts):\n    return videos.mean((1, 2, 3, 4))\n")
    fn = get_reward(f"{path}:score")
    v = torch.rand(2, F, 3, H, W)
    assert torch.allclose(fn(v, ["a", "b"]), v.mean((1, 2, 3, 4)))
    assert get_reward(f"{path}:score") is fn and sys.modules[fn.__module__].CALLS == [1]
    [(name, fn2, w)] = parse_rewards([f"{path}:score=0.5"])
    assert (name, fn2, w) == ("user_reward.score", fn, 0.5)


def test_example_reward_file_from_the_docs():
    path = os.path.join(ROOT, "examples", "my_reward.py")
    [(name, fn, w)] = parse_rewards([path + ":reward=0.5"])
    warm = torch.zeros(2, F, 3, H, W)
    warm[0, :, 0] = 1.0  # all red
    warm[1, :, 2] = 1.0  # all blue
    out = fn(warm, ["a", "b"])
    assert name == "my_reward.reward" and w == 0.5 and out.tolist() == [1.0, -1.0]


def test_unknown_name_lists_the_registry():
    with pytest.raises(ValueError, match="unknown reward 'sharpnes'") as e:
        get_reward("sharpnes")
    assert all(n in str(e.value) for n in REWARDS) and "file.py:function" in str(e.value)


def test_missing_file_missing_function_not_callable(tmp_path):
    with pytest.raises(ValueError, match="no Python file .*nope.py"):
        get_reward(str(tmp_path / "nope.py") + ":score")
    path = write(tmp_path, "THREE = 3\ndef other(videos, prompts):\n    return videos[:, 0, 0]\n")
    with pytest.raises(ValueError, match=r"has no 'score' \(it has \['other'\]\)"):
        get_reward(f"{path}:score")
    with pytest.raises(ValueError, match="'THREE' is a int, not a function"):
        get_reward(f"{path}:THREE")


def test_a_broken_file_raises_its_own_error_and_is_not_cached(tmp_path):
    path = write(tmp_path, "raise RuntimeError('boom')\n", "broken.py")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="boom"):
            get_reward(f"{path}:score")


# ---- parse_rewards


def test_parse_rewards_weights_and_errors(tmp_path):
    d = tmp_path / "a=b"
    d.mkdir()
    path = write(d, "def fn(videos, prompts):\n    return videos[:, 0, 0, 0, 0]\n", "r.py")
    parsed = parse_rewards(["flicker=0.5", "motion", "sharpness=-1e-2", f"{path}:fn=2",
                            "color_match=0"], registry=ALL)
    assert [(n, w) for n, _, w in parsed] == [("flicker", 0.5), ("motion", 1.0),
                                              ("sharpness", -0.01), ("r.fn", 2.0),
                                              ("color_match", 0.0)]
    assert parsed[0][1] is rewards.flicker
    assert parse_rewards([f"{path}:fn"])[0][2] == 1.0  # "=" in the folder, no weight
    assert [n for n, _, _ in parse_rewards("motion_gray=3")] == ["motion_gray"]  # one string
    for bad in ["flicker=abc", "flicker=", "flicker=nan", "flicker=inf"]:
        with pytest.raises(ValueError, match="bad weight"):
            parse_rewards([bad])
    with pytest.raises(ValueError, match="given twice"):
        parse_rewards(["flicker=1", "flicker=2"])
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        parse_rewards(["nope=1"])


# ---- MultiReward, per-group normalisation


def test_multireward_total_is_the_weighted_sum():
    torch.manual_seed(0)
    specs = parse_rewards(["sharpness=0.5", "flicker=2", "motion_gray=-1", "colorfulness=0"])
    specs.append(("np_col", lambda v, p: np.arange(v.shape[0], dtype=np.float64)[:, None], 3.0))
    v = torch.rand(4, F, 3, H, W)
    mr = MultiReward(specs)
    scores = mr.score(v, list("abcd"))
    total = mr.total(scores)
    assert list(scores) == ["sharpness", "flicker", "motion_gray", "colorfulness", "np_col"]
    expected = sum(w * torch.as_tensor(fn(v, list("abcd")), dtype=torch.float32).view(4)
                   for _, fn, w in specs)
    assert torch.allclose(total, expected) and total.dtype == torch.float32
    assert all(s.shape == (4,) and s.dtype == torch.float32 for s in scores.values())
    mr = MultiReward(["sharpness=0.5", "flicker=2"])  # the --rewards strings directly
    assert mr.names == ["sharpness", "flicker"] and mr.weights == [0.5, 2.0]
    assert torch.allclose(mr.total(mr.score(v, list("abcd"))), 0.5 * scores["sharpness"] + 2 * scores["flicker"])


@pytest.mark.parametrize("out,msg", [
    (lambda v, p: torch.tensor([1.0, float("nan")]), "'bad' returned non-finite"),
    (lambda v, p: torch.tensor([1.0, float("inf")]), "'bad' returned non-finite"),
    (lambda v, p: torch.zeros(3), r"'bad' returned shape \(3,\), expected \(2,\)"),
    (lambda v, p: torch.zeros(2, 2), r"'bad' returned shape \(2, 2\)"),
    (lambda v, p: 1.0, r"'bad' returned shape \(\)"),
    (lambda v, p: "high", "'bad' returned str"),
])
def test_multireward_rejects_bad_outputs(out, msg):
    mr = MultiReward(parse_rewards(["flicker"]) + [("bad", out, 1.0)])
    with pytest.raises(RewardError, match=msg):
        mr.score(torch.rand(2, F, 3, H, W), ["a", "b"])


def test_multireward_rejects_bad_inputs():
    mr = MultiReward(parse_rewards(["flicker"]))
    with pytest.raises(RewardError, match="float"):
        mr.score(torch.zeros(2, F, 3, H, W, dtype=torch.uint8), ["a", "b"])
    with pytest.raises(RewardError, match=r"\[B, F, 3, H, W\]"):
        mr.score(torch.rand(2, 3, H, W), ["a", "b"])
    with pytest.raises(RewardError, match="2 videos but 1 prompts"):
        mr.score(torch.rand(2, F, 3, H, W), ["a"])
    with pytest.raises(ValueError, match="no rewards"):
        MultiReward([])


def test_total_is_the_weighted_sum_of_raw_scores():
    scores = {"a": torch.tensor([1., 2., 10., 30.]), "b": torch.tensor([5., 5., 0., 1.])}
    mr = MultiReward([("a", None, 1.0), ("b", None, 0.5)])
    assert mr.total(scores).tolist() == [3.5, 4.5, 10.0, 30.5]


# ---- the examples in the docstrings are true


def test_docstring_examples():
    result = doctest.testmod(rewards)
    assert doctest.testmod(tiny_world).failed == 0
    assert result.attempted >= 12 and result.failed == 0
