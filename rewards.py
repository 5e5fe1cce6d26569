"""
Rewards: one signature, a registry, weight-free scores, and the multi-reward sum.

Every reward is a plain function with one signature (TRL style), higher = better:
    fn(videos: Tensor[B, F, 3, H, W] float in [0, 1], prompts: list[str]) -> Tensor[B]
so a user's own reward is one function in one file: `--rewards path/to/my.py:fn=0.5`.

What is here (definitions and sources: docs/rewards.md):
  weight-free   sharpness, colorfulness (frame-level, top-30% aggregated), flicker, smoothness,
                motion (+ motion_gray). The shapes world's prompt-aware detectors (color_match,
                direction_progress, ...) live in tiny_world.py, which hands them to train.py.
  helpers       top_fraction (Astrolabe's top-30% frame aggregation), grayscale (Astrolabe's
                trick against colour hacking of motion scores).
  learned       hpsv2 (HPSv2.1), clip_score, aesthetic (LAION v2) through open_clip, and
                dynamic_degree (VBench, RAFT) through torchvision; imported on first call.
  plumbing      REWARDS registry, get_reward("name" | "file.py:fn"), parse_rewards(["NAME=W"]),
                MultiReward: calls, validates, and sums R = sum_j w_j R_j on raw scores.
No project imports. Astrolabe's own HPSv3 and VideoAlign are 2-8 B Qwen2-VL scorers that need
their own environment; they plug in as `file.py:function` rewards through the same signature.

Weights of the learned rewards: one folder, WEIGHTS_DIR = $ASTRO_WEIGHTS (default ./weights),
holding each file under its canonical name; nothing is ever downloaded:
  hpsv2           HPS_v2.1_compressed.pt             HF xswu/HPSv2
  clip_score and  open_clip_pytorch_model.bin (or    HF timm/vit_large_patch14_clip_224.openai
    aesthetic       open_clip_model.safetensors)
  aesthetic       sac+logos+ava1-l14-linearMSE.pth   GitHub christophschuhmann/
                                                       improved-aesthetic-predictor
  dynamic_degree  raft_large_C_T_V1-22a6c225.pth     download.pytorch.org/models/
The `arch=` keyword of each picks another backbone of the same family (the tests: tiny ones).

Shapes: B videos, F frames, H, W pixels, N pixels per frame (H*W), P frame pairs (optical_flow),
n sub-sampled frames, D embedding width.
Test: python -m pytest tests/test_rewards.py tests/test_learned_rewards.py -q
"""
import hashlib
import importlib.util
import math
import os
import pickle
import sys
from functools import lru_cache, partial, wraps

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
    """Motion smoothness, weight-free: 1 - mean|f_t - (f_{t-1} + f_{t+1})/2| (docs/rewards.md#weight-free-rewards).

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
    5% pixel changes (docs/rewards.md#weight-free-rewards), unthresholded, so a small moving object is not diluted by the
    background. Colour changes count too (use `motion_gray`). A single frame scores 0.

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
# learned rewards: HPSv2.1, CLIP score, LAION aesthetic (open_clip) and RAFT dynamic degree
# (torchvision). Their libraries are imported on first call, each model is built once per
# (file, arch) and kept on the device it was last used on. Weights come only from local files:
# <WEIGHTS_DIR>/<canonical name>, nothing is downloaded (docs/rewards.md#learned-rewards).
# VideoAlign (Astrolabe's motion-quality model) is not here: its Qwen2-VL forward and key names
# follow transformers 4.45, and the 5.x layout needs a port (docs/rewards.md#astrolabes-own-reward-models); bring it in as a
# `file.py:function` reward from an environment pinned to 4.45.

WEIGHTS_DIR = os.environ.get("ASTRO_WEIGHTS", "weights")  # or assign rewards.WEIGHTS_DIR
WEIGHT_SOURCES = {  # canonical file name -> where to download it
    "HPS_v2.1_compressed.pt": "https://huggingface.co/xswu/HPSv2",
    "open_clip_pytorch_model.bin": "https://huggingface.co/timm/vit_large_patch14_clip_224.openai",
    "open_clip_model.safetensors": "https://huggingface.co/timm/vit_large_patch14_clip_224.openai",
    "sac+logos+ava1-l14-linearMSE.pth":
        "https://github.com/christophschuhmann/improved-aesthetic-predictor",
    **{f: "https://download.pytorch.org/models/" + f
       for f in ("raft_large_C_T_V1-22a6c225.pth", "raft_small_C_T_V2-01064c6d.pth")},
}
CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # either will do
RAFT_FILES = {"raft_large": "raft_large_C_T_V1-22a6c225.pth",  # ported RAFT "things", as VBench
              "raft_small": "raft_small_C_T_V2-01064c6d.pth"}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
FRAMES = 8  # image rewards score up to 8 evenly spaced frames: a ViT-H forward per frame is dear
CHUNK = 32  # images (or frame pairs for RAFT) per forward, to bound activation memory


def weight_file(reward, *names):
    """Path of the first of `names` found in WEIGHTS_DIR, or one error that says what to get."""
    for name in names:
        if os.path.isfile(path := os.path.join(WEIGHTS_DIR, name)):
            return path
    raise FileNotFoundError(
        f"reward '{reward}' needs {' or '.join(names)} in {os.path.abspath(WEIGHTS_DIR)} (set "
        f"ASTRO_WEIGHTS to the folder that holds it); download it from {WEIGHT_SOURCES[names[0]]}")


@lru_cache(maxsize=None)
def _open_clip(path, arch):
    """An open_clip model with a local state dict, and its tokenizer. load_checkpoint takes a plain
    state dict (.bin/.pt or .safetensors) or HPS's {"state_dict": ...}."""
    import open_clip
    model = open_clip.create_model(arch, pretrained=None)
    try:
        open_clip.load_checkpoint(model, path)  # weights_only=True: tensors only, no code
    except pickle.UnpicklingError:  # HPS's .pt is a training checkpoint; should it pickle more
        # than tensors (not checked on the real file), unpickle it fully: trust only its source
        open_clip.load_checkpoint(model, path, weights_only=False)
    return model.eval(), open_clip.get_tokenizer(arch)


