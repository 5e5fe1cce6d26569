"""
Online forward-process RL (negative-aware fine-tuning, from DiffusionNFT) of a distilled
autoregressive video model, as Astrolabe does it (arXiv 2603.17051; docs/method.md).

One RL step (the loop in main() reads in this order):
  1. rollout    K videos per prompt with the `old` LoRA adapter, 4-step AR sampler, no grad;
                streaming: a history [0, s) once per prompt, then K windows [s, s + W) from it
  2. reward     decode, score with every reward, R = sum_j w_j R_j (gathered over ranks)
  3. advantage  A = (R - mean over the prompt's group) / (std of the group + 1e-4) -> r in [0, 1]
                (--global-std: the std over the whole step, as Astrolabe)
  4. update     x_t = (1 - sigma) x0 + sigma eps on the window; three x0 predictions on the same
                x_t (theta with grad, old and ref without); L = L_NFT + lambda ||x_theta - x_ref||^2
                (--objective positive-only: the positive half of L_NFT alone, an ablation)
  5. AdamW step (one per RL step, after every micro-batch), EMA, reference reset,
                old <- d * old + (1 - d) * theta
Nothing is kept from the sampler's trajectory: only the clean videos (forward-process RL).

Run:   python train.py                                        (tiny shapes world, CPU, minutes)
       python train.py --rewards sharpness=1 examples/my_reward.py:reward=0.5
       torchrun --standalone --nproc_per_node=2 train.py --steps 10
       python train.py self-forcing --prompt-file prompts.txt  (a real model: README)
Test:  python -m pytest tests/test_train.py tests/test_streaming.py -q

Shape legend: N samples of the step (all ranks), n of this rank, m of a micro-batch, G prompts,
K videos per prompt, F latent frames of a video, T window frames, s window start, C channels,
H, W latent (tiny: pixel) height and width, Lt, Dt text tokens and width.
"""
import dataclasses
import gc
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.distributed as dist
import tyro
from tqdm import tqdm

import memory
import nft_loss as nft
import reward_models
import tiny_world
import checks
from checkpoints import build_model, resume_run, save_run
from common import (UsageError, all_reduce_grads, gather, init_distributed, log, peak_growth,
                    reset_peak, rss_mb, seed_of, set_threads, use_bf16)
from evaluation import (FrozenParts, evaluate, save_before_after, score_videos, start_tracking, write_row,
                        write_rows)
