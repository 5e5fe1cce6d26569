"""
Few-step autoregressive sampling of a causal video DiT (Self-Forcing's 4-step sampler, used
unchanged by LongLive and Astrolabe: franklinz233/Astrolabe `pipeline/causal_inference.py`,
docs/wan_architecture.md#sampler; `path:line` below is that repository at commit 35a5347) and the
sampling CLI.

For each block of 3 latent frames, left to right:
    x = noise                                   t_j in [1000, 937.5, 833.33, 625] (warped)
    for j in 0..3:  x0 = x - sigma_j * v(x, t_j)            (flow -> x0, float64)
                    x  = (1 - sigma_{j+1}) x0 + sigma_{j+1} * fresh_noise      (j < 3)
    write x0 into the KV cache with one more call at t = 0 ("context_noise" = 0)
The same function is train.py's rollout (streaming.rollout). All randomness comes from an
explicit noise source (per-sample torch.Generators, or stored tensors), so a rollout is
reproducible whatever the batch layout, and the reference fixtures can be replayed exactly.

Run:   python sample.py                              (the tiny shapes world, writes an mp4)
       python sample.py --model wan-1.3b --ckpt checkpoints/self_forcing_dmd.pt \
           --vae wan_models/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth \
           --text-encoder wan_models/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth --prompts "a fox"
       python sample.py --help
Test:  python -m pytest tests/test_parity.py tests/test_sample.py -q

Shape legend: B batch, F latent frames, n frames per block, C channels, H, W latent size
(pixels for the pixel-space tiny model), t video frames decoded from one block, Lt, Dt text
tokens and width.
"""
import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from tqdm import tqdm

from kvcache import KVCache, check_window
from model import CONFIGS


# ----------------------------------------------------------------------------------------------
# Flow-matching schedule (FlowMatchScheduler: shift 5, sigma_min 0, 1000 steps, extra_one_step)

@functools.lru_cache(maxsize=4)  # looked up on every model call of the sampler: build it once
def flow_schedule(shift=5.0, steps=1000):
    """The 1000-entry grid: sigma_i = s u_i / (1 + (s - 1) u_i), u = linspace(1, 0, 1001)[:1000]."""
    u = torch.linspace(1.0, 0.0, steps + 1)[:-1]  # float32, like the reference
    # sigma = s u / (1 + (s - 1) u): shift 5 spends most of the grid at high noise
    sigmas = shift * u / (1 + (shift - 1) * u)
    return sigmas * 1000, sigmas  # (timesteps, sigmas), float32


def sampler_timesteps(step_list=(1000, 750, 500, 250), shift=5.0, warp=True):
    """Denoising timesteps of the few-step sampler and their sigmas (float32)."""
    grid, _ = flow_schedule(shift)
    ts = torch.tensor(step_list, dtype=torch.float32)
    if warp:  # the released pipeline's warp (pipeline/causal_inference.py:31-33)
        # t <- cat(grid, [0])[1000 - t]: [1000, 750, 500, 250] -> [1000, 937.5, 833.33, 625]
        ts = torch.cat([grid, torch.zeros(1)])[1000 - torch.tensor(step_list)]
    return ts, sigma_of(ts, shift)


def sigma_of(t, shift=5.0):
    """Sigma of the nearest grid timestep (every lookup in the reference goes through the grid)."""
    grid, sigmas = flow_schedule(shift)
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    return sigmas[(grid[None] - t[:, None].cpu()).abs().argmin(dim=1)]  # at the nearest grid t


def flow_to_x0(x_t, flow, t, shift=5.0):
    """x0 = x_t - sigma(t) * v, in float64 and cast back (the wrapper's conversion).

    x_t, flow: (B, F, C, H, W); t: (B, F) timesteps.
    """
    sig = sigma_of(t.reshape(-1), shift).double().to(x_t.device).view(*t.shape, 1, 1, 1)  # (B, F, 1, 1, 1)
    # x0 = x_t - sigma v, in float64 like the released wrapper (utils/wan_wrapper.py:254-278)
    return (x_t.double() - sig * flow.double()).to(flow.dtype)


