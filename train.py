"""
Online forward-process RL of a distilled autoregressive video model, as Astrolabe does it
(arXiv 2603.17051): negative-aware fine-tuning (NFT, from DiffusionNFT, arXiv 2509.16117) on the
model's own clean videos. main() runs one RL step as five numbered blocks:

  1. rollout    K videos per prompt with the rollout policy θ_old, 4-step AR sampler, no grad;
                streaming: the history [0, s) once per prompt, then K windows [s, s + T) from its KV cache
  2. reward     decode, score with every reward j; R = Σ_j w_j R_j
  3. advantage  A = (R - mean of the prompt's group) / (std + 1e-4);  r = 1/2 + clip(A)/(2 A_max) in [0, 1]
  4. update     x_t = (1 - σ) x0 + σ ε;  x̂_θ (with grad), x̂_old, x̂_ref (without) on the same x_t;
                L = r ||x̂⁺ - x0||² + (1 - r) ||x̂⁻ - x0||² + λ ||x̂_θ - x̂_ref||²   (nft_loss.py)
  5. after      one AdamW step; EMA of θ; reference reset (--selective); θ_old <- d θ_old + (1 - d) θ
Nothing of the sampler's trajectory is kept, only the clean videos: forward-process RL.

Run:   python train.py                                        (tiny shapes world, CPU, minutes)
       python train.py --rewards sharpness=1 examples/my_reward.py:reward=0.5
       torchrun --standalone --nproc_per_node=2 train.py --steps 10
       python train.py self-forcing --prompt-file prompts.txt  (a real model: README)
Test:  python -m pytest tests/test_rl_works.py tests/test_train.py tests/test_streaming.py -q

Shape legend: N samples of the step (all ranks), n of this rank, m of a micro-batch, G prompts, K
videos per prompt, F latent frames of a video, T window frames, s window start, C channels, H, W
latent (tiny: pixel) height and width, Lt, Dt text tokens and width.
"""
import dataclasses
import gc
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

import checks
import nft_loss as nft
import reward_hpsv3
import reward_models
import reward_videoalign
import tiny_world
from checkpoints import load_base, load_lora_init, resume_run, save_run
from common import (NonFiniteGuard, StepClock, all_reduce_step, gather, init_distributed,
                    memory_in_use, run_cli, seed_of, use_bf16)
from evaluation import RunLog, evaluate, pick_eval_prompts, save_before_after
from frozen import FrozenParts
from lora import add_adapter, adapter_params, copy_adapter, lerp_adapter, use_adapter
from rewards import REWARDS, MultiReward, RewardError
from sample import sampler_timesteps, sigma_of
from streaming import prompts_for_step, rollout_histories, rollout_windows, window_start

# every reward --rewards can name: weight-free (rewards.py), learned (open_clip / RAFT; the Qwen2-VL ones,
# HPSv3 and VideoAlign, each in its own file), the shapes world's detectors
REGISTRY = {**REWARDS, **reward_models.REWARDS, **reward_hpsv3.REWARDS, **reward_videoalign.REWARDS, **tiny_world.REWARDS}


# ----------------------------------------------------------------------------------------------
# Config: one dataclass; presets are named instances of it (python train.py <preset> --flag ...)

