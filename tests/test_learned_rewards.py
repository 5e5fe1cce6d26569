"""
Learned rewards (hpsv2, clip_score, aesthetic, dynamic_degree) with tiny randomly initialised
backbones: each file is saved in the real layout under its canonical name, loaded through the
reward's own path, and the score checked against a plain computation with the in-memory model.
Preprocessing is checked against torchvision's transforms, i.e. HPS's and CLIP's own recipe.
What no test here can tell: the scores of the real weights (nothing is downloaded).

Run:  python -m pytest tests/test_learned_rewards.py -q
"""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as Fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import reward_hpsv3
import reward_models
from reward_models import REWARDS
from rewards import MultiReward, parse_rewards

open_clip = pytest.importorskip("open_clip")
TF = pytest.importorskip("torchvision.transforms.functional")
from torchvision.models.optical_flow import raft_small
from torchvision.transforms import InterpolationMode

TINY = "astro-tiny-clip"  # a 2-layer ViT and text tower, 32-d embeddings, 224 px input
TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32,
                           "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                         "layers": 2}}
MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
PROMPTS = ["a red fox running in the snow", "a calm lake at dawn"]


class AestheticMLP(torch.nn.Module):
    """The improved-aesthetic-predictor's module, so the saved keys are its own: layers.N.*."""

    def __init__(self, d):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(d, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random models saved as the real files in a weights folder; WEIGHTS_DIR points there."""
    cfg_dir, wdir = tmp_path_factory.mktemp("cfg"), tmp_path_factory.mktemp("weights")
    (cfg_dir / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg_dir / f"{TINY}.json")
    torch.manual_seed(0)
    hps, clip = open_clip.create_model(TINY).eval(), open_clip.create_model(TINY).eval()
    with torch.no_grad():  # random towers agree on a negative cosine, which CLIPScore clips to 0
        clip.text_projection.neg_()
    head, raft = AestheticMLP(32).eval(), raft_small(weights=None).eval()
    torch.save({"state_dict": hps.state_dict()}, wdir / "HPS_v2.1_compressed.pt")  # HPS layout
    torch.save(clip.state_dict(), wdir / "open_clip_pytorch_model.bin")  # plain state dict
    torch.save(head.state_dict(), wdir / "sac+logos+ava1-l14-linearMSE.pth")
    torch.save(raft.state_dict(), wdir / reward_models.RAFT_FILES["raft_small"])
    old, reward_models.WEIGHTS_DIR = reward_models.WEIGHTS_DIR, str(wdir)
    yield dict(hps=hps, clip=clip, head=head, raft=raft, tok=open_clip.get_tokenizer(TINY),
               dir=wdir)
    reward_models.WEIGHTS_DIR = old


def video(B=2, F=8, H=40, W=72, seed=0):
    """Non-square random videos in [0, 1]: [B, F, 3, H, W]."""
    return torch.rand(B, F, 3, H, W, generator=torch.Generator().manual_seed(seed))


# ---- slow, obviously correct references: HPS's and CLIP's transforms in torchvision, per frame


def hps_reference(frame):
    """HPS's ResizeMaxSize(224) on a [3, H, W] float tensor, then Normalize, as its code reads."""
    H, W = frame.shape[-2:]
    scale = 224 / max(H, W)
    h, w = round(H * scale), round(W * scale)
    img = TF.resize(frame, [h, w], InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = 224 - h, 224 - w
    img = TF.pad(img, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(img, MEAN, STD)


def clip_reference(frame):
    """open_clip's validation transform: Resize(224, bicubic) + CenterCrop(224) + Normalize."""
    img = TF.resize(frame, 224, InterpolationMode.BICUBIC, antialias=True)
    return TF.normalize(TF.center_crop(img, 224), MEAN, STD)


def frame_embeddings(model, v, prep):
    """Unit image embeddings, one frame at a time: [B, F, 3, H, W] -> [B, F, D]."""
    with torch.no_grad():
        return torch.stack([torch.stack([Fn.normalize(model.encode_image(prep(f)[None])[0], dim=-1)
                                         for f in frames]) for frames in v])


def cosines(model, tok, v, prompts, prep):
    """cos(frame, its prompt) per frame: [B, F]."""
    with torch.no_grad():
        txt = Fn.normalize(model.encode_text(tok(prompts)), dim=-1)  # [B, D]
    return (frame_embeddings(model, v, prep) * txt[:, None]).sum(-1)


def top30(scores):
    """Mean of the best floor(0.3 F) (at least 1) frames of each video, by sorting in Python."""
    k = max(1, int(0.3 * len(scores[0]) + 1e-9))
    return torch.tensor([sum(sorted(s.tolist(), reverse=True)[:k]) / k for s in scores])


# ---- preprocessing


@pytest.mark.parametrize("H,W", [(33, 47), (47, 33), (480, 832), (50, 50)])  # odd pads, crops
def test_preprocessing_matches_torchvision_transforms(H, W):
    x = torch.rand(3, 3, H, W, generator=torch.Generator().manual_seed(H * W))
    hps = reward_models.clip_preprocess(x, longest=True)
    clip = reward_models.clip_preprocess(x, longest=False)
    assert hps.shape == clip.shape == (3, 3, 224, 224)
    torch.testing.assert_close(hps, torch.stack([hps_reference(f) for f in x]), atol=1e-5, rtol=0)
    torch.testing.assert_close(clip, torch.stack([clip_reference(f) for f in x]), atol=1e-5, rtol=0)
    if H != W:  # HPS's bars are black before normalisation: -mean/std after it
        black = (-torch.tensor(MEAN) / torch.tensor(STD)).view(3, 1)
        torch.testing.assert_close(hps[0, :, 0, :1] if H < W else hps[0, :, :1, 0], black)


# ---- hpsv2, clip_score, aesthetic


def test_hpsv2_is_top30_of_frame_cosines(tiny):
    v = video()
    out = reward_models.hpsv2(v, PROMPTS, arch=TINY)
    assert out.shape == (2,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, reward_models.hpsv2(v, PROMPTS, arch=TINY))  # deterministic
    cos = cosines(tiny["hps"], tiny["tok"], v, PROMPTS, hps_reference)  # [B, 8], all frames used
    torch.testing.assert_close(out, top30(cos), atol=1e-5, rtol=0)  # top 2 of 8 frames
    assert not torch.allclose(out, cos.mean(1), atol=1e-4)  # not the plain mean


def test_hpsv2_subsamples_evenly_spaced_frames(tiny):
    v = video(F=12)
    idx = [0, 2, 3, 5, 6, 8, 9, 11]  # linspace(0, 11, 8) rounded: first and last kept
    torch.testing.assert_close(reward_models.hpsv2(v, PROMPTS, arch=TINY),
                               reward_models.hpsv2(v[:, idx], PROMPTS, arch=TINY), atol=1e-6, rtol=0)
    assert reward_models.FRAMES == 8


def test_clip_score_is_hessel_mean(tiny):
    v = video(seed=1)
    out = reward_models.clip_score(v, PROMPTS, arch=TINY)
    cos = cosines(tiny["clip"], tiny["tok"], v, PROMPTS, clip_reference)  # [B, 8]
    torch.testing.assert_close(out, (2.5 * cos.clamp(min=0)).mean(1), atol=1e-5, rtol=0)
    assert torch.equal(out, reward_models.clip_score(v, PROMPTS, arch=TINY))
    assert ((out > 0) & (out <= 2.5)).all()


def test_clip_score_clips_negative_cosines(monkeypatch):
    img = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [-1.0, 0.0]]])  # [B=2, n=2, D=2]
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # cos: [[1, 0.6], [0, -1]]
    monkeypatch.setattr(reward_models, "_clip_features", lambda *args: (img, txt))
    out = reward_models.clip_score(video(), PROMPTS)
    torch.testing.assert_close(out, torch.tensor([2.5 * 0.8, 0.0]))


