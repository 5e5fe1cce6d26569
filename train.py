"""
Online forward-process RL (negative-aware fine-tuning, DiffusionNFT) of a distilled
autoregressive video model, as Astrolabe does it (shared/reference/ASTROLABE_METHOD.md §1-5, §8).

One step (DESIGN.md §2):
  1. rollout   K videos per prompt with the `old` LoRA adapter, 4-step AR sampler, no grad
  2. reward    decode, score with every reward, total R = sum_j w_j R_j (gathered over ranks)
  3. advantage A = (R - mean over the prompt's group) / (std over the step + 1e-4) -> r in [0, 1]
  4. update    x_t = (1 - sigma) x0 + sigma eps; three x0 predictions on the same x_t
               (theta with grad, old and ref without); NFT loss + lambda * ||x_theta - x_ref||^2
  5. AdamW step (one per RL step, after accumulating every micro-batch), EMA, reference reset,
     old <- d * old + (1 - d) * theta
Nothing is stored from the sampler's trajectory: only the clean videos (forward-process RL).

Run:   python train.py                                        (tiny model, CPU, minutes)
       python train.py --rewards sharpness=1 examples/my_reward.py:reward=0.5
       torchrun --standalone --nproc_per_node=2 train.py --steps 10
       python train.py --help
Test:  python -m pytest tests/test_train.py -q

Shape legend: B samples, F latent frames, C channels, H, W latent size, Lt/Dt text tokens/dim.
"""
import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------
# Config: one dataclass; presets are named instances of it (python train.py <preset> --flag ...)


