"""
Rewards: one signature, a registry, weight-free scores, and the multi-reward sum.

Every reward is a plain function with one signature (TRL style), higher = better:
    fn(videos: Tensor[B, F, 3, H, W] float in [0, 1], prompts: list[str]) -> Tensor[B]
so a user's own reward is one function in one file: `--rewards path/to/my.py:fn=0.5`.

What is here (definitions and sources: docs/rewards.md):
  weight-free   sharpness, colorfulness (frame-level, top-30% aggregated), flicker, smoothness,
                motion (+ motion_gray). The shapes world's prompt-aware detectors (color_match,
                direction_progress, ...) live in tiny_world.py, the learned ones (hpsv2,
                clip_score, aesthetic, dynamic_degree) in reward_models.py; each file has its own
                REWARDS, and train.py looks names up in all three.
  helpers       grayscale (Astrolabe's trick against colour hacking of motion scores),
                top_fraction (Astrolabe's top-30% frame aggregation).
  plumbing      REWARDS registry, get_reward("name" | "file.py:fn"), parse_rewards(["NAME=W"]),
                MultiReward: score() calls and validates, total() sums R = sum_j w_j R_j on raw scores;
                probe_rewards: each reward once on a tiny video before a run loads anything.
Rewards are isolated: each is handed its own copy of the videos (PyTorch has no read-only
tensors), so a reward that writes into its input cannot change what the next one scores, or the
eval video saved afterwards; whatever it returns is checked (one finite score per video, within
float32).
Astrolabe's own HPSv3 and VideoAlign (2-8 B Qwen2-VL scorers) have the same signature; they live in
reward_hpsv3.py and reward_videoalign.py. Imports nothing of this repository: copy it alone.

Shapes: B videos, F frames, H, W pixels, N pixels per frame (H*W).
Test: python -m pytest tests/test_rewards.py tests/test_learned_rewards.py -q
"""
import hashlib
import importlib.util
import inspect
import math
import os
import sys
from functools import partial, wraps

import torch
import torch.nn.functional as Fn


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights for R, G, B


# ----------------------------------------------------------------------------------------------
# helpers

def top_fraction(frame_scores, frac=0.3):
    """Mean of the best `frac` of the frames, k = max(1, floor(frac * F)): [B, F] -> [B].
    Astrolabe keeps the top-30% mean of per-frame HPSv3 scores: weak frames do not sink a video.

    >>> top_fraction(torch.tensor([[1., 5., 3., 2., 4., 0., 0., 0., 0., 0.]]))  # top 3 of 10
    tensor([4.])
    """
    k = max(1, int(frac * frame_scores.shape[1] + 1e-9))  # + 1e-9: 0.3 * 10 stays 3
    return frame_scores.topk(k, dim=1).values.mean(1)  # [B]


def _luma(videos):
    w = torch.tensor(LUMA, dtype=torch.float32, device=videos.device).view(1, 1, 3, 1, 1)
    return (videos.float() * w).sum(2)  # [B, F, H, W]


def grayscale(fn):
    """Wrap a reward so it sees the videos in grayscale (BT.601 luma repeated to 3 channels).
    Astrolabe feeds its motion-quality model grayscale frames so the policy cannot raise the
    motion score by playing with colours: a colour change that keeps the luma is invisible.

    >>> v = torch.zeros(1, 2, 3, 4, 4); v[:, 0, 1] = 0.299  # frame 0: dark green
    >>> v[:, 1, 0] = 0.587                                 # frame 1: dark red, the same luma
    >>> grayscale(lambda v, p: v[:, 1] - v[:, 0])(v, [""]).abs().max()  # nothing changed
    tensor(0.)
    """
    @wraps(fn)
    def gray_fn(videos, prompts):
        return fn(_luma(videos).unsqueeze(2).expand(-1, -1, 3, -1, -1), prompts)  # [B,F,3,H,W]
    gray_fn.__name__ = getattr(fn, "__name__", "reward") + "_gray"
    return gray_fn


# ----------------------------------------------------------------------------------------------
# weight-free rewards: visual quality (per frame, then top 30% as Astrolabe does for image rewards)
def sharpness(videos, prompts):
    """Variance of the Laplacian of the luma per frame (OpenCV's focus measure / 255^2), top-30%
    mean. Monotone in blur, but noise raises it too: pair it with `flicker` or `smoothness`.

    >>> v = torch.zeros(1, 2, 3, 8, 8); v[..., ::2, :] = 1.0  # horizontal stripes: max contrast
    >>> sharpness(v, [""])
    tensor([4.])
    """
    B, F, _, H, W = videos.shape
    lap = torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]], device=videos.device)
    y = Fn.conv2d(_luma(videos).reshape(B * F, 1, H, W), lap.view(1, 1, 3, 3))  # [B*F,1,H-2,W-2]
    return top_fraction(y.flatten(1).var(1, unbiased=False).view(B, F))  # [B]