from lora import adapter_params, all_finite, copy_adapter, lerp_adapter, use_adapter
from model import CONFIGS
from rewards import REWARDS, MultiReward
from sample import sampler_timesteps, sigma_of
from streaming import rollout_histories, rollout_windows, stack_history, window_start, window_starts

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
    """keep the newest N checkpoints (N >= 1; the final one is always among them)"""
    eval_every: int = 10
    """evaluate (fixed prompts and seeds, mp4 + eval/reward_mean) every N steps (0: never)"""
    resume: Optional[str] = None
    """'latest' (newest ckpt_* in out_dir) or a checkpoint folder"""
    track: bool = False
    """log to Weights & Biases (wandb must be installed; off by default)"""
    progress: bool = True
    """rank-0 tqdm bar (off: one print line per step only)"""
    overwrite: bool = False
    """start afresh in an --out-dir that holds another run: its checkpoints, metrics and videos are
    deleted first (without it such a run refuses to start)"""
    threads: int = 0
    """CPU threads per process (0: the cores this process may use / processes on this machine)"""
    # ---- model
    model: Literal["tiny", "wan-1.3b", "wan-14b"] = "tiny"
    """model size (model.CONFIGS)"""
    ckpt: Optional[str] = "assets/tiny_world.safetensors"
    """base weights: the pre-trained tiny shapes world (pretrain_tiny.py); `--ckpt None` for a random
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
    """latent frames per video F (a multiple of the block size 3)"""
    window: int = 6
    """latent frames T trained per step (streaming; multiple of 3); 0: the whole video"""
    window_select: Literal["first", "last", "random", "random_choice"] = "random"
    """where the window starts: first (0), last (F - T), random (any block), random_choice
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
    """NAME=WEIGHT ...: registry names (rewards, reward_models, tiny_world REWARDS) or path/to/file.py:function"""
    reward_norm: Literal["none", "per-reward"] = "none"
    """none: weighted sum of raw scores (Astrolabe); per-reward: normalise each within its group first"""
    # ---- NFT objective
    beta: float = 0.1
    """NFT mixing beta of the implicit positive/negative policies"""
    adv_clip: float = 5.0
    """advantage clip A_max; r = 0.5 + clip(A)/(2 A_max)"""
    global_std: bool = False
    """advantage std over the whole step (Astrolabe, as released); default: within each prompt's
    group, so that a reward dominated by which prompt was drawn still ranks a group's videos"""
    objective: Literal["nft", "positive-only"] = "nft"
    """nft: r ||x+ - x0||^2 + (1 - r) ||x- - x0||^2 (Astrolabe); positive-only: r ||x+ - x0||^2
    alone, reward-weighted fine-tuning on the good samples (the ablation of claims.py)"""
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
    rollout_batch: int = 32
    """videos per sampler call in the rollout and eval (0: --micro-batch); more is faster, each
    costs a KV cache (the real presets: 1)"""
    # ---- memory levers (the real presets turn them on)
    bf16: Literal["auto", "on", "off"] = "auto"
    """on: frozen base and text encoder in bf16 and bf16 autocast, on any device (LoRA parameters,
    optimizer state and loss math stay float32); off: float32 everywhere; auto: on with CUDA, off
    on a CPU (most CPUs emulate bf16 matmuls, slower than float32)"""
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
    # ---- fidelity to the released code (docs/method.md; README, "Differences")
    train_mask: Literal["block", "frame"] = "block"
    """attention blocks of the training forward: block (the sampler's 3 frames, as at inference)
    or frame (frame-causal: what the released trainer trains with, its block size never reaches
    the PEFT-wrapped model)"""
    train_sink: bool = True
    """the training mask keeps the rolling cache's sink frames, as the rollout sees them;
    --no-train-sink: the released local-window training mask, without a sink"""
    uncertainty_sign: Literal["paper", "released"] = "paper"
    """selective mode, u = rank disagreement: paper (u = mean rank_aux - rank_main, selects samples
    the main reward likes more than the auxiliaries: suspected hacking) or released (u = rank_main
    - mean rank_aux, the opposite samples; GARDO's and Astrolabe's code)"""
    aux_rewards: int = 0
    """selective mode: how many of the other rewards (in --rewards order) are the auxiliaries (0:
    all; the released code takes the first 2)"""
    rank_ties: Literal["average", "ordinal"] = "average"
    """selective mode: tied scores share their mean rank (average), or get ordinal ranks in sample
    order (ordinal; the released code's torch.sort, whose tie order is unspecified)"""
    ref_thres_cap: float = 0.5
    """dynamic reference: cap of the KL threshold when resets come fast (thres <- min(thres + 0.01,
    cap)); the released code's 0.05 pins it below its 0.15 start (a likely typo for 0.5)"""
    ema_start: Literal["sync", "base"] = "sync"
    """sync: the EMA becomes theta at the first step, then averages (the released code's
    sync_with_model); base: it starts from theta_0 = the base model and averages from there"""
    prompt_draw: Literal["epoch-walk", "released"] = "epoch-walk"
    """epoch-walk: every prompt once per epoch in a seeded shuffle; released: randperm(seed + step)
    [:prompts-per-step], the released sampler (its 8-GPU layout: --prompts-per-step 1
    --group-size 384)"""
    reward_frames: int = 8
    """frames the learned image rewards (hpsv2, clip_score, aesthetic) score per video, evenly
    spaced; 0: every frame (the released code scores all 81)"""
    exact_reference: bool = False
    """turn on every released-code behaviour above at once (+ raw train timesteps, noisy window
    context), for reproduction runs; overrides those flags"""
    # ---- eval
    eval_prompts: int = 4
    """number of fixed eval prompts (evenly spread over the training prompts)"""


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
    "causal-forcing": _real(ckpt="checkpoints/chunkwise/causal_forcing.pt", out_dir="out/causal-forcing"),
    # LongLive: rolling cache (12 frames, 3 sink); Astrolabe's streaming config trains the window
    # [21, 42) after a 21-frame history (window_choices = [21]); -lora: LongLive's LoRA as warm start
    "longlive": _real(out_dir="out/longlive", **_LONGLIVE),
    "longlive-lora": _real(out_dir="out/longlive-lora", lora_init="longlive_models/models/lora.pt", **_LONGLIVE),
    # Krea Realtime 14B: global attention; one 14B model per GPU leaves room for 1 video per pass
    "krea-14b": _real(model="wan-14b", out_dir="out/krea-14b",  # the 1.3B repo's VAE and umT5 files
                      ckpt="checkpoints/krea-realtime-video-14b.safetensors", prompts_per_step=1),
}


