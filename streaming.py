"""
Streaming clip-window rollouts over the rolling KV cache (Astrolabe's streaming training, arXiv
2603.17051; docs/method.md#streaming): every RL step trains one window [s, s + T) of a video of F
latent frames. Per prompt the history [0, s) is generated once with the rolling KV cache; its K
candidates branch from copies of that cache and generate the window with their own noise
(clip-level group-wise sampling), so reward differences come from the window alone. The cache
holds sink + recent frames only: memory never depends on s. Short clips are s = 0, T = F.

    starts = window_starts(args); s = window_start(args, step)
    hist = rollout_histories(model, ctx, js, K, step, s, args)   # (KVCache at s, {key: row}); None if s = 0
    lat  = rollout_windows(model, ctx, js, K, step, s, hist, args)        # (n, T, C, H, W)
    h    = stack_history(hist, rows, K, args)   # the update attends to these detached histories

All noise comes from generators seeded by (seed, step, prompt, candidate): the same whatever the
batch layout or number of ranks.

Test:  python -m pytest tests/test_streaming.py -q

Shape legend: F latent frames of the video, s the window's start frame, T window frames, n samples
of this rank (indices js; sample j is prompt j // K, candidate j % K), K videos per prompt, B
videos of one sampler call, C channels, H, W latent (tiny: pixel) size, Lt, Dt text tokens, width.
"""
import random

import torch

from common import seed_of
from kvcache import KVCache
from lora import use_adapter
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
def rollout(model, ctx, seeds, frames, args, adapter="old", cache=None, start=0, keep=True):
    """`frames` latent frames per seed with `adapter`, no grad, continuing `cache` (a new one if
    None) from frame `start`. Returns (B, frames, C, H, W) clean latents (None if keep=False:
    only the cache advances, and its last block is written, for the window that follows)."""
    dtype, dev = next(model.parameters()).dtype, ctx.device  # cache and noise in the base's dtype
    if cache is None:
        cache = new_cache(model, len(seeds), args, dtype, dev)
    # one generator per seed: a video's noise depends on its seed alone, not on the batch
    noise = GeneratorNoise(make_generators(seeds), (model.cfg.in_dim, *latent_hw(args)), dev, dtype)
    with use_adapter(model, adapter):  # "old": the released trainer rolls out with the old policy
        # the videos' caches are dropped after the rollout: their last block's K/V is never read
        lat = generate(model, ctx.to(dtype), cache, frames, noise, start_frame=start, keep=keep,
                       last_cache_pass=not keep)
    return None if lat is None else lat.float()  # float32 for the rewards and the loss


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


def history_key(j, K, args):
    """Which history sample j continues: its prompt's (shared-prefix) or its own (independent)."""
    return j // K if args.group_mode == "shared-prefix" else j


@torch.no_grad()
def rollout_histories(model, ctx, js, K, step, s, args):
    """The history [0, s) before this step's window, generated once per prompt (shared-prefix)
    or per sample (independent) of this rank, all in one batch: (KVCache at frame s with one row
    per history, {history_key: row}), or None for s = 0 (no cache at all).

    The cache is a rolling-cache state (sink + recent frames), so its size never depends on s;
    the prefix latents themselves are not kept (keep=False)."""
    if s == 0:
        return None
    rows, seeds, ctx_rows = {}, [], []  # history key -> cache row; per row its seed, its prompt
    for i, j in enumerate(js):
        key = history_key(j, K, args)
        if key in rows:  # shared-prefix: this prompt's history already has a row
            continue
        rows[key] = len(rows)
        # prefix noise from (seed, step, prompt[, candidate]): the same on every rank
        if args.group_mode == "shared-prefix":
            seeds.append(seed_of(args.seed, step, j // K))
        else:
            seeds.append(seed_of(args.seed, step, j // K, j % K, "prefix"))
        ctx_rows.append(i)
    cache = new_cache(model, len(rows), args, next(model.parameters()).dtype, ctx.device)  # one batch
    # keep=False: only the cache advances to frame s, its last block written for the window
    rollout(model, ctx[ctx_rows], seeds, s, args, cache=cache, keep=False)
    return cache, rows


def stack_history(hist, rows, K, args):
    """A fresh batch cache holding the histories of samples `rows` (None when there is none)."""
    if hist is None:
        return None
    cache, row_of = hist
    # copies, one row per sample: branching from them never alters the shared history
    return cache.select([row_of[history_key(j, K, args)] for j in rows])


@torch.no_grad()
def rollout_windows(model, ctx, js, K, step, s, hist, args):
    """The window [s, s + T) of every sample j in js (prompt j // K, candidate j % K), each
    branching from a copy of its history, --rollout-batch videos per sampler call. Returns
    (n, T, C, H, W) clean latents."""
    T, m = args.window or args.num_frames, args.rollout_batch or args.micro_batch  # m: videos per call
    out = []
    for i in range(0, len(js), m):
        rows = js[i:i + m]
        seeds = [seed_of(args.seed, step, j // K, j % K) for j in rows]  # candidate k's own noise
        # each call continues fresh copies of its samples' histories from frame s
        out.append(rollout(model, ctx[i:i + m], seeds, T, args, cache=stack_history(hist, rows, K, args), start=s))
    return torch.cat(out)  # (n, T, C, H, W)