def colorfulness(videos, prompts):
    """Hasler & Suesstrunk (2003) colourfulness per frame, top-30% mean, in [0, 1] pixel units
    (the paper's value / 255); gray -> 0. rg = R - G, yb = (R + G)/2 - B,
    C = sqrt(std_rg^2 + std_yb^2) + 0.3 sqrt(mean_rg^2 + mean_yb^2).

    >>> v = torch.zeros(1, 1, 3, 4, 4); v[:, :, 0] = 1.0  # pure red: rg = 1, yb = 0.5, no spread
    >>> colorfulness(v, [""])
    tensor([0.3354])
    """
    R, G, Bl = videos.float().unbind(2)  # [B, F, H, W] each
    rg, yb = R - G, 0.5 * (R + G) - Bl
    std = (rg.flatten(2).var(2, unbiased=False) + yb.flatten(2).var(2, unbiased=False)).sqrt()
    mean = (rg.flatten(2).mean(2) ** 2 + yb.flatten(2).mean(2) ** 2).sqrt()
    return top_fraction(std + 0.3 * mean)  # [B]


# ----------------------------------------------------------------------------------------------
# weight-free rewards: motion (whole-video scores)
def flicker(videos, prompts):
    """VBench temporal flickering (255 - mean_t mean|f_t - f_{t-1}|) / 255 = 1 - mean|diff| here,
    VBench's number up to its 8-bit rounding. 1 = static, so it rewards a frozen video: pair it
    with `motion`. A single frame scores 1.

    >>> v = torch.zeros(2, 4, 3, 8, 8); v[1, ::2] = 1.0  # video 1 blinks white/black
    >>> flicker(v, ["", ""])
    tensor([1., 0.])
    """
    v = videos.float()
    if v.shape[1] < 2:
        return torch.ones(v.shape[0], device=v.device)
    return 1 - (v[:, 1:] - v[:, :-1]).abs().flatten(1).mean(1)  # [B]


def smoothness(videos, prompts):
    """Motion smoothness, weight-free: 1 - mean|f_t - (f_{t-1} + f_{t+1})/2|
    (docs/rewards.md#weight-free-rewards).

    VBench scores (255 - MAE)/255 against AMT-interpolated frames; the interpolator here is the
    neighbours' mean, so steady fades score 1 and jerks less, but unlike AMT it cannot follow a
    moving object (a steadily moving square loses a little at its edges). < 3 frames -> 1.

    >>> t = torch.linspace(0, 1, 5).view(1, 5, 1, 1, 1).expand(1, 5, 3, 4, 4)  # linear fade
    >>> smoothness(torch.cat([t, t[:, [0, 4, 0, 4, 0]]]), ["", ""])           # fade vs blink
    tensor([1., 0.])
    """
    v = videos.float()
    if v.shape[1] < 3:
        return torch.ones(v.shape[0], device=v.device)
    return 1 - (v[:, 1:-1] - 0.5 * (v[:, :-2] + v[:, 2:])).abs().flatten(1).mean(1)  # [B]


def motion(videos, prompts, top=0.05):
    """Motion magnitude (dynamic-degree proxy): per frame pair the mean of the top 5% pixel
    changes |f_t - f_{t-1}| (channel mean), averaged over pairs; in [0, 1].

    VBench's dynamic degree thresholds the top-5% RAFT flow magnitudes per pair; we take the top
    5% pixel changes (docs/rewards.md#weight-free-rewards), unthresholded, so a small moving
    object is not diluted by the background. Colour changes count too (use `motion_gray`). A
    single frame scores 0.

    >>> v = torch.zeros(2, 3, 3, 20, 20); v[1, 1, :, :5, :4] = 1.0  # video 1: a square blinks
    >>> motion(v, ["", ""])
    tensor([0., 1.])
    """
    v = videos.float()
    if v.shape[1] < 2:
        return torch.zeros(v.shape[0], device=v.device)
    d = (v[:, 1:] - v[:, :-1]).abs().mean(2).flatten(2)  # [B, F-1, N]
    return d.topk(max(1, int(top * d.shape[2])), dim=2).values.mean((1, 2))  # [B]


# ----------------------------------------------------------------------------------------------
# registry and loading


REWARDS = {
    "sharpness": sharpness, "colorfulness": colorfulness, "flicker": flicker,
    "smoothness": smoothness, "motion": motion, "motion_gray": grayscale(motion),
}