@dataclass
class Args:
    # ---- run
    out_dir: str = "out/tiny"
    """where metrics.jsonl, eval videos and checkpoints go"""
    steps: int = 30
    """RL steps (one optimizer step each)"""
    seed: int = 42
    """seed of everything: prompts, rollout noise, training noise and timesteps"""
    ckpt_every: int = 10
    """checkpoint every N steps (0: only at the end)"""
    keep_ckpts: int = 2
    """keep the last N checkpoints"""
    eval_every: int = 10
    """evaluate (fixed prompts and seeds, mp4 + eval/reward_mean) every N steps (0: never)"""
    resume: Optional[str] = None
    """'latest' (newest ckpt_* in out_dir) or a checkpoint folder"""
    track: bool = False
    """log to Weights & Biases (wandb must be installed; off by default)"""
    progress: bool = True
    """rank-0 tqdm bar (off: one print line per step only)"""
    # ---- model
    model: Literal["tiny", "wan-1.3b", "wan-14b"] = "tiny"
    """model size (model.CONFIGS)"""
    ckpt: Optional[str] = "assets/tiny_world.safetensors"
    """base weights: the pre-trained tiny shapes world (tiny_world.py); `--ckpt None` for a random
    init; real presets: the distilled generator (.pt / .safetensors)"""
    lora_rank: int = 16
    """LoRA rank of the adapters (Astrolabe: 256)"""
    lora_alpha: float = 16.0
    """LoRA alpha (scale = alpha / rank; Astrolabe: 256)"""
    ckpt_ema: bool = True
    """from a generator/generator_ema checkpoint (Self-Forcing, Causal Forcing, LongLive) take the
    EMA weights, as Astrolabe does; --no-ckpt-ema: `generator`"""
    lora_init: Optional[str] = None
    """LoRA warm start loaded into every adapter: LongLive's lora.pt or a PEFT folder (rank must be
    --lora-rank)"""
    vae: Optional[str] = None
    """real models: the Wan2.1 VAE, Wan2.1_VAE.pth or a Diffusers folder"""
    text_encoder: Optional[str] = None
    """real models: umT5-XXL, models_t5_umt5-xxl-enc-bf16.pth or a Diffusers folder"""
    tokenizer: Optional[str] = None
    """real models: the umT5 tokenizer folder (default: google/umt5-xxl beside the .pth)"""
    height: int = 32
    """frame height in pixels (the tiny model works in pixel space; Wan latents are 8x smaller)"""
    width: int = 32
    """frame width in pixels"""
    num_frames: int = 12
    """latent frames per video N (a multiple of the block size 3)"""
    window: int = 6
    """latent frames W trained per step (streaming; multiple of 3); 0: the whole video"""
    window_select: Literal["first", "last", "random", "random_choice"] = "random"
    """where the window starts: first (0), last (N - W), random (any block), random_choice
    (from --window-starts; Astrolabe's streaming config); random draws cycle through every start"""
    window_starts: list[int] = field(default_factory=list)
    """window starts (latent frames) for --window-select random_choice, e.g. 0 18 36"""
    group_mode: Literal["shared-prefix", "independent"] = "shared-prefix"
    """shared-prefix: the K videos of a prompt share the history before the window and differ
    only inside it (clip-level group sampling); independent: K unrelated rollouts"""
    local_attn: int = -1
    """rolling KV cache window in latent frames, the reference's local_attn_size (-1: global
    attention; named --local-attn because torchrun would take --local for one of its own flags)"""
    sink: int = 0
    """sink frames of the rolling cache"""
    # ---- rollout and reward
    prompts: list[str] = field(default_factory=list)
    """training prompts (tiny default: tiny_world.PROMPTS, "a red circle moving left", ...)"""
    prompt_file: Optional[str] = None
    """a text file of training prompts, one per line (added to --prompts)"""
    prompts_per_step: int = 8
    """distinct prompts per RL step (global, over all ranks)"""
    group_size: int = 4
    """K: videos per prompt; advantages are relative within a prompt's group"""
    rewards: list[str] = field(default_factory=lambda: ["direction_progress=1", "color_match=1",
                                                        "size_constancy=1"])
    """NAME=WEIGHT ...: registry names (rewards.REWARDS) or path/to/file.py:function"""
    reward_norm: Literal["none", "per-reward"] = "none"
    """none: weighted sum of raw scores (Astrolabe); per-reward: normalise each within its group first"""
    # ---- NFT objective
    beta: float = 0.1
    """NFT mixing beta of the implicit positive/negative policies"""
    adv_clip: float = 5.0
    """advantage clip A_max; r = 0.5 + clip(A)/(2 A_max)"""
    global_std: bool = True
    """advantage std over the whole step (Astrolabe); False: per prompt group"""
    kl_weight: float = 1e-4
    """lambda of the reference term ||x_theta - x_ref||^2"""
    adaptive_weight: bool = False
    """DiffusionNFT's per-sample adaptive loss weighting (Astrolabe: plain MSE)"""
    train_timesteps: Literal["sampler", "raw"] = "sampler"
    """sampler: train at the warped timesteps the rollout used; raw: Astrolabe's [1000,750,500,250]
    with x_t = (1 - t/1000) x0 + t/1000 eps but the grid sigma in the x0 conversion (its quirk)"""
    window_context: Literal["noisy", "clean"] = "clean"
    """clean: each window block attends to the clean blocks before it, as at inference (teacher
    forcing; the tiny world, whose RL drifted and collapsed with noisy context in our runs); noisy:
    to noisy ones (Astrolabe's release; the real presets)"""
    micro_batch: int = 8
    """samples per forward/backward (per rank)"""
    # ---- memory levers (the real presets turn them on)
    bf16: bool = True
    """on CUDA: frozen base and text encoder in bf16 and bf16 autocast (LoRA parameters, optimizer
    and loss math stay float32); --no-bf16: float32 everywhere (CPU is always float32)"""
    grad_checkpointing: bool = False
    """recompute each transformer block in the backward pass: activations of one block instead
    of all of them, for ~1/3 more update time"""
    decode_batch: int = 1
    """real models: videos the VAE decodes at once (its activations at 480x832 are large)"""
    # ---- optimisation
    lr: float = 1e-3
    """AdamW learning rate (the tiny world: 1e-3; at 2e-3 and more it starts to hack the detectors
    after ~15 steps, 1e-2 wrecks it; a random-init tiny model: 3e-2; Astrolabe on 1.3B: 1e-5)"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """gradient-norm clip"""
    old_decay: Literal["linear", "on-policy", "delayed"] = "linear"
    """old-policy update: linear d = min(0.001 step, 0.5) (Astrolabe); on-policy d = 0; delayed
    (DiffusionNFT)"""
    ema: bool = True
    """keep an EMA of theta (decay min((1+n)/(10+n), 0.9)) for eval and export"""
    selective: bool = False
    """uncertainty-aware selective reference term + dynamic reference (needs >= 2 rewards)"""
    # ---- eval
    eval_prompts: int = 4
    """number of fixed eval prompts (evenly spread over the training prompts)"""


def _real(model="wan-1.3b", wan="wan_models/Wan2.1-T2V-1.3B", **kw):
    """A real-model preset: Astrolabe's settings (ASTROLABE_METHOD.md §6: 480x832, 21 latent
    frames, LoRA rank 256 / alpha 256 on every block linear, lr 1e-5, beta 0.1, KL 1e-4) with the
    files where the Self-Forcing / LongLive repos' download instructions put them (README)."""
    base = dict(model=model, vae=f"{wan}/Wan2.1_VAE.pth",
                text_encoder=f"{wan}/models_t5_umt5-xxl-enc-bf16.pth", height=480, width=832,
                num_frames=21, window=0, window_context="noisy", lora_rank=256, lora_alpha=256.0,
                lr=1e-5, rewards=["hpsv2=1"], eval_prompts=2, eval_every=30, ckpt_every=30,
                # one GPU: 2 prompts x 8 videos per step (Astrolabe on 8 GPUs: 16 x 24)
                prompts_per_step=2, group_size=8, micro_batch=1, grad_checkpointing=True)
    return dataclasses.replace(Args(), **{**base, **kw})


