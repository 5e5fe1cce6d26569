"""
The learned rewards: HPSv2.1, CLIP score and the LAION aesthetic predictor through open_clip, and
VBench's dynamic degree through torchvision's RAFT. Same signature as every reward in rewards.py:
fn(videos [B, F, 3, H, W] in [0, 1], prompts) -> [B], higher = better; REWARDS below registers
them (train.py looks names up here, in rewards.REWARDS and in tiny_world.REWARDS).
Models, preprocessing and scores, with their sources: docs/rewards.md#learned-rewards.

open_clip and torchvision are imported on first call; each model is built once per (file, arch)
and kept on the device it was last used on. Weights come only from local files, one folder,
WEIGHTS_DIR = $ASTRO_WEIGHTS (default ./weights), each under its canonical name; nothing is ever
downloaded, and a missing file stops the reward with its name and source:
  hpsv2           HPS_v2.1_compressed.pt             HF xswu/HPSv2
  clip_score and  open_clip_pytorch_model.bin (or    HF timm/vit_large_patch14_clip_224.openai
    aesthetic       open_clip_model.safetensors)
  aesthetic       sac+logos+ava1-l14-linearMSE.pth   GitHub christophschuhmann/
                                                       improved-aesthetic-predictor
  dynamic_degree  raft_large_C_T_V1-22a6c225.pth     download.pytorch.org/models/
Assigning `reward_models.WEIGHTS_DIR = path` moves the folder for every learned reward, since every
lookup reads it when called. The `arch=` keyword of each reward picks another backbone of the
same family (the tests use tiny random ones saved in the real file layouts).
  hpsv3           Qwen2-VL-7B-Instruct/{config,      HF Qwen/Qwen2-VL-7B-Instruct
                    tokenizer,preprocessor_config}.json
                  HPSv3.safetensors                  HF MizzenAI/HPSv3
HPSv3 is scored in its own file, reward_hpsv3.py (a port of its Qwen2-VL model onto the current
transformers); its files are listed here so the start-up checks find them like every other's.

Shapes: B videos, F frames, H, W pixels, n sub-sampled frames, M images of one CLIP batch (B*n),
D embedding width; optical_flow: F' frames kept at the stride, P = F' - 1 pairs, Hs, Ws the
size after upsampling, H8, W8 padded to multiples of 8.
Test: python -m pytest tests/test_learned_rewards.py -q
"""
import math
import os
import pickle
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as Fn

from rewards import top_fraction

WEIGHTS_DIR = os.environ.get("ASTRO_WEIGHTS", "weights")  # read at call time, never cached
WEIGHT_SOURCES = {  # canonical file name -> where to download it
    "HPS_v2.1_compressed.pt": "https://huggingface.co/xswu/HPSv2",
    "open_clip_pytorch_model.bin": "https://huggingface.co/timm/vit_large_patch14_clip_224.openai",
    "open_clip_model.safetensors": "https://huggingface.co/timm/vit_large_patch14_clip_224.openai",
    "sac+logos+ava1-l14-linearMSE.pth":
        "https://github.com/christophschuhmann/improved-aesthetic-predictor",
    **{f: "https://download.pytorch.org/models/" + f
       for f in ("raft_large_C_T_V1-22a6c225.pth", "raft_small_C_T_V2-01064c6d.pth")},
}
# HPSv3 (reward_hpsv3.py, its own file: a Qwen2-VL port) reads three small files of the base
# folder (its checkpoint holds every tensor, so the 7B shards are not needed) and its checkpoint
HPSV3_BASE = "Qwen2-VL-7B-Instruct"
HPSV3_BASE_FILES = ("config.json", "tokenizer.json", "preprocessor_config.json")
HPSV3_CHECKPOINT = "HPSv3.safetensors"
WEIGHT_SOURCES.update({f"{HPSV3_BASE}/{f}": "https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct" for f in HPSV3_BASE_FILES})
WEIGHT_SOURCES[HPSV3_CHECKPOINT] = "https://huggingface.co/MizzenAI/HPSv3"
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


@contextmanager
def visiting(model, *to):
    """`with visiting(model, device[, dtype]):` the model sits there while the block scores, then
    goes back to the CPU, also when scoring raises. For the Qwen2-VL rewards (reward_hpsv3.py,
    reward_videoalign.py): 15.5 / 4.4 GB the rollout and the update can use in between
    (memory.VLM_REWARDS), for two PCIe copies per step."""
    model.to(*to)
    try:
        yield model
    finally:
        model.to("cpu")


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
    # rounded linspace: n distinct indices for n <= F, always 0 and F - 1
    idx = torch.linspace(0, videos.shape[1] - 1, n).round().long()
    return videos[:, idx.to(videos.device)]


def clip_preprocess(x, longest=False, size=224):
    """[M, 3, H, W] in [0, 1] -> [M, 3, size, size], OpenAI mean/std normalised, bicubic with
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
                       (size - h) // 2, size - h - (size - h) // 2))  # [M, 3, size, size]
    else:
        top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
        x = x[..., top:top + size, left:left + size]  # [M, 3, size, size]
    mean, std = x.new_tensor(CLIP_MEAN).view(3, 1, 1), x.new_tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def _clip_features(videos, prompts, reward, names, arch, frames, longest):
    """Unit CLIP embeddings of the sub-sampled frames [B, n, D] and of the prompts [B, D] (None
    if prompts is None)."""
    model, tokenizer = _open_clip(weight_file(reward, *names), arch)
    model.to(videos.device)  # the cached model follows the videos (train: GPU, tests: CPU)
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
    # upsampling factor: RAFT's correlation pyramid needs the short side >= 128 px
    s = max(1.0, 128 / min(H, W))
    Hs, Ws = math.ceil(H * s), math.ceil(W * s)
    if s > 1:
        v = Fn.interpolate(v, size=(Hs, Ws), mode="bilinear", align_corners=False)
    # right/bottom border replicated to multiples of 8: a resize here would rescale the flow
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
# what each learned reward needs

# learned rewards -> the weight files each needs in WEIGHTS_DIR (one of each tuple), so a run can
# check for them before anything loads
LEARNED = {"hpsv2": [("HPS_v2.1_compressed.pt",)], "clip_score": [CLIP_FILES],
           "aesthetic": [CLIP_FILES, ("sac+logos+ava1-l14-linearMSE.pth",)],
           "dynamic_degree": [(RAFT_FILES["raft_large"],)],
           "hpsv3": [(f"{HPSV3_BASE}/{f}",) for f in HPSV3_BASE_FILES] + [(HPSV3_CHECKPOINT,)]}


def missing_weights(names):
    """'reward: file (source)' for every weight file a learned reward in `names` lacks."""
    out = []
    for name in names:
        for alternatives in LEARNED.get(name, []):
            if not any(os.path.isfile(os.path.join(WEIGHTS_DIR, f)) for f in alternatives):
                out.append(f"{name}: {' or '.join(alternatives)} in {os.path.abspath(WEIGHTS_DIR)} "
                           f"(from {WEIGHT_SOURCES[alternatives[0]]})")
    return out


# the learned rewards by name (--rewards hpsv2=1 ...)
REWARDS = {"hpsv2": hpsv2, "clip_score": clip_score, "aesthetic": aesthetic, "dynamic_degree": dynamic_degree}