@dataclass
class Released:
    """Where the released code (franklinz233/Astrolabe) behaves otherwise than our default, its
    behaviour, for reproduction runs: --released.<flag>, or all at once with --exact-reference
    (README, "Differences from the released code"; docs/method.md)."""
    train_mask: Literal["block", "frame"] = "block"
    """training attention blocks: block (the sampler's 3 frames) or frame (frame-causal, as the release
    trains: its block size never reaches the PEFT-wrapped model)"""
    train_sink: bool = True
    """the training mask keeps the rolling cache's sink, as the rollout sees it (no-: the release's)"""
    train_timesteps: Literal["sampler", "raw"] = "sampler"
    """sampler: the warped timesteps the rollout used; raw: [1000, 750, 500, 250], noised with t/1000
    but converted to x0 with the grid sigma (the release's quirk)"""
    uncertainty_sign: Literal["paper", "released"] = "paper"
    """selective mode: paper u = mean rank_aux - rank_main (main reward likes it, the others do not:
    suspected hacking); released u = rank_main - mean rank_aux (GARDO's and Astrolabe's code)"""
    aux_rewards: int = 0
    """selective mode: the first N other rewards are the auxiliaries (0: all; the release: 2)"""
    rank_ties: Literal["average", "ordinal"] = "average"
    """selective mode: ties share their mean rank, or ordinal ranks (the release's unstable sort)"""
    ref_thres_cap: float = 0.5
    """dynamic reference: thres <- min(thres + 0.01, cap) on fast resets; the release's 0.05 pins it
    below its 0.15 start (a likely typo for 0.5)"""
    ema_start: Literal["sync", "base"] = "sync"
    """sync: the EMA becomes theta at step 1, then averages (the release); base: it starts at theta_0"""
    prompt_draw: Literal["epoch-walk", "released"] = "epoch-walk"
    """epoch-walk: each prompt once per epoch, seeded shuffle; released: randperm(seed + step)[:G] (its
    8-GPU layout: --prompts-per-step 1 --group-size 384)"""
    reward_frames: int = 8
    """frames per video the learned image rewards score, evenly spaced (0: all, as released)"""
    videoalign_load: Literal["full", "released"] = "full"
    """VideoAlign's checkpoint: full (every key, its LoRA applied); released (the release's loader drops the
    language model's keys, so the LoRA never applies: astrolabe/reward_models/videoalign/utils.py:191-202)"""


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
    """keep the newest N checkpoints (N >= 1; the final one is always among them)"""
    eval_every: int = 10
    """evaluate (fixed prompts and seeds, mp4 + eval/reward_mean) every N steps (0: never)"""
    eval_prompts: int = 4
    """number of fixed eval prompts (chosen from the training prompts to cover as many words as possible)"""
    resume: Optional[str] = None
    """'latest' (newest ckpt_* in out_dir) or a checkpoint folder"""
    overwrite: bool = False
    """start afresh in an --out-dir that holds another run, deleting its outputs (refused while the
    folder also holds files this project did not write)"""
    ignore_memory_check: bool = False
    """go on when memory.py's predicted peak exceeds the memory this process can have (else: stop)"""
    track: bool = False
    """log to Weights & Biases (wandb must be installed; off by default)"""
    progress: bool = True
    """rank-0 tqdm bar (off: one print line per step only)"""
    threads: int = 0
    """CPU threads per process (0: the cores this process may use / processes on this machine)"""
    # ---- model and files
    model: Literal["tiny", "wan-1.3b", "wan-14b"] = "tiny"
    """model size (model.CONFIGS)"""
    ckpt: Optional[str] = "assets/tiny_world.safetensors"
    """base weights: the tiny shapes world (`--ckpt None`: random); real presets: the distilled generator"""
    ckpt_ema: bool = True
    """from a generator / generator_ema checkpoint take the EMA weights, as Astrolabe does"""
    lora_rank: int = 16
    """LoRA rank of the adapters (Astrolabe: 256)"""
    lora_alpha: float = 16.0
    """LoRA alpha (scale = alpha / rank; Astrolabe: 256)"""
    lora_init: Optional[str] = None
    """LoRA warm start in every adapter: LongLive's lora.pt or a PEFT folder (of rank --lora-rank)"""
    vae: Optional[str] = None
    """real models: the Wan2.1 VAE, Wan2.1_VAE.pth or a Diffusers folder"""
    text_encoder: Optional[str] = None
    """real models: umT5-XXL, models_t5_umt5-xxl-enc-bf16.pth or a Diffusers folder"""
    tokenizer: Optional[str] = None
    """real models: the umT5 tokenizer folder (default: google/umt5-xxl beside the .pth)"""
    # ---- videos, streaming window and KV cache
    height: int = 32
    """frame height in pixels (the tiny model works in pixel space; Wan latents are 8x smaller)"""
    width: int = 32
    """frame width in pixels"""
    num_frames: int = 12
    """latent frames per video F (a multiple of the block size 3)"""
    window: int = 6
    """latent frames T trained per step (streaming; multiple of 3); 0: the whole video"""
    window_select: Literal["first", "last", "random", "random_choice"] = "random"
    """window start: first (0), last (F - T), random (any block, cycling), random_choice (--window-starts)"""
    window_starts: list[int] = field(default_factory=list)
    """window starts (latent frames) for --window-select random_choice, e.g. 0 18 36"""
    window_context: Literal["noisy", "clean"] = "clean"
    """clean: a window block attends to the clean blocks before it, as at inference (teacher forcing;
    the tiny world collapsed with noisy context in our runs); noisy: to noisy ones (the release)"""
    group_mode: Literal["shared-prefix", "independent"] = "shared-prefix"
    """shared-prefix: a prompt's K videos share the history before the window (clip-level groups)"""
    local_attn: int = -1
    """rolling KV cache window in latent frames (-1: global attention; the release's local_attn_size)"""
    sink: int = 0
    """sink frames of the rolling cache"""
    # ---- prompts and rewards
    prompts: list[str] = field(default_factory=list)
    """training prompts (tiny default: tiny_world.PROMPTS, "a red circle moving left", ...)"""
    prompt_file: Optional[str] = None
    """a text file of training prompts, one per line (added to --prompts)"""
    prompts_per_step: int = 8
    """G: distinct prompts per RL step (global, over all ranks)"""
    group_size: int = 4
    """K: videos per prompt; advantages are relative within a prompt's group"""
    rewards: list[str] = field(default_factory=lambda: ["shape_match=1", "color_match=1"])
    """NAME=WEIGHT ...: registry names (rewards, reward_models, tiny_world REWARDS) or path/to/file.py:function"""
    reward_norm: Literal["none", "per-reward"] = "none"
    """none: weighted sum of raw scores (Astrolabe); per-reward: z-score each in its group (DanceGRPO)"""
    # ---- the NFT objective
    objective: Literal["nft", "positive-only"] = "nft"
    """nft: r ||x+ - x0||^2 + (1 - r) ||x- - x0||^2; positive-only: the first term alone (an ablation)"""
    beta: float = 0.1
    """NFT mixing beta of the implicit positive/negative policies"""
    adv_clip: float = 5.0
    """advantage clip A_max; r = 0.5 + clip(A)/(2 A_max)"""
    global_std: bool = False
    """advantage std over the whole step (the release; real presets); default: each prompt's group's"""
    adaptive_weight: bool = False
    """DiffusionNFT's per-sample adaptive loss weighting (Astrolabe: plain MSE)"""
    kl_weight: float = 1e-4
    """lambda of the reference term ||x_theta - x_ref||^2 (logged as "kl": an L2 in x0 space)"""
    selective: bool = False
    """uncertainty-aware selective reference term + dynamic reference (needs >= 2 rewards)"""
    old_decay: Literal["linear", "on-policy", "delayed"] = "linear"
    """theta_old update: linear d = min(0.001 step, 0.5) (Astrolabe); on-policy d = 0; delayed (DiffusionNFT)"""
    ema: bool = True
    """keep an EMA of theta (decay min((1+n)/(10+n), 0.9)) for eval and export"""
    # ---- optimisation
    lr: float = 1e-3
    """AdamW learning rate (tiny world: 1e-3, it hacks the detectors from 2e-3; Astrolabe on 1.3B: 1e-5)"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """gradient-norm clip"""
    micro_batch: int = 8
    """m: samples per forward/backward (per rank)"""
    rollout_batch: int = 32
    """videos per sampler call in the rollout and eval (0: --micro-batch); more is faster, each
    costs a KV cache (the real presets: 1)"""
    # ---- memory levers (the real presets turn them on)
    bf16: Literal["auto", "on", "off"] = "auto"
    """on: frozen base and text encoder in bf16 and bf16 autocast, on any device (LoRA parameters,
    optimizer state and loss math stay float32); off: float32 everywhere; auto: on with CUDA, off on
    a CPU (most CPUs emulate bf16 matmuls, slower than float32)"""
    grad_checkpointing: bool = False
    """recompute each transformer block in the backward pass: activations of one block instead of
    all of them, for ~1/3 more update time"""
    decode_batch: int = 1
    """real models: videos the VAE decodes at once (its activations at 480x832 are large)"""
    vae_tile: int = 0
    """real models: the VAE decodes tiles of N x N pixels overlapping by N/4, seams blended (diffusers'
    tiled decode; at 480x832, N = 160: 2.1 GB instead of 8.3, memory.vae_decode_bytes); 0: whole frames"""
    # ---- replication of the released code
    exact_reference: bool = False
    """every released-code behaviour at once: all of --released.* plus the noisy window context and the
    step-wide advantage std (RELEASED below); overrides those flags"""
    released: Released = field(default_factory=Released)
    """the released code's behaviours, one flag each"""