def test_aesthetic_head_on_unit_clip_embeddings_and_one_shared_clip(tiny):
    sd = torch.load(tiny["dir"] / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    assert sorted(sd) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7)
                                for p in ("weight", "bias"))  # the real file's keys
    reward_models._open_clip.cache_clear()
    v = video(seed=2)
    out = reward_models.aesthetic(v, PROMPTS, arch=TINY)
    reward_models.clip_score(v, PROMPTS, arch=TINY)
    reward_models.aesthetic(v, PROMPTS, arch=TINY)
    assert reward_models._open_clip.cache_info().misses == 1  # CLIP built once for both rewards
    with torch.no_grad():
        per_frame = tiny["head"](frame_embeddings(tiny["clip"], v, clip_reference))[..., 0]
    torch.testing.assert_close(out, top30(per_frame), atol=1e-5, rtol=0)
    assert out.shape == (2,) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["hpsv2", "clip_score", "aesthetic", "dynamic_degree"])
def test_single_frame_half_precision_and_odd_sizes(tiny, name):
    arch = "raft_small" if name == "dynamic_degree" else TINY
    for v in [video(F=1, H=33, W=47).half(), video(F=3, H=33, W=47)]:
        out = REWARDS[name](v, PROMPTS, arch=arch)
        assert out.shape == (2,) and out.dtype == torch.float32 and torch.isfinite(out).all()