def get_reward(spec, registry=REWARDS):
    """A reward function from a registry name or "path/to/file.py:function".

    >>> get_reward("flicker") is flicker
    True
    """
    if spec in registry:
        return registry[spec]
    fix = f"use one of {sorted(registry)} or path/to/file.py:function"
    if ":" not in spec:
        raise ValueError(f"unknown reward '{spec}': {fix}")
    path, name = spec.rsplit(":", 1)  # the last ':', so a Windows drive letter survives
    if not os.path.isfile(path) or not path.endswith(".py"):
        raise ValueError(f"reward '{spec}': no Python file '{path}'; {fix}")
    key = "user_reward_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    module = sys.modules.get(key)
    if module is None:  # load each file once, under a name no other module can have
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(key, path))
        sys.modules[key] = module  # registered before running, as importlib's recipe does
        try:
            module.__spec__.loader.exec_module(module)
        except BaseException as e:  # a file that fails to run is not cached
            sys.modules.pop(key)
            if isinstance(e, SystemExit):  # exit() while importing: say which file, not just "3"
                raise ValueError(f"reward '{spec}': running '{path}' called exit({e.code})") from None
            raise
    fn, todo = getattr(module, name, None), f"define def {name}(videos, prompts) -> Tensor[B]"
    if fn is None:
        found = [n for n, f in vars(module).items() if callable(f) and not n.startswith("_")]
        raise ValueError(f"reward '{spec}': '{path}' has no '{name}' (it has {found}); {todo}")
    if not callable(fn):
        raise ValueError(f"reward '{spec}': '{name}' is a {type(fn).__name__}, not a function; "
                         f"{todo}")
    return fn


def takes_frames(fn):
    """True for a reward with a `frames` keyword (the learned image rewards: frames scored per
    video), which --released.reward-frames sets."""
    return "frames" in inspect.signature(fn).parameters


def parse_rewards(items, registry=REWARDS, frames=None):
    """["NAME=WEIGHT", "NAME", ...] -> [(name, fn, weight)]; a bare NAME means weight 1.0.
    Splits on the last "=" (a weight never contains ":", so "a=b/r.py:fn" alone is a file).
    Weight 0 = compute and log only. A file reward is named "<file stem>.<function>".
    frames: frames per video a reward with a `frames=` keyword scores (the learned image rewards),
    0 = all; None = its default.

    >>> [(n, w) for n, _, w in parse_rewards(["flicker=0.5", "motion"])]
    [('flicker', 0.5), ('motion', 1.0)]
    """
    out = []
    for item in [items] if isinstance(items, str) else items:
        spec, sep, w = item.rpartition("=")
        if not sep or ":" in w:
            spec, w = item, "1.0"
        try:
            weight = float(w)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ValueError(f"--rewards '{item}': bad weight '{w}', expected NAME=FLOAT "
                             f"(e.g. sharpness=0.5) or NAME alone for weight 1")
        fn = get_reward(spec, registry)
        path, _, func = spec.rpartition(":")
        name = spec if spec in registry else os.path.splitext(os.path.basename(path))[0] + "." + func
        if frames is not None and takes_frames(fn):  # --released.reward-frames: how many frames to score
            fn = partial(fn, frames=frames)
        if name in [n for n, _, _ in out]:  # names key the logs and the selective mask
            raise ValueError(f"--rewards: '{name}' given twice; give each reward once")
        out.append((name, fn, weight))
    return out


# ----------------------------------------------------------------------------------------------
# combining rewards

class RewardError(ValueError):
    """A reward returned something that is not one finite score per video, or was handed videos
    that are not finite pixels: the user's reward (or the model that made the videos) to fix."""