def _real(model="wan-1.3b", wan="wan_models/Wan2.1-T2V-1.3B", **kw):
    """A real-model preset: Astrolabe's settings (docs/method.md#released-settings: 480x832, 21
    latent frames, LoRA rank 256 / alpha 256 on every block linear, lr 1e-5, beta 0.1, KL 1e-4)
    with the files where the Self-Forcing / LongLive repos' download instructions put them."""
    base = dict(model=model, vae=f"{wan}/Wan2.1_VAE.pth",
                text_encoder=f"{wan}/models_t5_umt5-xxl-enc-bf16.pth", height=480, width=832,
                num_frames=21, window=0, window_context="noisy", lora_rank=256, lora_alpha=256.0,
                lr=1e-5, rewards=["hpsv2=1"], eval_prompts=2, eval_every=30, ckpt_every=30,
                # one GPU: 2 prompts x 8 videos per step (Astrolabe on 8 GPUs: 16 x 24)
                prompts_per_step=2, group_size=8, micro_batch=1, rollout_batch=1, grad_checkpointing=True,
                global_std=True)  # Astrolabe's advantage std: over the whole step
    return dataclasses.replace(Args(), **{**base, **kw})


_LONGLIVE = dict(ckpt="longlive_models/models/longlive_base.pt", local_attn=12, sink=3, num_frames=42,
                 window=21, window_select="random_choice", window_starts=[21])