# ---- dynamic_degree


def test_optical_flow_is_the_raft_model_on_frame_pairs(tiny):
    v = video(B=1, F=5, H=128, W=136)  # sides divisible by 8 and >= 128: no padding, no resize
    flow = reward_models.optical_flow(v, arch="raft_small", stride=2, iters=3)
    assert flow.shape == (1, 2, 2, 128, 136)  # frames 0, 2, 4 -> pairs (0, 2), (2, 4)
    with torch.no_grad():
        ref = tiny["raft"](v[0, [0, 2]] * 2 - 1, v[0, [2, 4]] * 2 - 1, num_flow_updates=3)[-1]
    torch.testing.assert_close(flow[0], ref, atol=1e-5, rtol=0)
    small = reward_models.optical_flow(video(B=2, F=3, H=30, W=44), arch="raft_small", iters=2)
    assert small.shape == (2, 1, 2, 30, 44) and torch.isfinite(small).all()  # upsampled, padded


def test_optical_flow_of_small_videos_is_in_their_own_pixels(tiny, monkeypatch):
    """Under 128 px RAFT runs on an upsampled copy; a fake RAFT that sees everything move by
    (1, 2) of its own pixels must come back as (1, 2) / scale in the video's pixels."""
    seen = []

    class FakeRAFT(torch.nn.Module):
        def forward(self, a, b, num_flow_updates):
            seen.append(a)
            flow = torch.ones(a.shape[0], 2, *a.shape[-2:])
            flow[:, 1] = 2.0
            return [flow * 0, flow]  # RAFT returns every refinement; the last one counts

    monkeypatch.setattr(reward_models, "_raft", lambda path, arch: FakeRAFT())
    flow = reward_models.optical_flow(video(B=1, F=3, H=30, W=44), "raft_small", stride=1)  # 128x188
    assert seen[0].shape == (2, 3, 128, 192) and seen[0].min() >= -1 and seen[0].max() <= 1
    assert flow.shape == (1, 2, 2, 30, 44)
    torch.testing.assert_close(flow[:, :, 0], torch.full((1, 2, 30, 44), 44 / 188))
    torch.testing.assert_close(flow[:, :, 1], torch.full((1, 2, 30, 44), 2 * 30 / 128))