@lru_cache(maxsize=None)
def _aesthetic_head(path):
    """LAION improved aesthetic MLP, rebuilt with the file's own indices: Linear layers at 0, 2,
    4, 6, 7, Dropout at 1, 3, 5 (identity in eval), and no activations - it is affine."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = {k.removeprefix("layers."): v for k, v in sd.items()}  # file keys: layers.0.weight, ...
    d = sd["0.weight"].shape[1]  # 768 for CLIP ViT-L/14
    head = torch.nn.Sequential(torch.nn.Linear(d, 1024), torch.nn.Dropout(0.2),
                               torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
                               torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                               torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    head.load_state_dict(sd)
    return head.eval()


@lru_cache(maxsize=None)
def _raft(path, arch):
    from torchvision.models import optical_flow
    model = getattr(optical_flow, arch)(weights=None)  # raft_large or raft_small
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def _subsample(videos, n):
    """n evenly spaced frames, first and last included: [B, F, ...] -> [B, min(n, F), ...];
    n = 0: every frame (what the released code scores)."""
    n = videos.shape[1] if n == 0 else min(n, videos.shape[1])
    idx = torch.linspace(0, videos.shape[1] - 1, n).round().long()
    return videos[:, idx.to(videos.device)]


def clip_preprocess(x, longest=False, size=224):
    """[N, 3, H, W] in [0, 1] -> [N, 3, size, size], OpenAI mean/std normalised, bicubic with
    antialiasing on the float tensor. longest=False: CLIP's shortest side to `size` + centre crop
    (torchvision Resize + CenterCrop arithmetic). longest=True: HPS's ResizeMaxSize, the longest
    side to `size` + centre zero-pad (black bars: an 832x480 frame becomes 224x129 plus bars)."""
    x = x.float()
    H, W = x.shape[-2:]
    if longest:
        h, w = round(H * size / max(H, W)), round(W * size / max(H, W))
    else:  # the short side becomes `size`, the long one int(size * long / short)
        h, w = (size, int(size * W / H)) if H <= W else (int(size * H / W), size)
    x = Fn.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    if longest:  # pad before normalising: the bars are black, not the mean colour
        x = Fn.pad(x, ((size - w) // 2, size - w - (size - w) // 2,
                       (size - h) // 2, size - h - (size - h) // 2))  # [N, 3, size, size]
    else:
        top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
        x = x[..., top:top + size, left:left + size]  # [N, 3, size, size]
    mean, std = x.new_tensor(CLIP_MEAN).view(3, 1, 1), x.new_tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def _clip_features(videos, prompts, reward, names, arch, frames, longest):
    """Unit CLIP embeddings of the sub-sampled frames [B, n, D] and of the prompts [B, D] (None
    if prompts is None)."""
    model, tokenizer = _open_clip(weight_file(reward, *names), arch)
    model.to(videos.device)
    x = _subsample(videos, frames)  # [B, n, 3, H, W]
    B, n = x.shape[:2]
    x = clip_preprocess(x.flatten(0, 1), longest)  # [B*n, 3, 224, 224]
    with torch.autocast("cuda", torch.bfloat16, enabled=videos.is_cuda):
        img = torch.cat([model.encode_image(c, normalize=True).float() for c in x.split(CHUNK)])
        txt = None if prompts is None else model.encode_text(
            tokenizer(prompts).to(videos.device), normalize=True).float()  # [B, D]
    return img.view(B, n, -1), txt  # [B, n, D], [B, D]


@torch.no_grad()
def hpsv2(videos, prompts, arch="ViT-H-14", frames=FRAMES):
    """HPSv2.1 (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on human preferences, score =
    cos(image, text) with no logit scale (about 0.2-0.35), top-30% over `frames` sub-sampled
    frames, as Astrolabe aggregates HPSv3. Needs HPS_v2.1_compressed.pt."""
    img, txt = _clip_features(videos, prompts, "hpsv2", ["HPS_v2.1_compressed.pt"], arch, frames,
                              longest=True)
    return top_fraction((img * txt.unsqueeze(1)).sum(-1))  # cos per frame [B, n] -> [B]


@torch.no_grad()
def clip_score(videos, prompts, arch="ViT-L-14-quickgelu", frames=FRAMES):
    """CLIPScore (Hessel et al. 2021) with OpenAI CLIP ViT-L/14, mean over `frames` sub-sampled
    frames; in [0, 2.5]. OpenAI's weights were trained with QuickGELU: from a local file open_clip
    cannot know that, hence the -quickgelu arch (plain ViT-L-14 loads, but scores wrongly)."""
    img, txt = _clip_features(videos, prompts, "clip_score", CLIP_FILES, arch, frames, False)
    # CLIPScore = 2.5 * max(cos(image, text), 0)
    return (2.5 * (img * txt.unsqueeze(1)).sum(-1).clamp(min=0)).mean(1)  # [B]


@torch.no_grad()
def aesthetic(videos, prompts, arch="ViT-L-14-quickgelu", frames=FRAMES):
    """LAION improved aesthetic predictor v2: an MLP on the unit CLIP ViT-L/14 image embedding,
    roughly 1-10, top-30% over `frames` sub-sampled frames. Shares clip_score's CLIP (loaded once).
    Needs the CLIP file and sac+logos+ava1-l14-linearMSE.pth. Ignores the prompt."""
    img, _ = _clip_features(videos, None, "aesthetic", CLIP_FILES, arch, frames, False)
    head = _aesthetic_head(weight_file("aesthetic", "sac+logos+ava1-l14-linearMSE.pth"))
    return top_fraction(head.to(videos.device)(img)[..., 0])  # [B, n] -> [B]


@torch.no_grad()
def optical_flow(videos, arch="raft_large", stride=2, iters=20):
    """RAFT flow from frame t to t + stride: [B, F, 3, H, W] -> [B, P, 2, H, W] pixels, P pairs.
    RAFT wants [-1, 1] and sides divisible by 8: we pad by replicating the border (resizing would
    rescale the flow) and crop the flow back. Its correlation pyramid needs sides >= 128, so
    smaller videos are upsampled, and their flow is brought back to (H, W) pixels."""
    model = _raft(weight_file("dynamic_degree", RAFT_FILES[arch]), arch).to(videos.device)
    v = videos.float()[:, ::stride].flatten(0, 1) * 2 - 1  # [B*F', 3, H, W]
    B, F, _, H, W = videos[:, ::stride].shape
    s = max(1.0, 128 / min(H, W))
    Hs, Ws = math.ceil(H * s), math.ceil(W * s)
    if s > 1:
        v = Fn.interpolate(v, size=(Hs, Ws), mode="bilinear", align_corners=False)
    v = Fn.pad(v, (0, -Ws % 8, 0, -Hs % 8), mode="replicate")
    v = v.view(B, F, *v.shape[1:])  # [B, F', 3, H8, W8]
    a, b = v[:, :-1].flatten(0, 1), v[:, 1:].flatten(0, 1)  # [B*P, 3, H8, W8] each
    flow = [model(x, y, num_flow_updates=iters)[-1] for x, y in zip(a.split(CHUNK), b.split(CHUNK))]
    flow = torch.cat(flow)[..., :Hs, :Ws]  # the last RAFT refinement, [B*P, 2 (x, y), Hs, Ws]
    if s > 1:  # back to (H, W): resample, and shrink x and y displacements by their own scale
        flow = Fn.interpolate(flow, size=(H, W), mode="area")
        flow = flow / flow.new_tensor([Ws / W, Hs / H]).view(1, 2, 1, 1)
    return flow.view(B, F - 1, 2, H, W)


@torch.no_grad()
def dynamic_degree(videos, prompts, arch="raft_large", stride=2, iters=20, cap=1.0):
    """VBench dynamic degree, made continuous for RL. VBench flows frame pairs at ~8 fps (stride 2
    for Wan's 16 fps), takes per pair the mean of the top 5% flow magnitudes, and calls a video
    dynamic when enough pairs exceed thres = 6 px * min(H, W) / 256. Here each pair scores
    min(top5 / thres, cap) and the video the mean: cap = 1 turns VBench's count of moving pairs into
    a soft fraction in [0, 1] that stops paying once a pair moves enough, so wild motion is not
    rewarded (float("inf") = raw magnitude). Why not a RAFT smoothness: VBench's needs a learned
    frame interpolator (AMT), and the weight-free `smoothness` already covers the idea."""
    B, _, _, H, W = videos.shape
    if videos[:, ::stride].shape[1] < 2:
        return torch.zeros(B, device=videos.device)
    mag = optical_flow(videos, arch, stride, iters).norm(dim=2).flatten(2)  # [B, P, H*W]
    top5 = mag.topk(max(1, int(0.05 * H * W)), dim=2).values.mean(2)  # [B, P]
    thres = 6.0 * min(H, W) / 256  # VBench: 6 px at 256 px, scaled with the frame size
    return (top5 / thres).clamp(max=cap).mean(1)  # [B]


# ----------------------------------------------------------------------------------------------
# registry and loading

REWARDS = {
    "sharpness": sharpness, "colorfulness": colorfulness, "flicker": flicker,
    "smoothness": smoothness, "motion": motion, "motion_gray": grayscale(motion),
    "hpsv2": hpsv2, "clip_score": clip_score, "aesthetic": aesthetic,
    "dynamic_degree": dynamic_degree,
}
# learned rewards -> the weight files each needs in WEIGHTS_DIR (one of each tuple), so a run can
# check for them before anything loads
LEARNED = {"hpsv2": [("HPS_v2.1_compressed.pt",)], "clip_score": [CLIP_FILES],
           "aesthetic": [CLIP_FILES, ("sac+logos+ava1-l14-linearMSE.pth",)],
           "dynamic_degree": [(RAFT_FILES["raft_large"],)]}
# image rewards that score `frames` sub-sampled frames of each video (--reward-frames)
SUBSAMPLED = {"hpsv2", "clip_score", "aesthetic"}


def missing_weights(names):
    """'reward: file (source)' for every weight file a learned reward in `names` lacks."""
    out = []
    for name in names:
        for alternatives in LEARNED.get(name, []):
            if not any(os.path.isfile(os.path.join(WEIGHTS_DIR, f)) for f in alternatives):
                out.append(f"{name}: {' or '.join(alternatives)} in {os.path.abspath(WEIGHTS_DIR)} "
                           f"(from {WEIGHT_SOURCES[alternatives[0]]})")
    return out


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
        except BaseException:  # a file that fails to run is not cached
            sys.modules.pop(key)
            raise
    fn, todo = getattr(module, name, None), f"define def {name}(videos, prompts) -> Tensor[B]"
    if fn is None:
        found = [n for n, f in vars(module).items() if callable(f) and not n.startswith("_")]
        raise ValueError(f"reward '{spec}': '{path}' has no '{name}' (it has {found}); {todo}")
    if not callable(fn):
        raise ValueError(f"reward '{spec}': '{name}' is a {type(fn).__name__}, not a function; "
                         f"{todo}")
    return fn


def parse_rewards(items, registry=REWARDS, frames=None):
    """["NAME=WEIGHT", "NAME", ...] -> [(name, fn, weight)]; a bare NAME means weight 1.0.
    Splits on the last "=" (a weight never contains ":", so "a=b/r.py:fn" alone is a file).
    Weight 0 = compute and log only. A file reward is named "<file stem>.<function>".
    frames: frames the image rewards (SUBSAMPLED) score per video, 0 = all; None = their default.

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
        if frames is not None and name in SUBSAMPLED:  # --reward-frames: how many frames to score
            fn = partial(fn, frames=frames)
        if name in [n for n, _, _ in out]:  # names key the logs and the selective mask
            raise ValueError(f"--rewards: '{name}' given twice; give each reward once")
        out.append((name, fn, weight))
    return out


# ----------------------------------------------------------------------------------------------
# combining rewards
def weighted_total(scores, weights):
    """R = sum_j w_j R_j over a dict of [B] raw scores (Astrolabe). For --reward-norm
    per-reward, train.py normalises each reward within its group first (nft_loss.group_normalize).

    >>> weighted_total({"a": torch.tensor([1., 2.]), "b": torch.tensor([4., 0.])}, {"a": 1.0, "b": 0.5})
    tensor([3., 2.])
    """
    return torch.stack([w * scores[n] for n, w in weights.items()]).sum(0)  # [B]


class MultiReward:
    """Calls each reward, checks what it returns, and sums them with their weights.

    >>> mr = MultiReward(["flicker=2", "motion"])  # or MultiReward(parse_rewards([...]))
    >>> total, scores = mr(torch.zeros(2, 3, 3, 8, 8), ["a", "b"])
    >>> total, sorted(scores)
    (tensor([2., 2.]), ['flicker', 'motion'])
    """

    def __init__(self, specs, registry=REWARDS, frames=None):
        """specs: the --rewards strings ["NAME=WEIGHT", ...] (looked up in `registry`; frames:
        see parse_rewards) or parse_rewards' (name, fn, w)."""
        if isinstance(specs, str) or (specs and isinstance(specs[0], str)):
            specs = parse_rewards(specs, registry, frames)
        if not specs:
            raise ValueError("no rewards given; e.g. --rewards flicker=1 motion_gray=0.5")
        self.names, self.fns, self.weights = map(list, zip(*specs))  # in --rewards order

    @torch.no_grad()
    def __call__(self, videos, prompts):
        """-> (total [B] on raw scores, {name: scores [B]}), float32 on the videos' device."""
        if videos.dim() != 5 or videos.shape[2] != 3 or not videos.is_floating_point():
            raise ValueError(f"videos must be float [B, F, 3, H, W] in [0, 1], got "
                             f"{videos.dtype} {tuple(videos.shape)}")
        if len(prompts) != len(videos):
            raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
        if not torch.isfinite(videos).all():  # a detector would score NaN pixels as background
            raise ValueError("the videos hold non-finite pixels (NaN or inf): the model that made "
                             "them diverged; no reward can score them")
        scores = {n: self._check(n, fn(videos, prompts), len(videos), videos.device)
                  for n, fn in zip(self.names, self.fns)}
        return weighted_total(scores, dict(zip(self.names, self.weights))), scores

    @staticmethod
    def _check(name, out, B, device):
        """Anything convertible to B finite floats ([B] or [B, 1]) -> float32 [B]."""
        try:
            t = torch.as_tensor(out, dtype=torch.float32, device=device).detach()
        except Exception as e:
            raise ValueError(f"reward '{name}' returned {type(out).__name__}, which is not "
                             f"convertible to a tensor ({e}); return Tensor[B]") from None
        t = t[:, 0] if t.dim() == 2 and t.shape[1] == 1 else t
        if t.shape != (B,):
            raise ValueError(f"reward '{name}' returned shape {tuple(t.shape)}, expected ({B},): "
                             f"one score per video")
        if not torch.isfinite(t).all():
            raise ValueError(f"reward '{name}' returned non-finite scores {t.tolist()}")
        return t