PRESETS = {  # python train.py <preset> [--flags]; every field stays overridable
    "tiny": Args(),
    "self-forcing": _real(ckpt="checkpoints/self_forcing_dmd.pt", out_dir="out/self-forcing"),
    # one 24 GB GPU (README, Memory): LoRA rank 64 and the VAE in 160-pixel tiles, the rest as self-forcing
    "self-forcing-24gb": _real(ckpt="checkpoints/self_forcing_dmd.pt", out_dir="out/self-forcing-24gb",
                               lora_rank=64, lora_alpha=64.0, vae_tile=160),
    "causal-forcing": _real(ckpt="checkpoints/chunkwise/causal_forcing.pt", out_dir="out/causal-forcing"),
    # LongLive: rolling cache (12 frames, 3 sink); Astrolabe's streaming config trains the window
    # [21, 42) after a 21-frame history (window_choices = [21]); -lora: LongLive's LoRA as warm start
    "longlive": _real(out_dir="out/longlive", **_LONGLIVE),
    "longlive-lora": _real(out_dir="out/longlive-lora", lora_init="longlive_models/models/lora.pt", **_LONGLIVE),
    # Krea Realtime 14B: global attention; one 14B model per GPU leaves room for 1 video per pass
    "krea-14b": _real(model="wan-14b", out_dir="out/krea-14b",  # the 1.3B repo's VAE and umT5 files
                      ckpt="checkpoints/krea-realtime-video-14b.safetensors", prompts_per_step=1),
}