_LONGLIVE = dict(ckpt="longlive_models/models/longlive_base.pt", local_attn=12, sink=3, num_frames=42,
                 window=21, window_select="random_choice", window_starts=[21])
PRESETS = {  # python train.py <preset> [--flags]; every field stays overridable
    "tiny": Args(),
    "self-forcing": _real(ckpt="checkpoints/self_forcing_dmd.pt", out_dir="out/self-forcing"),
    "causal-forcing": _real(ckpt="checkpoints/chunkwise/causal_forcing.pt", out_dir="out/causal-forcing"),
    # LongLive: rolling cache (12 frames, 3 sink); Astrolabe's streaming config trains the window
    # [21, 42) after a 21-frame history (window_choices = [21]); -lora: LongLive's LoRA as warm start
    "longlive": _real(out_dir="out/longlive", **_LONGLIVE),
    "longlive-lora": _real(out_dir="out/longlive-lora", lora_init="longlive_models/models/lora.pt", **_LONGLIVE),
    # Krea Realtime 14B: global attention; one 14B model per GPU leaves room for 1 video per pass
    "krea-14b": _real(model="wan-14b", out_dir="out/krea-14b",  # the 1.3B repo's VAE and umT5 files
                      ckpt="checkpoints/krea-realtime-video-14b.safetensors", prompts_per_step=1),
}


def parse_args(argv=None):
    """`train.py [PRESET] [--flags]`: the preset is a named Args default, flags override it."""
    import tyro
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv.pop(0) if argv and not argv[0].startswith("-") else "tiny"
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return tyro.cli(Args, args=argv, default=PRESETS[name],
                    description=__doc__.split("\n\n")[0] + f"\n\nPresets: {', '.join(PRESETS)}")


def seed_of(*parts) -> int:
    """A 63-bit seed from any tuple, e.g. (seed, step, prompt, k): same on every rank and layout."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def prompts_for_step(prompts, n, step, seed):
    """The n prompts of RL step `step`: walk a seeded shuffle of the list, reshuffled every epoch.
    Every prompt comes once per epoch, so the mean reward of an epoch's steps compares across
    epochs (random draws make the per-step mean follow which prompts were drawn, not the policy)."""
    out = []
    for i in range(step * n, (step + 1) * n):
        epoch, k = divmod(i, len(prompts))
        order = random.Random(seed_of(seed, epoch, "prompts")).sample(range(len(prompts)), len(prompts))
        out.append(prompts[order[k]])
    return out


def rss_mb(field_name="VmRSS"):
    """Resident memory of this process (MiB) from /proc (Linux)."""
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) / 1024 for line in f if line.startswith(field_name)), 0.0)


def reset_peak(device):
    """Start a peak-memory measurement; returns the baseline (MiB)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2 ** 20
    if os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (peak RSS) to the current RSS
            f.write("5")
    return rss_mb()