def add_noise(x0, noise, sigma):
    """Forward process x_t = (1 - sigma) x0 + sigma eps (float32)."""
    return (1 - sigma) * x0 + sigma * noise


# ----------------------------------------------------------------------------------------------
# Noise sources

class GeneratorNoise:
    """Per-sample torch.Generators: sample i's noise depends on its own generator only.

    Draw order per block: the block's initial noise, then one re-noise per denoising step.
    """
    def __init__(self, generators, frame_shape, device="cpu", dtype=torch.float32):
        self.gens, self.shape, self.device, self.dtype = generators, tuple(frame_shape), device, dtype

    def _draw(self, n):
        # each sample from its own generator, on that generator's device: the noise is the same
        # whatever the batch it is drawn in, and only the result moves to the model's device
        return torch.stack([torch.randn((n, *self.shape), generator=g, device=g.device)
                            for g in self.gens]).to(self.device, self.dtype)  # (B, n, C, H, W)

    def initial(self, block, n):
        return self._draw(n)  # the block index is implicit: each generator's stream is in order

    def renoise(self, block, step, n):
        return self._draw(n)


class TensorNoise:
    """Stored noise: initial (B, F, C, H, W) and renoise (blocks, steps-1, B, n, C, H, W)."""
    def __init__(self, initial, renoise):
        self.init, self.re = initial, renoise

    def initial(self, block, n):
        return self.init[:, block * n:(block + 1) * n]  # (B, n, C, H, W): block's frames

    def renoise(self, block, step, n):
        return self.re[block, step]  # (B, n, C, H, W): the noise after denoising step `step`


def make_generators(seeds, device="cpu"):
    """One torch.Generator per sample, seeded e.g. by hash((seed, step, prompt, k))."""
    # any int (a negative --seed, Python's hash()) folded into [0, 2^63), which manual_seed takes
    return [torch.Generator(device).manual_seed(int(s) % (2 ** 63)) for s in seeds]


# ----------------------------------------------------------------------------------------------
# The sampler