# --exact-reference: the released code's choice for every flag that has one (docs/method.md)
RELEASED = dict(released=Released(train_mask="frame", train_sink=False, train_timesteps="raw",
                                  uncertainty_sign="released", aux_rewards=2, rank_ties="ordinal",
                                  ref_thres_cap=0.05, ema_start="sync", prompt_draw="released", reward_frames=0,
                                  videoalign_load="released"),
                window_context="noisy", global_std=True, reward_norm="none", adaptive_weight=False, old_decay="linear")


def parse_args(argv=None):
    """`train.py [PRESET] [--flags]`: the preset is a named Args default, flags override it."""
    return checks.parse_cli(Args, PRESETS, sys.argv[1:] if argv is None else list(argv), __doc__)


# ----------------------------------------------------------------------------------------------
# The pieces of one step, in the order main() uses them

def add_policies(model, args):
    """The policies of Astrolabe as LoRA adapters on one frozen base network (lora.py): switching
    policy is switching the adapter every linear uses. Each is named here with how it starts."""
    # θ, "default": the policy being trained. LoRA's B = 0 makes it start as the base model, or as
    # the --lora-init warm start (LongLive's own LoRA)
    add_adapter(model, "default", args.lora_rank, args.lora_alpha)
    if args.lora_init:
        load_lora_init(model, args.lora_init)
    # θ_old, "old": rolls out the videos (step 1) and anchors the NFT loss; starts as θ, then trails it
    copy_adapter(model, "default", "old")
    # the reference of λ ||x̂_θ - x̂_ref||²: with --selective its own adapter "ref", starting as θ and
    # reset to θ now and then (the dynamic reference); otherwise the base itself (adapters off, None)
    if args.selective:
        copy_adapter(model, "default", "ref")
    # "ema": an exponential average of θ, for eval and export; starts as θ
    if args.ema:
        copy_adapter(model, "default", "ema")


def training_noise(args, x0, step, first_sample):
    """x_t of a micro-batch: one timestep for the micro-batch and fresh noise per sample, all from
    (seed, step, sample), so any batch layout and world size draws the same numbers.
    Returns x_t (m, T, C, H, W), t (m, T) and the sigma of the x0 conversion (m,)."""
    g = torch.Generator().manual_seed(seed_of(args.seed, step, "t", first_sample))
    if args.released.train_timesteps == "sampler":  # one of the warped timesteps the sampler used
        ts, sig = sampler_timesteps()
        i = torch.randint(len(ts), (1,), generator=g).item()
        t, s_noise, s_x0 = ts[i], sig[i], sig[i]
    else:  # released: raw t, noised with t/1000 but converted back with the nearest grid sigma
        raw = torch.tensor([1000.0, 750.0, 500.0, 250.0])
        t = raw[torch.randint(4, (1,), generator=g).item()]
        s_noise, s_x0 = t / 1000, sigma_of(t)[0]
    eps = []
    for i in range(len(x0)):  # each sample's noise from its own global index
        gen = torch.Generator().manual_seed(seed_of(args.seed, step, "eps", first_sample + i))
        eps.append(torch.randn(x0.shape[1:], generator=gen))
    eps = torch.stack(eps).to(x0)  # (m, T, C, H, W)
    # x_t = (1 - σ) x0 + σ ε: the forward process, on the clean rollout
    x_t = (1 - s_noise) * x0 + s_noise * eps
    m, T = x0.shape[:2]
    return x_t, torch.full((m, T), float(t), device=x0.device), s_x0.expand(m).to(x0.device)


def predict_x0(model, adapter, x_t, t, sigma, ctx, args, *, clean_x0, start, history):
    """x̂0 of one policy (LoRA adapter; None = the base): x̂0 = x_t - σ v(x_t, t). (m, T, C, H, W)

    The window [start, start + T) attends to `history` (the detached rollout cache at `start`: sink
    + recent frames, so its size never depends on start) and block-causally to itself; with
    --window-context clean to the clean frames of its earlier blocks (teacher forcing)."""
    rel = args.released
    with use_adapter(model, adapter):
        v = model(x_t, t, ctx, start_frame=start, history=history, local=args.local_attn,
                  sink=args.sink if rel.train_sink else 0,  # released: a window mask without a sink
                  mask_block=1 if rel.train_mask == "frame" else None,  # released: frame-causal
                  clean_x=clean_x0 if args.window_context == "clean" else None)
    # x̂0 = x_t - σ v, in float32 (the loss math never runs in bf16)
    return x_t - sigma.view(-1, 1, 1, 1, 1) * v.float()