def peak_growth(device, base):
    """Peak memory since reset_peak, above its baseline (MiB): allocated on GPU, RSS on CPU."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20 - base
    return rss_mb("VmHWM") - base


# ----------------------------------------------------------------------------------------------
# Pieces of one step (module level, so bench.py and the tests can call them)

def latent_hw(args):
    """(H, W) of the model's input: pixels for the tiny pixel-space model, VAE latents (8x smaller)
    for Wan."""
    return (args.height, args.width) if args.model == "tiny" else (args.height // 8, args.width // 8)


def build_model(args, device="cpu", dtype=torch.float32, cfg=None):
    """The frozen base (--ckpt; a random init for tiny without one) with the LoRA adapters
    `default` (trained), `old` (rollouts), `ref` (+ `ema`), all equal at the start: LoRA B = 0, or
    --lora-init in every one. cfg overrides model.CONFIGS[args.model] (tests: tiny sizes through
    a real preset's loading path)."""
    from model import CONFIGS, CausalWanModel, load_adapter_file, load_checkpoint
    cfg = cfg or CONFIGS[args.model]
    torch.manual_seed(args.seed)  # the only use of the global RNG: initial weights and adapters
    if args.ckpt:
        with torch.device("meta"):  # no random init: the file's tensors are assigned (a 14B model
            model = CausalWanModel(cfg)  # is never held twice in RAM)
        load_checkpoint(model, args.ckpt, ema=args.ckpt_ema)
    elif args.model == "tiny":
        model = CausalWanModel(cfg)
        torch.nn.init.normal_(model.head.head.weight, std=0.02)  # random but not all-zero videos
    else:
        raise SystemExit(f"--model {args.model} needs --ckpt (the distilled generator; README, Real models)")
    model.to(device, dtype).requires_grad_(False)  # frozen base: bf16 on GPU
    model.add_adapter("default", args.lora_rank, args.lora_alpha)  # adapters stay float32
    if args.lora_init:
        load_adapter_file(model, "default", args.lora_init)
    model.to(device)
    for name in ["old", "ref"] + (["ema"] if args.ema else []):
        model.copy_adapter("default", name)
    if args.grad_checkpointing:
        model.grad_checkpointing = True
    return model


def frozen_parts(args, prompts, device):
    """embed(prompts) -> (B, Lt, Dt) text embeddings and decode(latents) -> videos in [0, 1].

    tiny: the toy word embeddings, and latents are already pixels. Real models: umT5 embeds every
    prompt once (on the GPU, then it is freed before the DiT loads) and the Wan VAE decodes
    --decode-batch videos at a time."""
    from sample import to_pixels, toy_text_embed
    if args.model == "tiny":
        from model import CONFIGS
        cfg = CONFIGS["tiny"]
        return (lambda ps: toy_text_embed(ps, cfg.text_len, cfg.text_dim).to(device)), to_pixels
    missing = [f"--{f.replace('_', '-')}" for f in ("vae", "text_encoder") if not getattr(args, f)]
    if missing:
        raise SystemExit(f"--model {args.model} needs {' and '.join(missing)} (README, Real models)")
    from frozen import TextEncoder, WanVAE
    half = torch.bfloat16 if "cuda" in str(device) and args.bf16 else torch.float32
    te = TextEncoder.load(args.text_encoder, args.tokenizer, device=device, dtype=half)
    table = {}
    for i in range(0, len(prompts), 8):  # rows are [512, 4096] each: keep them on the CPU
        table.update(zip(prompts[i:i + 8], te(prompts[i:i + 8]).to("cpu", half)))
    del te
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    vae = WanVAE.load(args.vae, device=device)  # float32, as diffusers recommends for this VAE

    def decode(lat):  # (B, F, 16, h, w) -> (B, 1 + 4 (F - 1), 3, 8h, 8w) in [0, 1]
        b = args.decode_batch
        return torch.cat([to_pixels(vae.decode(lat[i:i + b].float())) for i in range(0, len(lat), b)])
    return (lambda ps: torch.stack([table[p] for p in ps]).to(device)), decode


def predict_x0(model, adapter, x_t, t, sigma_t, ctx, args, x0_clean=None, start=0, history=None):
    """x0 prediction of one adapter: x0 = x_t - sigma * v(x_t, t). (B, F, C, H, W)

    The window [start, start + F) attends to `history` (the detached rollout cache at `start`,
    sink + recent frames, so its size never depends on start) and block-causally to itself.
    """
    with model.adapter(adapter):
        v = model(x_t, t, ctx, local=args.local_attn, sink=args.sink, start_frame=start, history=history,
                  clean_x=x0_clean if args.window_context == "clean" else None)
    return x_t - sigma_t.view(-1, 1, 1, 1, 1) * v.float()


def training_noise(args, x0, step, j0):
    """One timestep per micro-batch and fresh noise per sample, all from (seed, step, sample)."""
    from sample import sampler_timesteps, sigma_of
    g = torch.Generator().manual_seed(seed_of(args.seed, step, "t", j0))
    if args.train_timesteps == "sampler":
        ts, sig = sampler_timesteps()
        i = torch.randint(len(ts), (1,), generator=g).item()
        t, s_noise = ts[i], sig[i]
        s_x0 = s_noise  # the same sigma for noising and the x0 conversion
    else:  # Astrolabe: raw t, noised with t/1000 but converted back with the nearest grid sigma
        raw = torch.tensor([1000.0, 750.0, 500.0, 250.0])
        t = raw[torch.randint(4, (1,), generator=g).item()]
        s_noise, s_x0 = t / 1000, sigma_of(t)[0]
    eps = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(
        seed_of(args.seed, step, "eps", j0 + i))) for i in range(len(x0))]).to(x0)
    x_t = (1 - s_noise) * x0 + s_noise * eps  # forward process on the clean rollout
    B, F = x0.shape[:2]
    return x_t, torch.full((B, F), float(t), device=x0.device), s_x0.expand(B).to(x0.device)


def new_cache(model, batch, args, dtype, device):
    from kvcache import KVCache
    return KVCache.for_model(model.cfg, batch, args.num_frames, latent_hw(args), args.sink,
                             args.local_attn, dtype, device)