@torch.no_grad()
def generate(model, context, cache: KVCache, num_frames, noise, start_frame=0,
             timesteps=None, shift=5.0, progress=False, on_block=None, keep=True, last_cache_pass=True):
    """Generate `num_frames` latent frames after those the cache already holds.

    context: (B, Lt, Dt) text embeddings; cache: a KVCache (empty, or holding a prefix that
    ends at start_frame); noise: GeneratorNoise / TensorNoise.
    on_block(k, x0_steps) is called after each block with the 4 per-step x0 (tests, fixtures).
    keep=False: only advance the cache (a streaming prefix), so memory does not grow with length.
    last_cache_pass=False: skip the last block's cache update, when nothing will read the cache
    again (the returned frames are the same: that pass writes K/V and returns nothing).
    returns: (B, num_frames, C, H, W) clean latents (None if keep=False)
    """
    n = model.cfg.frames_per_block
    if num_frames % n:
        raise ValueError(f"num_frames={num_frames} must be a multiple of the block size {n}")
    # default: the warped [1000, 937.5, 833.3, 625], sigmas [1, 0.9375, 0.8333, 0.625]
    ts, sig = sampler_timesteps(shift=shift) if timesteps is None else (timesteps, sigma_of(timesteps, shift))
    B = context.shape[0]
    out = []
    for k in tqdm(range(num_frames // n), desc="blocks", disable=not progress, leave=False):
        s = start_frame + k * n  # absolute start frame of block k: its RoPE positions, its slots
        x = noise.initial(k, n)  # (B, n, C, H, W)
        x0_steps = []
        for j, t_j in enumerate(ts):
            t = torch.full((B, n), float(t_j), device=x.device)  # float32 timesteps
            # x0 = x - sigma_j v(x, t_j): every step writes, and attends, the same slots of the cache
            x0 = flow_to_x0(x, model.forward_cached(x, t, context, cache, s), t, shift)
            x0_steps.append(x0)
            if j + 1 < len(ts):  # re-noise to the next level with fresh noise
                x = add_noise(x0, noise.renoise(k, j, n), sig[j + 1].to(x.device))
        # cache-update pass: the clean block at t = 0 overwrites this block's K/V
        if last_cache_pass or k + 1 < num_frames // n:
            # context_noise 0: x0 goes in as it is, at t = 0 (pipeline/causal_inference.py:214-223);
            # only its K/V are wanted, the flow it returns is not
            model.forward_cached(x0, torch.zeros(B, n, device=x.device), context, cache, s)
        if keep:
            out.append(x0)  # the 4th step's x0 is the block's output
        if on_block is not None:
            on_block(k, x0_steps)
    return torch.cat(out, dim=1) if keep else None  # (B, num_frames, C, H, W)


@torch.no_grad()
def recache(model, cache: KVCache, latents, context):
    """LongLive-style re-cache after a prompt switch: re-run the frames the cache holds (sink +
    recent, clean, t = 0) with the new prompt, so the history speaks the new prompt's language.

    latents: (B, F_total, C, H, W) every frame generated so far (index = absolute frame).
    """
    held, n = list(cache.frames), model.cfg.frames_per_block  # absolute frames: sink + recent
    cache.reset()  # the old prompt's text K/V go too
    runs = []  # regroup the held frames into their original blocks
    for f in held:
        # consecutive and in the same block: one call per block, at its own start (RoPE)
        if runs and runs[-1][-1] == f - 1 and runs[-1][0] // n == f // n:
            runs[-1].append(f)
        else:
            runs.append([f])
    for r in runs:
        x = latents[:, r[0]:r[-1] + 1]  # (B, len(r), C, H, W)
        # clean frames at t = 0, for their K/V: what the sampler's cache-update pass writes
        model.forward_cached(x, torch.zeros(x.shape[:2], device=x.device), context, cache, r[0])


@torch.no_grad()
def generate_multi_prompt(model, contexts, switch_frames, cache, num_frames, noise, progress=False):
    """Long video with prompt switches: contexts[i] is used from switch_frames[i-1] on.

    At each switch the text K/V are rebuilt and the self-attention cache is re-cached.
    """
    bounds = [0, *switch_frames, num_frames]  # segment i: frames [bounds[i], bounds[i + 1])
    n = model.cfg.frames_per_block
    if any(b % n for b in bounds) or bounds != sorted(bounds) or len(contexts) != len(bounds) - 1:
        raise ValueError("need one context per segment and block-aligned, increasing switch frames")
    out = []
    for i, ctx in enumerate(contexts):
        if i > 0:
            recache(model, cache, torch.cat(out, dim=1), ctx)  # also resets the text K/V
        # the noise picks up at the segment's first block: the same draws as one uninterrupted call
        out.append(generate(model, ctx, cache, bounds[i + 1] - bounds[i], _Offset(noise, bounds[i] // n),
                            start_frame=bounds[i], progress=progress))
    return torch.cat(out, dim=1)


class _Offset:
    """A noise source seen from block `k0` on (continuing a video in segments)."""
    def __init__(self, src, k0):
        self.src, self.k0 = src, k0

    def initial(self, block, n):
        return self.src.initial(self.k0 + block, n)

    def renoise(self, block, step, n):
        return self.src.renoise(self.k0 + block, step, n)


# ----------------------------------------------------------------------------------------------
# CLI: `python sample.py`. Its own needs (checkpoint files, the VAE and umT5, video files, the
# shapes world's toy text encoder) are imported inside main(): the sampler above runs with
# model.py, kvcache.py and lora.py alone (tests/test_copy_alone.py)

@dataclass
class Args:
    model: Literal["tiny", "wan-1.3b", "wan-14b"] = "tiny"
    """model size (CONFIGS in model.py)"""
    ckpt: Optional[str] = None
    """generator checkpoint (tiny default: assets/tiny_world.safetensors if present, else random;
    Wan: self_forcing_dmd.pt, causal_forcing.pt, longlive_base.pt, krea-...-14b.safetensors; a
    merged tuned generator from tools/merge_lora.py)"""
    lora: Optional[str] = None
    """LoRA applied on top: LongLive's lora.pt, a trained run's ckpt_*/lora folder, or a diffusers /
    ComfyUI-layout file (diffusion_model.* keys)"""
    vae: Optional[str] = None
    """Wan models: Wan2.1_VAE.pth or a Diffusers folder"""
    text_encoder: Optional[str] = None
    """Wan models: models_t5_umt5-xxl-enc-bf16.pth or a Diffusers folder"""
    tokenizer: Optional[str] = None
    """Wan models: the umT5 tokenizer folder (default: google/umt5-xxl beside the .pth)"""
    prompts: list[str] = field(default_factory=lambda: ["a red circle moving left"])
    """prompts; with --switch-frames, one per segment of a single long video"""
    switch_frames: list[int] = field(default_factory=list)
    """latent frames at which the prompt switches (block-aligned)"""
    num_frames: int = 21
    """latent frames to generate (multiple of the block size 3; Wan: 21 -> 81 video frames)"""
    height: Optional[int] = None
    """frame height in pixels (default: 32 tiny, 480 Wan)"""
    width: Optional[int] = None
    """frame width in pixels (default: 32 tiny, 832 Wan)"""
    local_attn: int = -1
    """rolling KV cache window in latent frames (-1: global cache; LongLive: 12)"""
    sink: int = 0
    """sink frames kept forever in a rolling cache (LongLive: 3)"""
    seed: int = 0
    """noise seed (sample i uses seed + i)"""
    out: str = "out/sample.mp4"
    """output video (.mp4, .mov, .mkv or .avi); several prompts: <name>_0.mp4, <name>_1.mp4, ..."""
    fps: int = 16
    """frames per second of the mp4"""
    ignore_memory_check: bool = False
    """go on when memory.py's predicted peak exceeds the memory this process can have (else: stop)"""


def write_decoded(path, vae, lat, block, fps=16):
    """Decode one video's latents (1, F, C, H, W) `block` latent frames at a time with the VAE's
    streaming decoder and append the frames to the mp4 as they come: a long video is never held
    in pixels. Returns the number of frames written."""
    from common import write_atomic
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return write_atomic(path, lambda tmp: _stream_to_mp4(tmp, vae, lat, block, fps))


def _stream_to_mp4(path, vae, lat, block, fps):
    import imageio.v2 as imageio
    from frozen import to_pixels
    stream, n = vae.stream(), 0  # a fresh causal-conv cache for this video
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, pixelformat="yuv420p",
                            macro_block_size=1) as w:
        for k in range(0, lat.shape[1], block):
            frames = to_pixels(stream.push(lat[:, k:k + block]))[0]  # (t, 3, 8H, 8W) in [0, 1]
            for f in (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():  # (8H, 8W, 3)
                w.append_data(f)
            n += len(frames)
    return n


# containers ffmpeg writes H.264 into (what save_video and write_decoded encode)
VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi")


def output_paths(args):
    """The file of each video: --out itself for one video, else <root>_<i><ext> (clip.mov ->
    clip_0.mov, clip_1.mov) for the videos of several prompts."""
    n = 1 if args.switch_frames else len(args.prompts)  # prompt switches make one video
    if n == 1:
        return [args.out]
    root, ext = os.path.splitext(args.out)
    return [f"{root}_{i}{ext}" for i in range(n)]


def check_sample_args(args):
    """Every problem with the flags, one line each, before anything loads."""
    from common import missing_files
    err = []
    if not args.prompts:
        err.append("--prompts: give at least one prompt")
    if args.fps < 1:
        err.append(f"--fps {args.fps}: must be >= 1")
    n = CONFIGS[args.model].frames_per_block
    tiny = args.model == "tiny"
    if args.num_frames < n or args.num_frames % n:  # the sampler makes whole blocks only
        err.append(f"--num-frames {args.num_frames}: must be a positive multiple of the block size {n}")
    if args.switch_frames:
        if len(args.prompts) != len(args.switch_frames) + 1:
            err.append(f"--switch-frames {args.switch_frames} makes {len(args.switch_frames) + 1} segments "
                       f"but {len(args.prompts)} --prompts were given: one prompt per segment")
        unaligned = [f for f in args.switch_frames if f % n]
        if unaligned:
            err.append(f"--switch-frames {unaligned}: not multiples of the block size {n}")
        if sorted(set(args.switch_frames)) != list(args.switch_frames):
            err.append(f"--switch-frames {args.switch_frames}: must be strictly increasing")
        outside = [f for f in args.switch_frames if not 0 < f < args.num_frames]
        if outside:
            err.append(f"--switch-frames {outside}: outside the video (0, {args.num_frames})")
    try:  # KVCache.for_model's own check, reported as a flag error before anything loads
        check_window(n, args.sink, args.local_attn)
    except ValueError as e:
        err.append(f"--local-attn {args.local_attn} --sink {args.sink}: {e}")
    side = 16 if not tiny else CONFIGS["tiny"].patch_size[1]  # pixels per token side
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and (value < side or value % side):
            err.append(f"--{flag} {value}: height and width must be positive multiples of {side} for "
                       f"--model {args.model}")
    if not tiny:  # the tiny model is pixel-space with toy text embeddings: no VAE, no umT5
        needed = [f"--{f.replace('_', '-')}" for f in ("ckpt", "vae", "text_encoder") if not getattr(args, f)]
        if needed:
            err.append(f"--model {args.model} needs {', '.join(needed)} (README, Real models)")
    absent = missing_files(args, ("ckpt", "lora", "vae", "text_encoder", "tokenizer"))
    if absent:  # all of them in one message, before minutes of loading
        err.append("not found: " + ", ".join(absent) + " (README, Real models)")
    if not args.out.strip():
        return err + ["--out '': give a file name ending in .mp4"]
    folder = os.path.dirname(os.path.abspath(args.out))
    while not os.path.exists(folder):  # the nearest existing folder must take the new file
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        err.append(f"--out {args.out}: cannot write into {folder}")
    if os.path.isdir(args.out):
        err.append(f"--out {args.out}: is a folder; give a file name ending in .mp4")
    elif os.path.splitext(args.out)[1].lower() not in VIDEO_EXTS:  # refused now, not after sampling
        err.append(f"--out {args.out}: not a video file name; end it in {', '.join(VIDEO_EXTS)}")
    folders = [p for p in output_paths(args)[1:] if os.path.isdir(p)]
    if folders:
        err.append(f"--out {args.out}: {folders[0]}, where a video of the {len(output_paths(args))} prompts "
                   f"goes, is a folder")
    return err


def main(args: Args):
    import memory
    from checkpoints import load_checkpoint
    from common import UsageError, find_file, save_video
    from frozen import TextEncoder, WanVAE, to_pixels
    from lora import set_adapter
    from model import CausalWanModel, randomize_head
    from tiny_world import toy_text_embed
    errors = check_sample_args(args)
    if errors:
        raise UsageError("\n".join(errors))
    torch.set_flush_denormal(True)  # CPU: denormal softmax tails make attention ~3x slower
    cfg, tiny = CONFIGS[args.model], args.model == "tiny"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32  # bf16 as the released pipeline
    multi = len(args.switch_frames) > 0
    prompts = args.prompts if not multi else args.prompts[:1]  # one video; its prompt changes
    # the predicted peak against the memory there is, before anything loads (latent size: tiny = pixels)
    hw = (args.height or 32, args.width or 32) if tiny else ((args.height or 480) // 8, (args.width or 832) // 8)
    need = memory.predict_sample(cfg, len(prompts), args.num_frames, hw, args.local_attn, dev == "cuda", not tiny,
                                 memory.file_bytes(find_file(args.text_encoder) if args.text_encoder else None))
    memory.fits(need, dev, ["fewer --prompts at once", "a rolling cache (--local-attn 12 --sink 3)",
                            "a smaller --num-frames, --height or --width"], args.ignore_memory_check)
    # each file as found: relative to the cwd, else to this repository (`assets/...` from anywhere)
    args = dataclasses.replace(args, **{f: find_file(getattr(args, f)) for f in ("ckpt", "lora", "vae", "text_encoder",
                                                                                   "tokenizer") if getattr(args, f)})
    if tiny:
        torch.manual_seed(args.seed)  # the random init (kept without a checkpoint) follows --seed
        model = CausalWanModel(cfg).eval()  # eval: inference only, no dropout anywhere anyway
        ckpt = args.ckpt or find_file("assets/tiny_world.safetensors")  # a given path must load
        if os.path.exists(ckpt):
            load_checkpoint(model, ckpt, lora=args.lora)
        else:
            randomize_head(model)  # the init's zero head would give one flat video
            print("no checkpoint: sampling from random weights")
        ctx = toy_text_embed(args.prompts, cfg.text_len, cfg.text_dim)  # the shapes world's toy encoder
        H, W = args.height or 32, args.width or 32  # pixel space
    else:
        te = TextEncoder.load(args.text_encoder, args.tokenizer, device=dev, dtype=dtype)
        ctx = te(args.prompts)  # (len(prompts), Lt, Dt) = (., 512, 4096) for umT5-XXL
        del te  # umT5-XXL leaves the GPU before the DiT arrives
        with torch.device("meta"):  # no random init: the checkpoint's tensors become the weights
            model = CausalWanModel(cfg)
        load_checkpoint(model, args.ckpt, lora=args.lora)
        model.to(dev, dtype).eval()
        H, W = (args.height or 480) // 8, (args.width or 832) // 8  # latent size
    if args.lora:  # load_checkpoint adds the LoRA as adapter "default" without activating it
        set_adapter(model, "default")
    ctx = ctx.to(dev, dtype)
    cache = KVCache.for_model(cfg, len(prompts), args.num_frames, (H, W), args.sink, args.local_attn, dtype, dev)
    # video i's noise from seed + i alone: adding prompts never changes the earlier videos
    noise = GeneratorNoise(make_generators([args.seed + i for i in range(len(prompts))]),
                           (cfg.in_dim, H, W), dev, dtype)
    if multi:
        # one (1, Lt, Dt) context per segment of the one video
        lat = generate_multi_prompt(model, [c[None] for c in ctx], [int(s) for s in args.switch_frames],
                                    cache, args.num_frames, noise, progress=True)
    else:
        # last_cache_pass=False: nothing reads the cache after the last block
        lat = generate(model, ctx, cache, args.num_frames, noise, progress=True, last_cache_pass=False)
    vae = None if tiny else WanVAE.load(args.vae, device=dev)  # after sampling: not part of its peak
    for i, path in enumerate(output_paths(args)):  # one distinct file per video
        if tiny:
            save_video(path, to_pixels(lat[i]), args.fps)
            n, size = args.num_frames, f"{H}x{W}"
        else:
            n, size = write_decoded(path, vae, lat[i:i + 1].float(), cfg.frames_per_block, args.fps), f"{8 * H}x{8 * W}"
        print(f"wrote {path} ({n} frames, {size})")


if __name__ == "__main__":
    import tyro
    from common import run_cli
    # flags, files, folders: one line each, exit 2
    run_cli(main, functools.partial(tyro.cli, Args), (ValueError, OSError), "interrupted: no video written")