def nft_microbatch(model, args, *, x0, ctx, r, kl_mask, history, step, first_sample, start, autocast):
    """The loss of one micro-batch, ready for backward(): three x0 predictions on one x_t, then
    L = L_NFT(x̂_θ, x̂_old, x0, r) + λ ||x̂_θ - x̂_ref||² over the samples in kl_mask.

    x0 (m, T, C, H, W) clean window latents; r (m,) optimality probabilities; kl_mask (m,) bool.
    Returns (loss with its graph, the reference term as used, the reference term on every sample,
    ||x̂_θ - x̂_old||²: how far θ has moved from the rollout policy, a diagnostic)."""
    x_t, t, sigma = training_noise(args, x0, step, first_sample)
    ref = "ref" if args.selective else None  # the dynamic reference adapter, or the base
    common = dict(clean_x0=x0, start=start, history=history)
    with autocast:
        with torch.no_grad():  # old and ref: fixed targets, no graph
            x_old = predict_x0(model, "old", x_t, t, sigma, ctx, args, **common)
            x_ref = predict_x0(model, ref, x_t, t, sigma, ctx, args, **common)
        x_th = predict_x0(model, "default", x_t, t, sigma, ctx, args, **common)
    # L_NFT = mean_b [ r_b ||x̂⁺ - x0||² + (1 - r_b) ||x̂⁻ - x0||² ]   (nft_loss.nft_sample_losses)
    loss_nft = nft.nft_policy_loss(x_th, x_old, x0, r, beta=args.beta, adaptive=args.adaptive_weight,
                                   adv_clip=args.adv_clip, negative=args.objective == "nft")
    # the reference term ("kl" in the logs, an L2 between x0 predictions): mean_{b in mask} ||x̂_θ - x̂_ref||²
    loss_ref = nft.ref_loss(x_th, x_ref, kl_mask)
    # L = L_NFT + λ_KL · reference term
    loss = loss_nft + args.kl_weight * loss_ref
    return loss, loss_ref.detach(), nft.ref_loss(x_th.detach(), x_ref), nft.sq_err(x_th.detach(), x_old).mean()


# ----------------------------------------------------------------------------------------------

