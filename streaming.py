"""
Streaming clip-window rollouts over the rolling KV cache (Astrolabe's streaming training, arXiv
2603.17051; docs/method.md#streaming): every RL step trains one window [s, s + T) of a video of F
latent frames. Per prompt the history [0, s) is generated once with the rolling KV cache; its K
candidates branch from copies of that cache and generate the window with their own noise
(clip-level group-wise sampling), so reward differences come from the window alone. The cache
holds sink + recent frames only: memory never depends on s. Short clips are s = 0, T = F.

    prompts = prompts_for_step(all_prompts, G, step, seed)             # the step's G prompts
    s = window_start(args, step)                                       # block-aligned, same on every rank
    with use_adapter(model, "old"):                                    # the rollout policy
        history = rollout_histories(model, ctx, js, K, step, s, args)  # History at frame s; None if s = 0
        x0 = rollout_windows(model, ctx, js, K, step, s, history, args) # (n, T, C, H, W) clean latents
    cache = history.for_samples(i, j)   # the update attends to copies of samples [i, j)'s histories

All noise comes from generators seeded by (seed, step, prompt, candidate): the same whatever the
batch layout or number of ranks. The policy is whichever LoRA adapter the caller made active.

Test:  python -m pytest tests/test_streaming.py -q

Shape legend: F latent frames of the video, s the window's start frame, T window frames, n samples
of this rank (indices js; sample j is prompt j // K, candidate j % K), K videos per prompt, B
videos of one sampler call, C channels, H, W latent (tiny: pixel) size, Lt, Dt text tokens, width.
"""
import random
from dataclasses import dataclass

import torch

from common import seed_of
from kvcache import KVCache
from model import CONFIGS
from sample import GeneratorNoise, generate, make_generators


def latent_hw(args):
    """(H, W) of the model's input: pixels for the pixel-space tiny model, VAE latents (8x
    smaller) for Wan."""
    if args.model == "tiny":
        return args.height, args.width  # pixel space: the frame itself goes in
    return args.height // 8, args.width // 8  # the Wan2.1 VAE's spatial stride


def new_cache(model, batch, args, dtype, device):
    """An empty KV cache for `batch` videos of this run's size and cache window."""
    # a global cache holds all --num-frames frames; a rolling one --local-attn frames, whatever F
    return KVCache.for_model(model.cfg, batch, args.num_frames, latent_hw(args), args.sink,
                             args.local_attn, dtype, device)


@torch.no_grad()
def rollout(model, ctx, seeds, frames, args, cache=None, start=0, keep=True):
    """`frames` latent frames per seed with the active adapter, no grad, continuing `cache` (a new
    one if None) from frame `start`. Returns (B, frames, C, H, W) clean latents (None if keep=False:
    only the cache advances, and its last block is written, for the window that follows)."""
    dtype, dev = next(model.parameters()).dtype, ctx.device  # cache and noise in the base's dtype
    if cache is None:
        cache = new_cache(model, len(seeds), args, dtype, dev)
    # one generator per seed: a video's noise depends on its seed alone, not on the batch
    noise = GeneratorNoise(make_generators(seeds), (model.cfg.in_dim, *latent_hw(args)), dev, dtype)
    # the videos' caches are dropped after the rollout: their last block's K/V is never read
    lat = generate(model, ctx.to(dtype), cache, frames, noise, start_frame=start, keep=keep,
                   last_cache_pass=not keep)
    return None if lat is None else lat.float()  # float32 for the rewards and the loss


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


def window_starts(args):
    """Every window start this run can draw (block-aligned latent frames)."""
    T, block = args.window or args.num_frames, CONFIGS[args.model].frames_per_block  # no --window: T = F
    if args.window_select == "first":
        return [0]
    if args.window_select == "last":
        return [args.num_frames - T]  # the longest history the run can have
    if args.window_select == "random":  # every block boundary with a whole window after it
        return list(range(0, args.num_frames - T + 1, block))
    return args.window_starts or [0]  # random_choice


def window_start(args, step):
    """Block-aligned start s of this step's window, the same on every rank. random / random_choice
    draw without replacement: each cycle of steps visits every start once in a seeded order, so a
    stretch of steps is not skewed toward one start (the reward differs a lot between windows)."""
    starts = window_starts(args)
    cycle, i = divmod(step, len(starts))  # which cycle, and the position in it
    # a permutation of the starts seeded by (seed, cycle): the same on every rank
    return random.Random(seed_of(args.seed, cycle, "window")).sample(starts, len(starts))[i]


@dataclass
class History:
    """The rollout before this step's window, [0, s): a KV cache at frame s with one row per distinct
    history (a prompt's, shared by its K candidates; or each sample's own with --group-mode
    independent), and the row each of this rank's n samples continues. The cache holds sink + recent
    frames only, so its size never depends on s; it is detached (no grad) for the update."""
    cache: KVCache
    row_of_sample: list  # (n,): row_of_sample[i] is the cache row of this rank's sample i

    def for_samples(self, lo, hi):
        """A fresh cache with the histories of samples [lo, hi), one row each: copies, so branching
        from them never alters the shared history."""
        return self.cache.select(self.row_of_sample[lo:hi])


@torch.no_grad()
def rollout_histories(model, ctx, js, K, step, s, args):
    """The history [0, s) before this step's window, generated once per prompt (shared-prefix) or
    per sample (independent) of this rank, all in one batch: a History, or None for s = 0 (no
    cache at all). The prefix latents themselves are not kept (keep=False)."""
    if s == 0:
        return None
    rows, seeds, ctx_rows = {}, [], []  # history key -> cache row; per row its seed, its prompt
    row_of_sample = []
    for i, j in enumerate(js):
        # the history sample j continues: its prompt's (shared-prefix) or its own (independent)
        key = j // K if args.group_mode == "shared-prefix" else j
        if key in rows:  # shared-prefix: this prompt's history already has a row
            row_of_sample.append(rows[key])
            continue
        rows[key] = len(rows)
        row_of_sample.append(rows[key])
        # prefix noise from (seed, step, prompt[, candidate]): the same on every rank
        if args.group_mode == "shared-prefix":
            seeds.append(seed_of(args.seed, step, j // K))
        else:
            seeds.append(seed_of(args.seed, step, j // K, j % K, "prefix"))
        ctx_rows.append(i)
    cache = new_cache(model, len(rows), args, next(model.parameters()).dtype, ctx.device)  # one batch
    # keep=False: only the cache advances to frame s, its last block written for the window
    rollout(model, ctx[ctx_rows], seeds, s, args, cache=cache, keep=False)
    return History(cache, row_of_sample)


@torch.no_grad()
def rollout_windows(model, ctx, js, K, step, s, history, args):
    """The window [s, s + T) of every sample j in js (prompt j // K, candidate j % K), each
    branching from a copy of its history, --rollout-batch videos per sampler call. Returns
    (n, T, C, H, W) clean latents."""
    T, b = args.window or args.num_frames, args.rollout_batch or args.micro_batch  # b: videos per call
    out = []
    for i in range(0, len(js), b):
        seeds = [seed_of(args.seed, step, j // K, j % K) for j in js[i:i + b]]  # candidate k's own noise
        # each call continues fresh copies of its samples' histories from frame s
        cache = history.for_samples(i, i + b) if history else None
        out.append(rollout(model, ctx[i:i + b], seeds, T, args, cache=cache, start=s))
    return torch.cat(out)  # (n, T, C, H, W)