@torch.no_grad()
def rollout(model, ctx, seeds, frames, args, adapter="old", cache=None, start=0, keep=True):
    """`frames` latent frames per seed with `adapter`, no grad, continuing `cache` (a new one if
    None) from frame `start`. Returns (B, frames, C, H, W) clean latents (None if keep=False)."""
    from sample import GeneratorNoise, generate, make_generators
    dtype, dev = next(model.parameters()).dtype, ctx.device
    cache = new_cache(model, len(seeds), args, dtype, dev) if cache is None else cache
    noise = GeneratorNoise(make_generators(seeds), (model.cfg.in_dim, *latent_hw(args)), dev, dtype)
    with model.adapter(adapter):
        lat = generate(model, ctx.to(dtype), cache, frames, noise, start_frame=start, keep=keep)
    return None if lat is None else lat.float()


def window_start(args, step):
    """Block-aligned start s of this step's window, the same on every rank. random / random_choice
    draw without replacement: each cycle of steps visits every start once in a seeded order, so a
    stretch of steps is not skewed toward one start (the reward differs a lot between windows)."""
    W = args.window or args.num_frames
    starts = {"first": [0], "last": [args.num_frames - W], "random": list(range(0, args.num_frames - W + 1, 3)),
              "random_choice": args.window_starts or [0]}[args.window_select]
    cycle, i = divmod(step, len(starts))
    return random.Random(seed_of(args.seed, cycle, "window")).sample(starts, len(starts))[i]