def main(args: Args):
    # ================================ set-up (plumbing, one line each) ================================
    rank, world, device = init_distributed()  # torchrun sets RANK and WORLD_SIZE; else one process
    mem_start = memory_in_use(device)  # the process before anything loads (mem/total_mb)
    if args.exact_reference:  # every released-code behaviour at once (RELEASED)
        args = checks.released_behaviour(args, RELEASED)
    # every check before anything loads (all problems at once, one line each), the out-dir's lock,
    # CPU threads, the predicted memory peak; returns args with each input file as found, the run's lineage
    args, resume_path, lineage = checks.start_run(args, world, REGISTRY, device)
    prompts = checks.training_prompts(args)  # --prompts + --prompt-file, else the shapes world's
    frozen = FrozenParts(args, prompts, device)  # embed: text -> (B, Lt, Dt); decode: latents -> pixels
    reward_videoalign.LOAD = args.released.videoalign_load  # plumbing: how VideoAlign's checkpoint loads
    multi = MultiReward(args.rewards, registry=REGISTRY, frames=args.released.reward_frames)  # R_1 .. R_J
    bf16 = use_bf16(args, device)
    model = load_base(args, device, torch.bfloat16 if bf16 else torch.float32)  # frozen; bf16 on GPU
    add_policies(model, args)  # θ ("default"), θ_old ("old"), ref, ema: LoRA adapters on the base
    params = adapter_params(model, "default")  # only θ is trained
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay, eps=1e-8)
    # bf16 matmuls; LoRA parameters, optimizer state and the loss math stay float32
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    compensator = nft.RiskCompensator()  # --selective: the fraction rho under the reference term
    dynref = nft.DynamicReference(thres_max=args.released.ref_thres_cap)  # --selective: when ref <- θ
    guard = NonFiniteGuard()  # a non-finite loss skips a step; 3 in a row, or non-finite weights, stop
    start = resume_run(resume_path, model, opt, args, compensator, dynref, guard) if resume_path else 0
    runlog = RunLog(args, rank, world, device, start, mem_start, lineage)  # metrics.jsonl, the bar, wandb
    eval_prompts = pick_eval_prompts(prompts, args.eval_prompts)  # spanning the prompts' words
    policy = "ema" if args.ema else "default"  # what eval, export and the "after" picture use
    after = None  # the final policy's eval videos, once the last step has been evaluated
    if args.eval_every and start == 0:  # the "before" row: the base model, step 0
        evaluate(model, frozen, multi, eval_prompts, args, policy, 0, runlog)
    N, K = args.prompts_per_step * args.group_size, args.group_size
    n, m = N // world, args.micro_batch  # this rank's samples, a micro-batch
    n_micro = n // m  # micro-batches per step and rank

    for step in range(start, args.steps):
        clock = StepClock(device)  # plumbing: wall time and peak memory of the step's parts
        # ------------------------------------------------------------------ 1. rollout (θ_old, no grad)
        # the step's G prompts; sample j of the N = G K is candidate j % K of prompt j // K, and this
        # rank holds samples js
        step_prompts = prompts_for_step(prompts, args.prompts_per_step, step, args.seed, args.released.prompt_draw)
        js = range(rank * n, (rank + 1) * n)
        my_prompts = [step_prompts[j // K] for j in js]
        ctx = frozen.embed(my_prompts)  # (n, Lt, Dt)
        s = window_start(args, step)  # this step trains the window [s, s + T), the same on every rank
        model.eval()
        with use_adapter(model, "old"):  # the rollout policy θ_old
            # the history [0, s) once per prompt: a KV cache at frame s (None when s = 0) ...
            history = rollout_histories(model, ctx, js, K, step, s, args)
            # ... and each prompt's K candidates continue it with their own noise
            x0 = rollout_windows(model, ctx, js, K, step, s, history, args)  # (n, T, C, H, W) clean latents
        clock.lap("rollout")

        # ------------------------------------------------------------------ 2. reward
        # decode to pixels and score with every reward: real models --decode-batch videos at a time
        # (a video in pixels is large), the pixel-space tiny model all at once
        chunk = n if args.model == "tiny" else args.decode_batch
        scores = {name: [] for name in multi.names}
        for i in range(0, n, chunk):
            videos = frozen.decode(x0[i:i + chunk])  # (c, Fp, 3, Hp, Wp) in [0, 1]
            for name, value in multi.score(videos, my_prompts[i:i + chunk]).items():
                scores[name].append(value)
        # every rank needs every score: a prompt's K videos may sit on different ranks
        scores = {name: gather(torch.cat(v).to(device), world) for name, v in scores.items()}  # {name: (N,)}

        # ------------------------------------------------------------------ 3. advantage -> r
        groups = torch.arange(N, device=device) // K  # the prompt of every sample
        terms = scores
        if args.reward_norm == "per-reward":  # DanceGRPO: z-score each reward in its group first
            terms = {name: nft.group_normalize(v, groups) for name, v in scores.items()}
        # R = Σ_j w_j R_j
        R = multi.total(terms)  # (N,)
        # A = (R - mean_group R) / (std + 1e-4): the group's own std, or (--global-std) the step's
        adv = nft.group_advantages(R, groups, global_std=args.global_std)  # (N,)
        # r = 1/2 + clip(A, -A_max, A_max) / (2 A_max) in [0, 1]: how "optimal" each video is
        r = nft.optimality_prob(adv, args.adv_clip).float()  # (N,)
        # the samples under the reference term: all, or (--selective) where the rewards disagree
        if args.selective:
            rel = args.released
            kl_mask = nft.selective_kl_mask(scores, multi.names, compensator, rel.aux_rewards, rel.uncertainty_sign,
                                            rel.rank_ties)  # (N,) bool
        else:
            kl_mask = torch.ones(N, dtype=torch.bool, device=device)
        clock.lap("reward")

        # ------------------------------------------------------------------ 4. NFT update
        model.train()
        mine = slice(js.start, js.stop)  # this rank's rows of the step's (N,) tensors
        r_mine, mask_mine = r[mine], kl_mask[mine]  # (n,)
        parts = []  # (loss, reference term, reference term on all, θ-old distance) of every micro-batch
        for i in range(0, n, m):  # micro-batches; gradients accumulate into one optimizer step
            loss, kl, kl_all, theta_old = nft_microbatch(
                model, args, x0=x0[i:i + m], ctx=ctx[i:i + m], r=r_mine[i:i + m], kl_mask=mask_mine[i:i + m],
                history=history.for_samples(i, i + m) if history else None, step=step, first_sample=js[i],
                start=s, autocast=autocast)
            if torch.isfinite(loss):  # plumbing: a non-finite loss is not back-propagated (see guard)
                (loss / n_micro).backward()
            parts.append((loss.detach(), kl, kl_all, theta_old))
        del history  # free the histories before the next rollout makes its own
        # plumbing: one all-reduce averages θ's gradients over ranks and sums the statistics
        stats = all_reduce_step(params, parts, world)  # {"loss", "kl", "kl_all", "theta_old"}: means; "nonfinite"

        # ------------------------------------------------------------------ 5. after the update
        grad_norm = float("nan")
        if not guard.skip(stats, step):  # plumbing: a non-finite loss on any rank skips the step
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip).item()
            opt.step()
            guard.check_weights(params, step, args.lr)  # plumbing: never save or export non-finite weights
            # the EMA of θ:  ema <- d ema + (1 - d) θ,  d = min((1 + n)/(10 + n), 0.9); released: it
            # first becomes θ_1 (--released.ema-start sync)
            if args.ema and step == 0 and args.released.ema_start == "sync":
                copy_adapter(model, "default", "ema")
            if args.ema:
                lerp_adapter(model, "ema", "default", nft.ema_decay(step))
            # the dynamic reference (--selective): ref <- θ when the step's KL passed its threshold,
            # or after too many steps
            if args.selective and dynref.step(stats["kl"]):
                copy_adapter(model, "default", "ref")
            # θ_old <- d θ_old + (1 - d) θ,  d = min(0.001 step, 0.5): the rollout policy trails θ
            lerp_adapter(model, "old", "default", nft.old_decay(step + 1, args.old_decay))
        opt.zero_grad(set_to_none=True)
        clock.lap("update")

        # ================================ bookkeeping (plumbing, one line each) ================================
        runlog.step(step + 1, multi, scores, r, kl_mask, stats, grad_norm, opt, s, clock, guard.skipped)
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            # at the last step these are the "after" videos of the before/after figure
            after = evaluate(model, frozen, multi, eval_prompts, args, policy, step + 1, runlog)
        if (args.ckpt_every and (step + 1) % args.ckpt_every == 0) or step + 1 == args.steps:
            state = {"step": step + 1, "bad_steps": guard.bad_steps, "args": dataclasses.asdict(args),
                     "lineage": lineage, "compensator": compensator.state_dict(), "dynref": dynref.state_dict()}
            save_run(args, model, opt, state, export=policy, rank=rank, world=world)

    # ================================ finish (plumbing) ================================
    save_before_after(model, frozen, eval_prompts, args, policy, after, runlog, n_train_prompts=len(prompts))
    runlog.close()  # the bar, the out-dir's lock, the process group


if __name__ == "__main__":  # what the user can fix: one line each (rank 0), exit 2, no traceback
    run_cli(main, parse_args, (RewardError,), "interrupted: --resume latest continues from the last checkpoint")
    # plumbing: everything is written; the interpreter's final garbage collection would walk every
    # object torch made (~1.3 s on a 2-core CPU) to free memory the OS takes back anyway
    gc.freeze()