class MultiReward:
    """The rewards of a run: score() calls each and checks what it returns, total() sums them with
    their weights on raw scores, R = sum_j w_j R_j (Astrolabe). For --reward-norm per-reward,
    train.py normalises each reward within its group first (nft_loss.group_normalize).

    >>> mr = MultiReward(["flicker=2", "motion"])  # or MultiReward(parse_rewards([...]))
    >>> scores = mr.score(torch.zeros(2, 3, 3, 8, 8), ["a", "b"])
    >>> sorted(scores), mr.total(scores)
    (['flicker', 'motion'], tensor([2., 2.]))
    """

    def __init__(self, specs, registry=REWARDS, frames=None):
        """specs: the --rewards strings ["NAME=WEIGHT", ...] (looked up in `registry`; frames:
        see parse_rewards) or parse_rewards' (name, fn, w)."""
        if isinstance(specs, str) or (specs and isinstance(specs[0], str)):  # --rewards strings: parse them
            specs = parse_rewards(specs, registry, frames)
        if not specs:
            raise ValueError("no rewards given; e.g. --rewards flicker=1 motion_gray=0.5")
        self.names, self.fns, self.weights = map(list, zip(*specs))  # in --rewards order

    @torch.no_grad()
    def score(self, videos, prompts):
        """{name: scores [B]} of videos [B, F, 3, H, W] in [0, 1], float32 on the videos' device."""
        if videos.dim() != 5 or videos.shape[2] != 3 or not videos.is_floating_point():
            raise RewardError(f"videos must be float [B, F, 3, H, W] in [0, 1], got "
                              f"{videos.dtype} {tuple(videos.shape)}")
        if len(prompts) != len(videos):
            raise RewardError(f"{len(videos)} videos but {len(prompts)} prompts")
        if not torch.isfinite(videos).all():  # a detector would score NaN pixels as background
            raise RewardError("the videos hold non-finite pixels (NaN or inf): the model that made "
                              "them diverged; no reward can score them")
        # each reward on every video, its output checked: {name: (B,)}, in --rewards order. Each gets
        # its own copy of the videos: one that writes into them cannot change what the others see
        out = {}
        for name, fn in zip(self.names, self.fns):
            out[name] = self._check(name, fn(videos.clone(), list(prompts)), len(videos), videos.device)
        return out

    def total(self, scores):
        """R = sum_j w_j R_j over score()'s dict (or any dict of [B] terms with the same names).

        >>> MultiReward(["flicker=1", "motion=0.5"]).total({"flicker": torch.tensor([1., 2.]),
        ...                                                 "motion": torch.tensor([4., 0.])})
        tensor([3., 2.])
        """
        return sum(w * scores[n] for n, w in zip(self.names, self.weights))  # [B]

    @staticmethod
    def _check(name, out, B, device):
        """Anything convertible to B finite real numbers within float32's range ([B] or [B, 1]) ->
        float32 [B] on `device`."""
        try:  # not a tensor (a list, numpy): float64, so that a too-large score is seen as such below
            t = out.detach() if torch.is_tensor(out) else torch.as_tensor(out, dtype=torch.float64)
        except Exception as e:
            raise RewardError(f"reward '{name}' returned {type(out).__name__}, which is not "
                              f"convertible to a tensor ({e}); return Tensor[B]") from None
        if t.is_complex():
            raise RewardError(f"reward '{name}' returned {t.dtype} scores; return real numbers, Tensor[B]")
        t = t[:, 0] if t.dim() == 2 and t.shape[1] == 1 else t  # [B, 1] -> [B]
        if t.shape != (B,):
            raise RewardError(f"reward '{name}' returned shape {tuple(t.shape)}, expected ({B},): "
                              f"one score per video")
        if not torch.isfinite(t).all():
            raise RewardError(f"reward '{name}' returned non-finite scores {t.tolist()}")
        t32 = t.to(device=device, dtype=torch.float32)
        if not torch.isfinite(t32).all():  # finite in float64, beyond float32 (|x| > 3.4e38)
            raise RewardError(f"reward '{name}' returned scores beyond float32's range (largest |score| "
                              f"{t.abs().max().item():.3g} > 3.4e38), which would become inf; scale them down")
        return t32


def reward_file(fn):
    """The file a reward function is defined in (through functools.partial and @wraps)."""
    while isinstance(fn, partial):
        fn = fn.func
    try:
        path = inspect.getsourcefile(inspect.unwrap(fn))
    except TypeError:  # a builtin
        return "?"
    inside = os.path.abspath(path).startswith(os.getcwd() + os.sep)
    return os.path.relpath(path) if inside else path  # short below the current folder, else in full


def probe_rewards(specs, shape, prompts, device="cpu"):
    """Call each reward of `specs` (parse_rewards' (name, fn, weight)) once on two small random videos
    [2, *shape] in [0, 1] with `prompts` (two), as MultiReward.score calls it: a wrong signature, a
    wrong output (shape, dtype, non-finite) or an exception is one line naming the reward and its
    file. Returns those lines. Pass only cheap rewards: a learned one would load its model here."""
    videos = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    errors = []
    for name, fn, weight in specs:
        try:
            MultiReward([(name, fn, weight)]).score(videos, prompts)
        except Exception as e:
            why = " ".join(str(e).split())[:300]
            errors.append(f"--rewards {name} ({reward_file(fn)}): on a probe video {tuple(videos.shape)}: "
                          f"{type(e).__name__}: {why}")
    return errors