# --exact-reference: the released code's behaviour for every flag that has a choice (docs/method.md)
RELEASED = dict(train_mask="frame", train_sink=False, uncertainty_sign="released", aux_rewards=2,
                rank_ties="ordinal", ref_thres_cap=0.05, ema_start="sync", prompt_draw="released",
                reward_frames=0, train_timesteps="raw", window_context="noisy", reward_norm="none",
                global_std=True, adaptive_weight=False, old_decay="linear")


# every reward --rewards can name: weight-free, learned, the shapes world's detectors
REGISTRY = {**REWARDS, **reward_models.REWARDS, **tiny_world.REWARDS}


def released_behaviour(args):
    """args with every RELEASED value in place (what --exact-reference runs)."""
    return dataclasses.replace(args, **RELEASED)


def parse_args(argv=None):
    """`train.py [PRESET] [--flags]`: the preset is a named Args default, flags override it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = "tiny"
    if argv and not argv[0].startswith("-"):  # a leading word names the preset
        name = argv.pop(0)
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return tyro.cli(Args, args=argv, default=PRESETS[name],
                    description=__doc__.split("\n\n")[0] + f"\n\nPresets: {', '.join(PRESETS)}")


# ----------------------------------------------------------------------------------------------
# Building blocks of one step (module level: bench.py and the tests call them too)

def prompts_for_step(prompts, n, step, seed, draw="epoch-walk"):
    """The n prompts of RL step `step`. epoch-walk: a seeded shuffle, reshuffled every epoch, so
    an epoch's mean reward compares across epochs (random draws make a mean follow which prompts
    were drawn); released: the first n of randperm(len) seeded with seed + step (docs/method.md)."""
    if draw == "released":
        g = torch.Generator().manual_seed(seed + step)
        return [prompts[i] for i in torch.randperm(len(prompts), generator=g)[:n].tolist()]
    out = []
    for i in range(step * n, (step + 1) * n):
        epoch, k = divmod(i, len(prompts))
        order = random.Random(seed_of(seed, epoch, "prompts")).sample(range(len(prompts)), len(prompts))
        out.append(prompts[order[k]])
    return out


def predict_x0(model, adapter, x_t, t, sigma, ctx, args, *, clean_x0=None, start=0, history=None):
    """x0 prediction of one adapter: x0 = x_t - sigma * v(x_t, t). (m, T, C, H, W)

    The window [start, start + T) attends to `history` (the detached rollout cache at `start`,
    sink + recent frames, so its size never depends on start) and block-causally to itself.
    """
    clean = clean_x0 if args.window_context == "clean" else None
    # the training mask: the cache's window rule; frame-causal and/or sink-free for the released one
    mask_block = 1 if args.train_mask == "frame" else None
    sink = args.sink if args.train_sink else 0
    with use_adapter(model, adapter):
        v = model(x_t, t, ctx, local=args.local_attn, sink=sink, mask_block=mask_block, start_frame=start,
                  history=history, clean_x=clean)
    # x0 = x_t - sigma v, in float32 (the loss math never runs in bf16)
    return x_t - sigma.view(-1, 1, 1, 1, 1) * v.float()


def training_noise(args, x0, step, j0):
    """x_t of a micro-batch: one timestep for the micro-batch and fresh noise per sample, all from
    (seed, step, sample), so any batch layout and world size draws the same numbers.
    Returns x_t (m, T, C, H, W), t (m, T) and the sigma of the x0 conversion (m,)."""
    g = torch.Generator().manual_seed(seed_of(args.seed, step, "t", j0))
    if args.train_timesteps == "sampler":
        ts, sig = sampler_timesteps()
        i = torch.randint(len(ts), (1,), generator=g).item()
        t, s_noise = ts[i], sig[i]
        s_x0 = s_noise  # the same sigma for noising and for the x0 conversion
    else:  # Astrolabe: raw t, noised with t/1000 but converted back with the nearest grid sigma
        raw = torch.tensor([1000.0, 750.0, 500.0, 250.0])
        t = raw[torch.randint(4, (1,), generator=g).item()]
        s_noise, s_x0 = t / 1000, sigma_of(t)[0]
    eps = []
    for i in range(len(x0)):  # each sample's noise from its own global index
        gen = torch.Generator().manual_seed(seed_of(args.seed, step, "eps", j0 + i))
        eps.append(torch.randn(x0.shape[1:], generator=gen))
    eps = torch.stack(eps).to(x0)  # (m, T, C, H, W)
    # x_t = (1 - sigma) x0 + sigma eps: the forward process on the clean rollout
    x_t = (1 - s_noise) * x0 + s_noise * eps
    m, T = x0.shape[:2]
    return x_t, torch.full((m, T), float(t), device=x0.device), s_x0.expand(m).to(x0.device)


def selective_kl_mask(scores, names, compensator, args):
    """Samples under the reference term in selective mode: where the main reward (the first)
    and the auxiliary ones disagree most (docs/method.md#selective-regularization). (N,) bool."""
    # the auxiliaries: every other reward, or the first --aux-rewards of them (released: 2)
    aux = names[1:] if args.aux_rewards == 0 else names[1:1 + args.aux_rewards]
    u = nft.uncertainty(scores[names[0]], [scores[name] for name in aux], sign=args.uncertainty_sign,
                        ties=args.rank_ties)
    # rho, the selected fraction, adapts to this step's u before the mask is cut
    return nft.selective_mask(u, compensator.update(u))


def nft_microbatch(model, args, *, x0, ctx, r, kl_mask, step, j0, start, history, autocast):
    """The NFT loss of one micro-batch (3 predictions on one x_t), ready for backward().

    x0 (m, T, C, H, W) window latents, r (m,) optimality probabilities, kl_mask (m,) bool:
    samples under the reference term. Returns (loss with its graph, {"kl", "kl_all"} detached)."""
    x_t, t, sigma = training_noise(args, x0, step, j0)
    # selective mode: the dynamic reference adapter; otherwise the base model (adapters off)
    ref = "ref" if args.selective else None
    with autocast:
        with torch.no_grad():  # old and ref predictions on the same x_t, no graph
            x_old = predict_x0(model, "old", x_t, t, sigma, ctx, args, clean_x0=x0, start=start, history=history)
            x_ref = predict_x0(model, ref, x_t, t, sigma, ctx, args, clean_x0=x0, start=start, history=history)
        x_th = predict_x0(model, "default", x_t, t, sigma, ctx, args, clean_x0=x0, start=start, history=history)
    loss_pol = nft.nft_policy_loss(x_th, x_old, x0, r, beta=args.beta, adaptive=args.adaptive_weight,
                                   adv_clip=args.adv_clip, negative=args.objective == "nft")
    loss_ref = nft.ref_loss(x_th, x_ref, kl_mask)
    # L = L_NFT + lambda_KL * mean_{b in mask} ||x_theta - x_ref||^2
    loss = loss_pol + args.kl_weight * loss_ref
    return loss, {"kl": loss_ref.detach(), "kl_all": nft.ref_loss(x_th.detach(), x_ref)}


STATS = ("loss", "kl", "kl_all", "nonfinite", "micro_batches")  # summed over micro-batches and ranks


# ----------------------------------------------------------------------------------------------

def main(args: Args):
    # ---- plumbing: distributed setup. `python train.py` is one process; torchrun sets RANK etc.
    ddp, rank, world, device = init_distributed()
    cuda, master = device.startswith("cuda"), rank == 0
    # plumbing: memory at the start, before anything loads (mem/total_mb is measured from here)
    mem_start = 0.0 if cuda else rss_mb()
    torch.set_flush_denormal(True)  # CPU: denormal softmax tails make attention ~3x slower
    if args.exact_reference:  # every released-code behaviour at once (RELEASED)
        args = released_behaviour(args)
        log("--exact-reference: " + ", ".join(f"{k} {v}" for k, v in RELEASED.items()))

    # ---- every check before anything loads (checks.py): all problems at once, one line each
    # (raises UsageError, logs the warnings; returns args with every input file as found)
    args, resume_path = checks.check_run(args, world, REGISTRY, master)
    N, K = args.prompts_per_step * args.group_size, args.group_size
    n_local, T = N // world, args.window or args.num_frames
    # plumbing: CPU threads per process, so that ranks on one machine do not fight over cores
    if not cuda:
        set_threads(args.threads)
    # plumbing: this run owns the out-dir now (rank 0 writes; the others wait for the lock)
    if ddp:
        dist.barrier()
    if master:
        checks.own_out_dir(args)

    # ---- the memory model: the peak one step will hold (memory.py), printed before anything loads
    bf16 = use_bf16(args, device)
    memory.report(args, CONFIGS[args.model], start=max(window_starts(args)), world=world, bf16=bf16, device=device)

    # ---- prompts; text embeddings first (umT5 leaves the GPU before the DiT arrives), rewards
    prompts = list(args.prompts)
    if args.prompt_file:
        prompts += checks.prompt_lines(args.prompt_file)
    prompts = prompts or tiny_world.PROMPTS
    multi = MultiReward(args.rewards, registry=REGISTRY, frames=args.reward_frames)
    names = multi.names
    try:  # a file that exists but holds the wrong thing is the user's to fix, not a traceback
        frozen = FrozenParts(args, prompts, device)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None

    # ---- model: frozen base + LoRA adapters default (trained), old (rollout), ref, ema
    dtype = torch.bfloat16 if bf16 else torch.float32  # the frozen base in bf16
    try:
        model = build_model(args, device, dtype)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    if args.model == "tiny" and not args.ckpt:
        log("no base checkpoint: RL starts from a randomly initialised tiny model")
    params = adapter_params(model, "default")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay, eps=1e-8)
    # bf16 matmuls; LoRA parameters, optimizer state and loss math stay float32 (x0 is .float())
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    compensator, dynref = nft.RiskCompensator(), nft.DynamicReference(thres_max=args.ref_thres_cap)

    # ---- resume: the checkpoint checks.find_resume chose (the newest intact one)
    start, bad_steps, flat_steps = 0, 0, 0
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    if resume_path:  # adapters, optimizer (lr and weight decay from the flags), selective states
        start, bad_steps = resume_run(resume_path, model, opt, args, compensator, dynref)
        log(f"resumed from {resume_path} at step {start}")
        if master:  # keep the rows up to the checkpoint; a crash may have left more, or half a row
            kept, dropped = checks.metrics_rows(metrics_path, start)
            write_rows(metrics_path, kept)
            if dropped:
                log(f"warning: {metrics_path}: dropped {dropped} row(s) written after step {start} or damaged")
    wandb = start_tracking(args) if args.track and master else None  # --track: Weights & Biases
    log(f"{world} rank(s) on {device} ({dtype}); global batch {args.prompts_per_step} prompts x {K} videos "
        f"= {N} per step, micro-batch {args.micro_batch} per rank; rewards {args.rewards}")
    cache_kind = "global" if args.local_attn < 0 else args.local_attn
    log(f"memory levers: bf16 {bf16}, grad checkpointing {args.grad_checkpointing}, window {T} of "
        f"{args.num_frames} frames, cache {cache_kind} (sink {args.sink}), decode batch {args.decode_batch}")

    # the eval prompts: args.eval_prompts of them, spread evenly over the training prompts
    eval_p = prompts[::max(1, len(prompts) // args.eval_prompts)][:args.eval_prompts]
    policy = "ema" if args.ema else "default"  # what eval, export and the "after" picture use
    after = None  # the final policy's eval videos, once the last step has been evaluated
    if master and args.eval_every and start == 0:
        evaluate(model, frozen, multi, eval_p, args, policy, 0, metrics_path, wandb)  # "before"
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not (master and args.progress),
               dynamic_ncols=True, desc="RL")
    for step in bar:
        t0, mem0 = time.time(), reset_peak(device)
        # ------------------------------------------------------------------ 1. rollout (old)
        step_prompts = prompts_for_step(prompts, args.prompts_per_step, step, args.seed, args.prompt_draw)
        js = range(rank * n_local, (rank + 1) * n_local)  # this rank's global sample indices
        my_prompts = [step_prompts[j // K] for j in js]  # sample j is candidate j % K of prompt j // K
        ctx = frozen.embed(my_prompts)  # (n, Lt, Dt)
        model.eval()
        s = window_start(args, step)
        hist = rollout_histories(model, ctx, js, K, step, s, args)  # None for s = 0
        lat = rollout_windows(model, ctx, js, K, step, s, hist, args)  # (n, T, C, H, W)
        t_roll = time.time() - t0
        # ------------------------------------------------------------------ 2. reward
        # tiny: pixel space, every video at once; real models: --decode-batch videos at a time
        chunk = len(lat) if args.model == "tiny" else args.decode_batch
        try:
            total, per = score_videos(frozen, multi, lat, my_prompts, chunk)
        except ValueError as e:  # a reward returned the wrong thing, or the videos are not finite
            raise SystemExit(f"step {step + 1}: {e}") from None
        total = gather(total.to(device), world)  # (N,)
        scores = {name: gather(per[name].to(device), world) for name in names}  # {name: (N,)}
        groups = torch.arange(N, device=device) // K  # prompt index of every sample
        # ------------------------------------------------------------------ 3. advantage -> r
        if args.reward_norm == "none":
            R = total
        else:  # per-reward: z-score each reward inside its group, then the weighted sum
            R = sum(w * nft.group_normalize(scores[name], groups) for name, w in zip(names, multi.weights))
        # A = (R - mean_group R) / (std + 1e-4): the group's own std by default, so a group whose
        # videos differ little still ranks them; --global-std divides by the whole step's std
        adv = nft.group_advantages(R, groups, global_std=args.global_std)
        r = nft.optimality_prob(adv, args.adv_clip)  # (N,)
        flat_steps = flat_steps + 1 if bool((adv == 0).all()) else 0  # no sample better than another
        if flat_steps == 3:
            log(f"warning: steps {step - 1}-{step + 1} had the same reward for every video of a prompt: "
                f"r = 0.5 everywhere, nothing is learned (a reward that ignores the videos?)")
        if args.selective:  # where the rewards disagree, keep theta close to the reference
            kl_mask = selective_kl_mask(scores, names, compensator, args)  # (N,) bool
        else:  # standard mode: the reference term on every sample
            kl_mask = torch.ones(N, dtype=torch.bool, device=device)
        # ------------------------------------------------------------------ 4. NFT update
        model.train()
        t1, n_micro = time.time(), n_local // args.micro_batch
        sums = {k: torch.zeros((), device=device) for k in STATS}
        for mb in range(n_micro):
            lo = mb * args.micro_batch
            rows = js[lo:lo + args.micro_batch]
            g = slice(rows[0], rows[-1] + 1)  # the same samples in the step's global tensors
            loss, kl = nft_microbatch(model, args, x0=lat[lo:lo + args.micro_batch], ctx=ctx[lo:lo + args.micro_batch],
                                      r=r[g], kl_mask=kl_mask[g], step=step, j0=rows[0], start=s,
                                      history=stack_history(hist, rows, K, args), autocast=autocast)
            finite = bool(torch.isfinite(loss))
            if finite:
                (loss / n_micro).backward()  # accumulate: one optimizer step per RL step
            sums["loss"] += loss.detach()
            sums["kl"] += kl["kl"]
            sums["kl_all"] += kl["kl_all"]
            sums["nonfinite"] += float(not finite)
            sums["micro_batches"] += 1
        del hist  # the histories are done: free them before the next rollout allocates its own
        # plumbing: one all-reduce averages the LoRA gradients and sums the statistics over ranks
        flat = all_reduce_grads(params, torch.stack([sums[k] for k in STATS]), world)
        sums = dict(zip(STATS, flat))
        count = sums["micro_batches"]
        loss_m, kl_m, kl_all = (sums["loss"] / count).item(), (sums["kl"] / count).item(), (sums["kl_all"] / count).item()
        bad = sums["nonfinite"].item() > 0
        # ------------------------------------------------------------------ 5. optimizer, EMA, ref, old
        if bad:  # plumbing: a non-finite loss anywhere skips the whole step on every rank
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
            if not all_finite(model, "default"):  # plumbing: never save or export such weights
                raise SystemExit(f"step {step + 1} made the LoRA weights non-finite (--lr {args.lr:g} too "
                                 f"high?); stopped before saving them (the checkpoints on disk are intact)")
            if args.ema and step == 0 and args.ema_start == "sync":
                copy_adapter(model, "default", "ema")  # the EMA starts at theta_1, as released
            if args.ema:  # ema <- d ema + (1 - d) theta, d = min((1 + n)/(10 + n), 0.9)
                lerp_adapter(model, "ema", "default", nft.ema_decay(step))
            if args.selective and dynref.step(kl_m):  # the reference drifted too far / too long
                copy_adapter(model, "default", "ref")
            # theta_old <- d theta_old + (1 - d) theta, d from the step count after this update
            lerp_adapter(model, "old", "default", nft.old_decay(step + 1, args.old_decay))
        # ------------------------------------------------------------------ 6. log, eval, ckpt
        n = step + 1
        row = {"step": n, "reward_mean": total.mean().item(), "reward_std": total.std().item()}
        for name in names:
            row[f"rewards/{name}/mean"] = scores[name].mean().item()
        row.update({"window_start": s, "r_mean": r.mean().item(), "loss": loss_m, "kl": kl_m, "kl_all": kl_all,
                    "mask_frac": kl_mask.float().mean().item(), "grad_norm": grad_norm,
                    "lr": opt.param_groups[0]["lr"], "skipped": bad, "time/rollout_s": t_roll,
                    "time/update_s": time.time() - t1, "time/step_s": time.time() - t0})
        # the step's peak above its start, and in all (above the process before anything loaded)
        row["mem/peak_mb"] = peak_growth(device, mem0)
        row["mem/total_mb"] = row["mem/peak_mb"] + mem0 - mem_start
        if master:
            write_row(metrics_path, row, wandb)
            bar.set_postfix(reward=f"{row['reward_mean']:.4f}", loss=f"{loss_m:.4f}", kl=f"{kl_m:.2e}")
            msg = (f"step {n}/{args.steps} | reward {row['reward_mean']:.4f} | loss {loss_m:.5f} | kl {kl_m:.2e} "
                   f"| r {row['r_mean']:.3f} | grad {grad_norm:.2e} | {row['time/step_s']:.1f}s")
            if args.progress:
                bar.write(msg)
            else:
                print(msg, flush=True)
        if master and args.eval_every and (n % args.eval_every == 0 or n == args.steps):
            # at n == args.steps these are the end-of-run "after" videos: not sampled again
            after = evaluate(model, frozen, multi, eval_p, args, policy, n, metrics_path, wandb)
        if (args.ckpt_every and n % args.ckpt_every == 0) or n == args.steps:
            if master:
                state = {"step": n, "bad_steps": bad_steps, "args": dataclasses.asdict(args),
                         "compensator": compensator.state_dict(), "dynref": dynref.state_dict()}
                save_run(os.path.join(args.out_dir, f"ckpt_{n:06d}"), model, opt, state, export=policy,
                         keep=args.keep_ckpts)  # the newest --keep-ckpts stay
            if ddp:
                dist.barrier()
    bar.close()
    if master:
        save_before_after(model, frozen, eval_p, args, policy, after, metrics_path, n_train_prompts=len(prompts))
        checks.release_lock(args.out_dir)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parse_args())
    except UsageError as e:  # problems the user can fix: one line each, no traceback
        print("\n".join(f"error: {line}" for line in str(e).splitlines()), file=sys.stderr)
        sys.exit(2)
    # plumbing: everything is written; the interpreter's final garbage collection would walk
    # every object torch made (~1.3 s on a 2-core CPU) to free memory the OS takes back anyway
    gc.freeze()