@torch.no_grad()
def group_rollout(model, ctx, js, K, step, s, args):
    """The window [s, s + W) of every sample j in js (prompt j // K, candidate j % K), after a
    history [0, s) generated once per prompt (shared-prefix: the K candidates branch from one
    cache snapshot) or once per sample (independent). Returns the window latents
    (n, W, C, H, W) and history(rows) -> a stacked copy of those rows' caches at s (None if s = 0).
    Each history is a cache snapshot: sink + recent frames, so its size never depends on s.
    """
    W, dtype = args.window or args.num_frames, next(model.parameters()).dtype
    shared = args.group_mode == "shared-prefix"
    key = (lambda j: j // K) if shared else (lambda j: j)  # noqa: E731
    hist = {}
    for i, j in enumerate(js):
        if key(j) not in hist:
            hist[key(j)] = new_cache(model, 1, args, dtype, ctx.device)
            if s:  # noise of the prefix from (seed, step, prompt): the same on every rank
                prefix_seed = seed_of(args.seed, step, j // K) if shared else \
                    seed_of(args.seed, step, j // K, j % K, "prefix")
                rollout(model, ctx[i][None], [prefix_seed], s, args, cache=hist[key(j)], keep=False)

    def history(rows):
        from kvcache import KVCache
        return KVCache.stack([hist[key(j)] for j in rows]) if s else None
    m = args.micro_batch
    lat = torch.cat([rollout(model, ctx[i:i + m], [seed_of(args.seed, step, j // K, j % K) for j in js[i:i + m]],
                             W, args, cache=history(js[i:i + m]), start=s)  # branches from a copy
                     for i in range(0, len(js), m)])
    return lat, history


# ----------------------------------------------------------------------------------------------
# Checkpoints: tensors in safetensors, everything else in JSON; written to a temp folder, renamed

def save_ckpt(path, model, opt, state):
    from safetensors.torch import save_file
    from model import save_adapter
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ad = {f"{n}/{k}": v.cpu().contiguous() for n in model.adapters() for k, v in model.adapter_state_dict(n).items()}
    save_file(ad, os.path.join(tmp, "adapters.safetensors"))
    sd = opt.state_dict()
    save_file({f"{i}.{k}": v.cpu().contiguous() for i, s in sd["state"].items() for k, v in s.items()},
              os.path.join(tmp, "optim.safetensors"))
    state = dict(state, param_groups=sd["param_groups"])
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f, indent=1)
    # the policy to use for sampling / export, in PEFT layout (EMA if kept, as Astrolabe saves)
    save_adapter(model, "ema" if "ema" in model.adapters() else "default", os.path.join(tmp, "lora"))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_ckpt(path, model, opt):
    from safetensors.torch import load_file
    ad = load_file(os.path.join(path, "adapters.safetensors"))
    for n in model.adapters():
        model.load_adapter(n, {k[len(n) + 1:]: v for k, v in ad.items() if k.startswith(n + "/")})
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    flat = load_file(os.path.join(path, "optim.safetensors"))
    osd = {"state": {}, "param_groups": state.pop("param_groups")}
    for k, v in flat.items():
        i, name = k.split(".", 1)
        osd["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(osd)
    return state


def find_ckpt(out_dir, resume):
    if resume != "latest":
        if not os.path.isfile(os.path.join(resume, "state.json")):
            raise SystemExit(f"--resume {resume}: not a checkpoint folder (no state.json)")
        return resume
    found = sorted(glob.glob(os.path.join(out_dir, "ckpt_[0-9]*[0-9]")))
    return found[-1] if found else None


# ----------------------------------------------------------------------------------------------

def main(args: Args):
    import nft_loss as nft
    import tiny_world
    from rewards import MultiReward
    from sample import find_file, missing_files, save_curve, save_strip, save_video
    from tqdm import tqdm

    # ---- distributed setup: plain `python train.py` is one process; torchrun sets RANK etc.
    ddp = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"
    else:
        rank, world, device = 0, 1, "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    master = rank == 0
    torch.set_flush_denormal(True)  # CPU: denormal softmax tails make attention ~3x slower
    log = print if master else (lambda *a, **k: None)

    # ---- the batch layout must be the same whatever the world size
    N, K = args.prompts_per_step * args.group_size, args.group_size
    if N % world or (N // world) % args.micro_batch:
        raise SystemExit(f"prompts_per_step x group_size = {N} samples must split evenly over "
                         f"{world} ranks and then into micro-batches of {args.micro_batch}; change "
                         f"--prompts-per-step, --group-size or --micro-batch")
    n_local = N // world
    W = args.window or args.num_frames
    if args.num_frames % 3 or W % 3 or W > args.num_frames:
        raise SystemExit(f"--num-frames {args.num_frames} and --window {W} must be multiples of the "
                         f"block size 3, with the window inside the video")
    bad = [x for x in args.window_starts if x % 3 or not 0 <= x <= args.num_frames - W]
    if bad or (args.window_select == "random_choice" and not args.window_starts):
        raise SystemExit(f"--window-starts {args.window_starts}: give block-aligned starts in "
                         f"[0, {args.num_frames - W}] for --window-select random_choice")

    # ---- every input file up front: one message listing what is missing, before anything loads;
    # then each path as found (relative to the cwd, else to this repository: `assets/...` anywhere)
    files = ("ckpt", "lora_init", "vae", "text_encoder", "tokenizer", "prompt_file")
    missing = missing_files(args, files)
    if missing:
        raise SystemExit("not found:\n" + "\n".join("  " + m for m in missing) + "\n(download list and "
                         "default paths: README, Real models; or point the flags at your copies)")
    args = dataclasses.replace(args, **{f: find_file(p) for f in files if (p := getattr(args, f))})

    # ---- prompts; text embeddings first (umT5 leaves the GPU before the DiT arrives), rewards
    prompts = list(args.prompts)
    if args.prompt_file:
        with open(args.prompt_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts and args.model != "tiny":
        raise SystemExit(f"--model {args.model}: give training prompts with --prompt-file or --prompts")
    prompts = prompts or tiny_world.PROMPTS
    embed, decode = frozen_parts(args, prompts, device)
    multi = MultiReward(args.rewards)
    names = multi.names
    if args.selective and len(names) < 2:
        raise SystemExit("--selective needs at least two rewards (the first is the main one)")

    # ---- model: frozen base + LoRA adapters default (trained), old (rollout), ref, ema
    bf16 = cuda and args.bf16
    dtype = torch.bfloat16 if bf16 else torch.float32  # frozen base in bf16 on GPU
    model = build_model(args, device, dtype)
    if args.model == "tiny" and not args.ckpt:
        log("no base checkpoint: RL starts from a randomly initialised tiny model")
    params = model.adapter_params("default")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay, eps=1e-8)
    # bf16 matmuls, float32 LoRA parameters, optimizer state and loss math (x0 and the loss are .float())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
    compensator, dynref = nft.RiskCompensator(), nft.DynamicReference()

    # ---- resume
    start, bad_steps = 0, 0
    os.makedirs(args.out_dir, exist_ok=True)
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    path = find_ckpt(args.out_dir, args.resume) if args.resume else None
    if path:
        state = load_ckpt(path, model, opt)
        start, bad_steps = state["step"], state["bad_steps"]
        compensator.load_state_dict(state["compensator"])
        dynref.load_state_dict(state["dynref"])
        log(f"resumed from {path} at step {start}")
        if master and os.path.exists(metrics_path):  # drop rows a crashed run wrote after the ckpt
            rows = [r for r in open(metrics_path) if json.loads(r)["step"] <= start]
            open(metrics_path, "w").writelines(rows)
    elif master and os.path.exists(metrics_path):
        os.remove(metrics_path)
    wandb = None
    if args.track and master:
        import wandb
        wandb.init(project="astrolabe", config=dataclasses.asdict(args), dir=args.out_dir)
    log(f"{world} rank(s) on {device} ({dtype}); global batch {args.prompts_per_step} prompts x {K} videos "
        f"= {N} per step, micro-batch {args.micro_batch} per rank; rewards {args.rewards}")
    log(f"memory levers: bf16 {bf16}, grad checkpointing {args.grad_checkpointing}, window "
        f"{W} of {args.num_frames} frames, cache {'global' if args.local_attn < 0 else args.local_attn} "
        f"(sink {args.sink}), decode batch {args.decode_batch}")

    def gather(x):  # (n_local, ...) -> (N, ...) in global sample order
        if world == 1:
            return x
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    def write_row(row):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if wandb:
                wandb.log(row, step=row["step"])

    eval_p = prompts[::max(1, len(prompts) // args.eval_prompts)][:args.eval_prompts]  # spread out
    policy = "ema" if args.ema else "default"

    def eval_videos(adapter):  # fixed prompts and seeds, the whole video: (E, F, 3, H, W)
        seeds = [seed_of(args.seed, "eval", i) for i in range(len(eval_p))]
        return decode(rollout(model, embed(eval_p), seeds, args.num_frames, args, adapter))

    def evaluate(n):
        """The EMA (or current) policy on the eval prompts: mp4 + reward; returns the videos."""
        videos = eval_videos(policy)
        total, per = multi(videos, eval_p)
        save_video(os.path.join(args.out_dir, "eval", f"step_{n:06d}.mp4"),
                   torch.cat(list(videos), dim=-1))  # the eval prompts side by side
        row = {"step": n, "eval/reward_mean": total.mean().item(),
               **{f"eval/rewards/{k}/mean": v.mean().item() for k, v in per.items()}}
        write_row(row)
        log(f"eval step {n}: reward {row['eval/reward_mean']:.4f}")
        return videos

    after = None  # the final policy's eval videos, once the last step has been evaluated
    if master and args.eval_every and start == 0:
        evaluate(0)  # the "before" picture
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not (master and args.progress),
               dynamic_ncols=True, desc="RL")
    for step in bar:
        t0, mem0 = time.time(), reset_peak(device)
        # ------------------------------------------------------------------ 1. rollout (old)
        step_prompts = prompts_for_step(prompts, args.prompts_per_step, step, args.seed)
        js = range(rank * n_local, (rank + 1) * n_local)  # this rank's global sample indices
        my_prompts = [step_prompts[j // K] for j in js]
        ctx = embed(my_prompts)  # (n_local, Lt, Dt)
        model.eval()
        s = window_start(args, step)
        lat, history = group_rollout(model, ctx, js, K, step, s, args)  # (n_local, W, C, H, W)
        t_roll = time.time() - t0
        # ------------------------------------------------------------------ 2. reward
        total, per = multi(decode(lat), my_prompts)  # scores see pixels in [0, 1]
        scores = gather(torch.stack([total] + [per[k] for k in names], 1).to(device))  # (N, 1 + J)
        groups = torch.arange(N, device=device) // K
        # ------------------------------------------------------------------ 3. advantage -> r
        R = scores[:, 0] if args.reward_norm == "none" else \
            sum(w * nft.group_normalize(scores[:, 1 + i], groups) for i, w in enumerate(multi.weights))
        adv = nft.group_advantages(R, groups, global_std=args.global_std)
        r = nft.optimality_prob(adv, args.adv_clip)  # (N,)
        if args.selective:  # where the rewards disagree, keep theta close to the reference
            u = nft.uncertainty(scores[:, 1], [scores[:, 2 + i] for i in range(len(names) - 1)])
            mask = nft.selective_mask(u, compensator.update(u))  # rho adapts to this step's u
        else:
            mask = torch.ones(N, dtype=torch.bool, device=device)
        # ------------------------------------------------------------------ 4. NFT update
        model.train()
        t1, n_micro = time.time(), n_local // args.micro_batch
        stats = torch.zeros(5, device=device)  # loss, kl (masked), kl (all), non-finite flag, count
        for mb in range(n_micro):
            sl = slice(mb * args.micro_batch, (mb + 1) * args.micro_batch)
            j0 = js[0] + mb * args.micro_batch
            x0, c, gsl = lat[sl], ctx[sl], slice(j0, j0 + args.micro_batch)
            x_t, t, sig = training_noise(args, x0, step, j0)
            h = history(js[sl])  # the detached context before the window (None for s = 0)
            with autocast:
                with torch.no_grad():  # old and ref predictions on the same x_t
                    x_old = predict_x0(model, "old", x_t, t, sig, c, args, x0, s, h)
                    x_ref = predict_x0(model, "ref" if args.selective else None, x_t, t, sig, c, args, x0, s, h)
                x_th = predict_x0(model, "default", x_t, t, sig, c, args, x0, s, h)
            loss_pol, _ = nft.nft_policy_loss(x_th, x_old, x0, r[gsl], args.beta, args.adaptive_weight)
            loss_ref = nft.ref_loss(x_th, x_ref, mask[gsl])
            # L = L_NFT + lambda_KL * mean_{b in mask} ||x_theta - x_ref||^2
            loss = loss_pol + args.kl_weight * loss_ref
            if torch.isfinite(loss):
                (loss / n_micro).backward()  # accumulate; one optimizer step per RL step
            stats += torch.stack([loss.detach(), loss_ref.detach(), nft.ref_loss(x_th.detach(), x_ref),
                                  (~torch.isfinite(loss)).float(), torch.ones((), device=device)])
        if world > 1:  # one all-reduce per step: grads (averaged) and the stats (summed)
            flat = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten()
                              for p in params] + [stats])
            dist.all_reduce(flat)
            i = 0
            for p in params:
                p.grad = flat[i:i + p.numel()].view_as(p) / world
                i += p.numel()
            stats = flat[i:]
        loss_m, kl_m, kl_all = (stats[:3] / stats[4]).tolist()  # means over micro-batches and ranks
        bad = stats[3].item() > 0
        # ------------------------------------------------------------------ 5. optimizer, EMA, ref, old
        if bad:  # a non-finite loss anywhere: skip the whole step on every rank
            opt.zero_grad(set_to_none=True)
            bad_steps += 1
            log(f"step {step + 1}: non-finite loss, step skipped ({bad_steps} in a row)")
            if bad_steps >= 3:
                raise SystemExit("3 steps in a row had a non-finite loss; lower --lr or check the rewards")
            grad_norm = float("nan")
        else:
            bad_steps = 0
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if args.ema:
                model.lerp_adapter("ema", "default", nft.ema_decay(step))
            if args.selective and dynref.step(kl_m):  # the reference drifted too far / too long
                model.copy_adapter("default", "ref")
            # theta_old <- d theta_old + (1 - d) theta, d from the step count after this update
            model.lerp_adapter("old", "default", nft.old_decay(step + 1, args.old_decay))
        # ------------------------------------------------------------------ 6. log, eval, ckpt
        n = step + 1
        row = {"step": n, "reward_mean": scores[:, 0].mean().item(), "reward_std": scores[:, 0].std().item(),
               **{f"rewards/{k}/mean": scores[:, 1 + i].mean().item() for i, k in enumerate(names)},
               "window_start": s, "r_mean": r.mean().item(), "loss": loss_m, "kl": kl_m, "kl_all": kl_all,
               "mask_frac": mask.float().mean().item(),
               "grad_norm": grad_norm, "lr": opt.param_groups[0]["lr"], "skipped": bad,
               "time/rollout_s": t_roll, "time/update_s": time.time() - t1, "time/step_s": time.time() - t0,
               "mem/peak_mb": peak_growth(device, mem0)}
        write_row(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.4f}", loss=f"{loss_m:.4f}", kl=f"{kl_m:.2e}")
        msg = (f"step {n}/{args.steps} | reward {row['reward_mean']:.4f} | loss {loss_m:.5f} | kl {kl_m:.2e} "
               f"| r {row['r_mean']:.3f} | grad {grad_norm:.2e} | {row['time/step_s']:.1f}s")
        (bar.write if master and args.progress else log)(msg)
        if master and args.eval_every and (n % args.eval_every == 0 or n == args.steps):
            after = evaluate(n)  # at n == args.steps: the end-of-run "after", not sampled again
        if (args.ckpt_every and n % args.ckpt_every == 0) or n == args.steps:
            if master:
                save_ckpt(os.path.join(args.out_dir, f"ckpt_{n:06d}"), model, opt,
                          {"step": n, "bad_steps": bad_steps, "args": dataclasses.asdict(args),
                           "compensator": compensator.state_dict(), "dynref": dynref.state_dict()})
                for old in sorted(glob.glob(os.path.join(args.out_dir, "ckpt_[0-9]*[0-9]")))[:-args.keep_ckpts]:
                    shutil.rmtree(old)
            if ddp:
                dist.barrier()
    bar.close()
    if master:  # what RL changed, for people: before/after videos and frames, the reward curve
        before = eval_videos(None)  # None = adapters off = the base
        after = eval_videos(policy) if after is None else after
        out = lambda name: os.path.join(args.out_dir, name)  # noqa: E731
        save_video(out("before_after.mp4"), torch.cat([torch.cat(list(before), -1), torch.cat(list(after), -1)], -2))
        save_strip(out("before_after.png"), [v for pair in zip(before, after) for v in pair])
        with open(metrics_path) as f:
            rs = [json.loads(line) for line in f]
        series = {k: ([r["step"] for r in rs if k in r], [r[k] for r in rs if k in r])
                  for k in ("reward_mean", "eval/reward_mean")}
        save_curve(out("reward_curve.png"), {k: v for k, v in series.items() if v[0]},
                   title=f"reward: {' + '.join(args.rewards)}")
        log(f"wrote {out('before_after.mp4')}, {out('before_after.png')}, {out('reward_curve.png')}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