def test_dynamic_degree_thresholds_top5_flow(monkeypatch):
    """RAFT with random weights sees no motion, so the flow is ours: 5% of the pixels move by m."""
    H, W = 64, 128
    thres = 6 * min(H, W) / 256  # 1.5 px
    k = int(0.05 * H * W)  # 409 pixels

    def fake_flow(videos, arch, stride, iters):
        flow = torch.zeros(1, 2, 2, H * W)
        flow[0, 0, 0, :k] = 0.75  # pair 0: the moving 5% shift 0.75 px right -> 0.5 thres
        flow[0, 1, 1, :k] = -3.0  # pair 1: 3 px up -> 2 thres, capped at 1
        flow[0, :, 0, k:] = 0.01  # the rest barely moves: outside the top 5%
        return flow.view(1, 2, 2, H, W)

    monkeypatch.setattr(reward_models, "optical_flow", fake_flow)
    v = torch.zeros(1, 5, 3, H, W)
    assert reward_models.dynamic_degree(v, [""]).item() == pytest.approx((0.5 + 1.0) / 2)
    assert reward_models.dynamic_degree(v, [""], cap=float("inf")).item() == pytest.approx(
        (0.75 + 3.0) / 2 / thres)
    assert reward_models.dynamic_degree(v[:, :2], [""]).item() == 0.0  # stride 2: one frame, no pair


# ---- weights: one folder, clear errors, lazy imports, the registry


@pytest.mark.parametrize("name,missing", [
    ("hpsv2", "HPS_v2.1_compressed.pt"), ("clip_score", "open_clip_pytorch_model.bin"),
    ("aesthetic", "open_clip_pytorch_model.bin"),
    ("dynamic_degree", "raft_large_C_T_V1-22a6c225.pth")])
def test_missing_weight_file_says_what_to_get(tmp_path, monkeypatch, name, missing):
    monkeypatch.setattr(reward_models, "WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        MultiReward([f"{name}=1"], registry=REWARDS).score(video(), PROMPTS)  # through --rewards, before any model build
    msg = str(e.value)
    assert f"'{name}'" in msg and missing in msg and str(tmp_path) in msg
    assert "ASTRO_WEIGHTS" in msg and "https://" in msg


def test_aesthetic_without_its_head_names_the_head(tiny, tmp_path, monkeypatch):
    clip_file = "open_clip_pytorch_model.bin"
    (tmp_path / clip_file).symlink_to(tiny["dir"] / clip_file)
    monkeypatch.setattr(reward_models, "WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth.*"
                                                r"improved-aesthetic-predictor"):
        reward_models.aesthetic(video(), PROMPTS, arch=TINY)


def test_safetensors_clip_file_is_found_too(tiny, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    save_file(tiny["clip"].state_dict(), tmp_path / "open_clip_model.safetensors")
    v = video(seed=3)
    expected = reward_models.clip_score(v, PROMPTS, arch=TINY)  # from the .bin
    monkeypatch.setattr(reward_models, "WEIGHTS_DIR", str(tmp_path))
    assert torch.equal(reward_models.clip_score(v, PROMPTS, arch=TINY), expected)


def test_a_checkpoint_with_python_objects_still_loads(tiny, tmp_path, monkeypatch):
    """weights_only=True refuses pickled objects (here an argparse.Namespace of training args)."""
    torch.save({"state_dict": tiny["hps"].state_dict(), "args": argparse.Namespace(lr=1e-5)},
               tmp_path / "HPS_v2.1_compressed.pt")
    v = video(seed=4)
    expected = reward_models.hpsv2(v, PROMPTS, arch=TINY)
    monkeypatch.setattr(reward_models, "WEIGHTS_DIR", str(tmp_path))
    assert torch.equal(reward_models.hpsv2(v, PROMPTS, arch=TINY), expected)


def test_registry_and_lazy_imports():
    parsed = parse_rewards(["hpsv2=1", "aesthetic=0.5", "clip_score=0", "dynamic_degree=0.2"], REWARDS)
    assert [(n, w) for n, _, w in parsed] == [("hpsv2", 1.0), ("aesthetic", 0.5),
                                              ("clip_score", 0.0), ("dynamic_degree", 0.2)]
    # every learned reward lists its files (the Qwen2-VL ones live in their own files)
    assert set(reward_models.LEARNED) == set(REWARDS) | set(reward_hpsv3.REWARDS)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import rewards, reward_models, reward_hpsv3; "
            "assert not {'open_clip', 'torchvision', 'transformers'} & set(sys.modules), 'imported eagerly'")
    subprocess.run([sys.executable, "-c", code, ROOT], check=True)
