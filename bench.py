"""
Speed and memory of the pieces that cost: AR rollout through the KV cache, and the block-causal
training forward (+ backward). Numbers here, never in tests. The "bench" size (SIZES: dim 768,
4 layers, a 30x52 latent) is a Wan-shaped model a 2-core CPU can run, so the numbers can be set
beside those of the released code run the same way (float32, B = 1, 2 threads).

    python bench.py rollout              tiny + bench sizes, global and rolling cache
    python bench.py train                bench size, forward and forward+backward, 21 frames
    python bench.py update               one NFT update (3 forwards, 1 backward) vs one plain
                                         flow-matching step on the same batch (LoRA rank 64)
    python bench.py streaming --json s.json   one streaming RL step (window 21, last) per video
                                         length, tiny model, 32x32, rolling cache 12 / sink 3,
                                         vs back-propagating through the whole video
    python bench.py rollout --sizes wan-1.3b --device cuda     (the real size, on a GPU)
    python bench.py gpu                  the real 1.3B (--size wan-14b) at 480x832, 21 latent
                                         frames, random bf16 weights: rollout frames/s, one NFT
                                         update (LoRA r 256) with and without activation
                                         checkpointing: time, peak memory, MFU (skipped
                                         without CUDA; --device cpu --size tiny: a smoke run)

Every case runs in a fresh subprocess; peak memory is the RSS growth over the value just before
the measured call (CPU), or torch.cuda.max_memory_allocated growth (GPU).

Shape legend: B batch, F latent frames, C channels, H, W latent size.
"""
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import tyro

import memory
import streaming
import train
from common import peak_growth, reset_peak, write_atomic
from kvcache import KVCache
from lora import adapter_names, adapter_params, add_adapter, use_adapter
from model import CONFIGS, CausalWanModel, attention_plan, init_materialized
from sample import GeneratorNoise, generate, make_generators

# "bench": Wan's shape at half the width and 4 layers, small enough for a 2-core CPU (8190 tokens
# in 21 frames of 30x52 latents); "small": a cheaper one for the memory dry runs
SIZES = dict(CONFIGS, bench=replace(CONFIGS["wan-1.3b"], dim=768, ffn_dim=3072, num_heads=6, num_layers=4),
             small=replace(CONFIGS["wan-1.3b"], dim=384, ffn_dim=1536, num_heads=3, num_layers=2))
LATENT = {"tiny": (64, 64), "bench": (30, 52), "wan-1.3b": (60, 104), "wan-14b": (60, 104)}
STREAM_HW = (32, 32)  # frame size of the streaming bench
GPU_HW = {"tiny": (32, 32)}  # latent size of `gpu --size tiny` (a CPU smoke run); else LATENT


@dataclass
class Args:
    what: tyro.conf.Positional[Literal["rollout", "train", "update", "streaming", "gpu", "memory",
                                       "realsize"]] = "rollout"
    """rollout: AR sampling (global and rolling cache); train: block-causal forward / +backward;
    update: an NFT update vs a flow-matching step; streaming: one RL step per video length;
    gpu: the real size on one GPU (rollout, NFT update with/without checkpointing, MFU);
    memory: one RL step's measured peak next to memory.py's prediction, and every preset's
    prediction; realsize: the full wan-1.3b through the self-forcing preset, small frames, CPU"""
    lengths: list[int] = field(default_factory=lambda: [21, 42, 84, 168, 240])
    """video lengths (latent frames) of the streaming bench; the window is 21"""
    frames: int = 21
    """latent frames of the train / update cases"""
    sizes: list[str] = field(default_factory=lambda: ["tiny", "bench"])
    """model sizes to measure (tiny, bench, wan-1.3b, wan-14b)"""
    device: str = ""
    """cpu or cuda (default: cuda for gpu, cpu for the rest)"""
    size: str = "wan-1.3b"
    """model size of the gpu bench (wan-1.3b, wan-14b; tiny for a CPU smoke run)"""
    lora_rank: int = 256
    """LoRA rank of the gpu bench's adapters (Astrolabe: 256)"""
    batch: int = 1
    """samples per NFT update in the gpu bench (one micro-batch)"""
    peak_tflops: float = 989.4
    """the GPU's peak dense bf16 TFLOP/s, for MFU (H100 SXM: 989.4; H200 the same)"""
    vae: bool = True
    """gpu bench: also time decoding the 21 latents with a random-weight Wan2.1 VAE (diffusers)"""
    threads: int = 2
    """torch CPU threads (the reference numbers used 2)"""
    repeats: int = 1
    """fresh-process repeats per case; the median is reported"""
    json: str = ""
    """also write the results to this JSON file"""
    case: str = ""
    """(internal) run one case in this process and print its JSON"""
    keep: bool = False
    """realsize: keep the random files it writes (in /tmp) for another run"""


def run_case(args, spec):
    """spec = 'rollout:<size>:<frames>:<local>:<sink>', 'train:<size>:<frames>:<backward>' or
    'update:<size>:<frames>:<nft|fm>'."""
    kind, size, frames, *rest = spec.split(":")
    frames = int(frames)
    torch.set_num_threads(args.threads)
    # CPU: tiny softmax tails become denormal floats, which x86 handles ~100x slower; flushing
    # them to zero changes nothing measurable and made late rollout blocks 3x faster here
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    cfg, dev = SIZES[size], args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = random_model(cfg, dev, dtype)
    H, W = LATENT[size]
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, dtype=dtype)
    out = {"case": spec, "size": size, "frames": frames, "device": dev}
    if kind == "rollout":
        local, sink = int(rest[0]), int(rest[1])
        model.eval()
        cache = KVCache.for_model(cfg, 1, frames, (H, W), sink, local, dtype, dev)
        noise = GeneratorNoise(make_generators([0], dev), (cfg.in_dim, H, W), dev, dtype)
        times = []
        n = cfg.frames_per_block

        def tick(k, _):
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())
        base = reset_peak(dev)
        t0 = time.perf_counter()
        generate(model, ctx, cache, frames, noise, on_block=tick)
        total = time.perf_counter() - t0
        per_block = [b - a for a, b in zip([t0] + times[:-1], times)]
        out.update(local=local, sink=sink, seconds=total, latent_fps=frames / total,
                   block_s=per_block, kv_cache_mb=cache.nbytes() / 2 ** 20,
                   peak_mem_mb=peak_growth(dev, base))
    elif kind == "update":
        out.update(mode=rest[0], **update_step(model, rest[0], frames, (H, W), ctx, dev))
    elif kind == "naive":  # back-propagate through the whole video (streaming bench's contrast)
        out.update(update_step(model, "fm", frames, STREAM_HW, ctx, dev, local=12, sink=3))
    else:
        backward = rest[0] == "1"
        g = torch.Generator(dev).manual_seed(0)
        x = torch.randn(1, frames, cfg.in_dim, H, W, generator=g, device=dev, dtype=dtype)
        t = torch.full((1, frames), 500.0, device=dev)
        model.requires_grad_(backward)
        base = reset_peak(dev)
        t0 = time.perf_counter()
        with torch.set_grad_enabled(backward):
            y = model(x, t, ctx)
            if backward:
                y.float().pow(2).mean().backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        out.update(backward=backward, seconds=time.perf_counter() - t0,
                   peak_mem_mb=peak_growth(dev, base))
    return out


def random_model(cfg, dev, dtype):
    """Random weights straight on the device (meta first: no CPU copy of a 14B model)."""
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    model = model.to_empty(device=dev)
    init_materialized(model)  # to_empty leaves garbage: every parameter initialised
    return model.to(dtype)


def update_step(model, mode, frames, hw, ctx, dev, local=-1, sink=0, rank=64, B=2, ref=None):
    """One NFT update as train.py runs it (train.nft_microbatch: old and ref predictions without
    grad, theta with grad, the loss, then backward), or for contrast one plain flow-matching step
    (theta forward + backward) on the same batch. ref: "ref" for the reference adapter of
    --selective, None for the base model (train.py's standard mode)."""
    cfg = model.cfg
    model.requires_grad_(False)
    for name in ("default", "old") + (() if ref is None else (ref,)):
        if name not in adapter_names(model):
            add_adapter(model, name, rank=rank)
    for p in adapter_params(model, "default"):
        p.requires_grad_(True)
        p.grad = None
    args = train.Args(model="tiny", local_attn=local, sink=sink, selective=ref is not None,
                      window_context="noisy", micro_batch=B)
    g = torch.Generator(dev).manual_seed(0)
    x0 = torch.randn(B, frames, cfg.in_dim, *hw, generator=g, device=dev)
    c = ctx.expand(B, -1, -1)
    r = torch.rand(B, generator=g, device=dev)  # optimality probabilities: any values will do
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev == "cuda")
    base = reset_peak(dev)
    t0 = time.perf_counter()
    if mode == "nft":
        loss, _ = train.nft_microbatch(model, args, x0=x0, ctx=c, r=r, kl_mask=torch.ones(B, dtype=torch.bool),
                                       step=0, j0=0, start=0, history=None, autocast=autocast)
    else:  # flow matching: || v_theta(x_t, t) - (eps - x0) ||^2 at one noise level
        eps = torch.randn(x0.shape, generator=g, device=dev)
        x_t = (1 - 0.625) * x0 + 0.625 * eps
        t = torch.full((B, frames), 625.0, device=dev)
        with autocast, use_adapter(model, "default"):
            loss = (model(x_t, t, c).float() - (eps - x0)).pow(2).mean()
    loss.backward()
    if dev == "cuda":
        torch.cuda.synchronize()
    return dict(seconds=time.perf_counter() - t0, peak_mem_mb=peak_growth(dev, base))


# ----------------------------------------------------------------------------------------------
# Model FLOPs of one training call, for MFU. Only matmuls count (what torch's FlopCounterMode
# counts too): every Linear, the patch Conv3d (a matmul over patches), attention's q k^T and p v;
# 2 FLOPs per multiply-add. Norms, RoPE, softmax, GELU and adaLN are elementwise (< 1% here).
# A linear on m rows, k -> n features:
#     forward 2mkn;  backward dX 2mkn (if its input needs a gradient) + dW 2mkn (if trained)
# plus, with a trained LoRA adapter of rank r (y += B A x):
#     forward 2mr(k + n);  backward dB 2mrn + d(Ax) 2mrn + dA 2mkr + dX 2mkr (if input needs it)
# Attention of q query tokens against the k keys they see: forward 4qk Dm (scores, values),
# backward 8qk Dm (dQ, dK, dP, dV); q k summed over the block-causal plan (causality and the
# window skip key blocks: 21 frames in blocks of 3 see 4/7 of the full square).
# The base is frozen in the NFT update, so its linears need dX but no dW: at 1.3B, 480x832, 21
# frames the backward is 1.6x the forward (attention, half the forward, still costs 2x), not
# the 2x of full training ("6 N D") that MFU is usually quoted with; bench prints both.

def train_flops(cfg, frames, hw, batch=1, lora_rank=0, base_grad=False, start_frame=0, local=-1,
                sink=0, history=(), teacher_forcing=False):
    """(forward, backward) FLOPs of model(x, t, ctx) on (batch, frames, C, *hw) latents with a
    trained LoRA adapter of rank `lora_rank` active (0: none) and the base weights trained or
    frozen; history: the frames of a history cache (start_frame, local, sink as the forward)."""
    D, Lt, p = cfg.dim, cfg.text_len, cfg.patch_size[1] * cfg.patch_size[2]
    P = hw[0] * hw[1] // p  # tokens per frame
    nf = frames * (2 if teacher_forcing else 1)  # teacher forcing: [clean ; noisy] frames
    N = batch * nf * P  # token rows through every block
    trained = base_grad or lora_rank > 0
    flops = [0, 0]  # forward, backward

    def linear(m, k, n, x_grad, r=0):
        flops[0] += 2 * m * k * n + 2 * m * r * (k + n)
        flops[1] += 2 * m * k * n * (x_grad + base_grad) + 2 * m * r * (2 * n + k + k * x_grad)

    # embeddings: patches (from x), text MLP (from the raw context), time MLPs (from sinusoids)
    linear(N, cfg.in_dim * p, D, False)
    linear(batch * Lt, cfg.text_dim, D, False), linear(batch * Lt, D, D, base_grad)
    rows = batch * nf
    linear(rows, cfg.freq_dim, D, False), linear(rows, D, D, base_grad), linear(rows, D, 6 * D, base_grad)
    # sum over query blocks of (query tokens) x (keys they see), history keys included
    plan = attention_plan(frames, P, cfg.frames_per_block, start_frame, local, sink, history, teacher_forcing)
    qk = batch * sum((qhi - qlo) * sum(hi - lo for lo, hi in runs) for (qlo, qhi), runs in plan)
    # the last block computes only what the head reads: with teacher forcing the noisy half
    clean = frames * P if teacher_forcing else 0  # query tokens the last block skips, per video
    qk_last = batch * sum((qhi - qlo) * sum(hi - lo for lo, hi in runs) for (qlo, qhi), runs in plan
                          if qlo >= clean)
    r = lora_rank
    for i in range(cfg.num_layers):
        last = i == cfg.num_layers - 1
        Nq, qk_i = (N - batch * clean, qk_last) if last else (N, qk)  # tokens past their K and V
        # block 0's input comes from frozen embeddings: no gradient unless the base is trained
        x_grad = base_grad or (trained and i > 0)
        linear(Nq, D, D, x_grad, r)  # self-attention q
        for _ in range(2):  # k, v of every token
            linear(N, D, D, x_grad, r)
        linear(Nq, D, D, trained, r)  # o
        flops[0] += 4 * qk_i * D
        flops[1] += 8 * qk_i * D * trained
        linear(Nq, D, D, trained, r), linear(Nq, D, D, trained, r)  # cross-attention q, o
        for _ in range(2):  # cross-attention k, v of the text tokens (context: no gradient)
            linear(batch * Lt, D, D, base_grad, r)
        flops[0] += 4 * Nq * Lt * D
        flops[1] += 8 * Nq * Lt * D * trained
        linear(Nq, D, cfg.ffn_dim, trained, r), linear(Nq, cfg.ffn_dim, D, trained, r)  # FFN
    linear(batch * frames * P, D, p * cfg.out_dim, trained)  # head (the noisy half only)
    return flops[0], flops[1]


def gpu_bench(args):
    """The real size on one GPU with random weights: (a) 4-step AR rollout on a global cache,
    latent and video frames/s; (b) one NFT update as train.py runs it (LoRA default / old / ref,
    x_theta with grad, x_old and x_ref without, nft_loss, backward), with and without activation
    checkpointing: time and peak memory; (c) its MFU from train_flops."""
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("bench.py gpu: no CUDA device, skipped (--device cpu --size tiny runs a smoke test)")
        return {}
    cuda = dev == "cuda"
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    cfg, F, dtype = SIZES[args.size], args.frames, torch.bfloat16 if cuda else torch.float32
    H, W = GPU_HW.get(args.size, LATENT[args.size])
    ph, pw = cfg.patch_size[1:]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = random_model(cfg, dev, dtype).eval()
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, dtype=dtype)  # 512 text tokens
    name = torch.cuda.get_device_name() if cuda else "cpu"
    out = dict(size=args.size, device=name, frames=F, latent_hw=(H, W), batch=args.batch,
               lora_rank=args.lora_rank, dtype=str(dtype))
    px = "" if args.size == "tiny" else f" = {H * 8}x{W * 8} px"  # the VAE's 8x; tiny is pixel-space
    print(f"gpu bench: {args.size} ({str(dtype)[6:]}, random weights) on {name}, {F} latent frames "
          f"{H}x{W}{px}, {F * H * W // (ph * pw)} tokens, B {args.batch}", flush=True)

    # ---- (a) rollout: the 4-step AR sampler, global cache, B = 1
    noise = GeneratorNoise(make_generators([0], dev), (cfg.in_dim, H, W), dev, dtype)
    if cuda:  # warm-up: kernel loading and cuBLAS heuristics out of the timed run
        generate(model, ctx, KVCache.for_model(cfg, 1, 3, (H, W), dtype=dtype, device=dev), 3, noise)
    cache = KVCache.for_model(cfg, 1, F, (H, W), dtype=dtype, device=dev)
    sync()
    t0 = time.perf_counter()
    lat = generate(model, ctx, cache, F, noise)
    sync()
    sec = time.perf_counter() - t0
    video = 4 * (F - 1) + 1  # the VAE's 4x temporal upsampling: 21 latents -> 81 frames
    out.update(rollout_s=sec, latent_fps=F / sec, video_fps_dit=video / sec,
               kv_cache_mb=cache.nbytes() / 2 ** 20)
    print(f"rollout  4-step AR, global cache: {sec:7.2f} s  {F / sec:6.2f} latent frames/s = "
          f"{video / sec:6.2f} video frames/s ({video} frames; DiT only, no VAE decode)  KV cache "
          f"{out['kv_cache_mb']:.0f} MiB", flush=True)
    del cache
    if args.vae and args.size != "tiny":  # the tiny model is pixel-space: nothing to decode
        try:  # the Wan2.1 VAE's architecture with random weights, float32 and streamed block by
            # block as sample.py writes videos (frozen.WanVAE)
            from diffusers import AutoencoderKLWan
            from frozen import WanVAE
            vae = WanVAE(AutoencoderKLWan().to(dev).eval())
            with torch.no_grad():
                vae.stream().push(lat[:, :3])  # warm-up
                sync()
                t0 = time.perf_counter()
                stream, n = vae.stream(), 0
                for k in range(0, F, 3):
                    n += stream.push(lat[:, k:k + 3]).shape[1]  # (B, t, 3, 8H, 8W)
                sync()
            dec = time.perf_counter() - t0
            out.update(vae_decode_s=dec, video_fps=n / (sec + dec))
            print(f"vae      streaming decode {F} -> {n} frames: {dec:6.2f} s (random-weight Wan2.1 VAE, "
                  f"float32); rollout + decode {n / (sec + dec):6.2f} video frames/s", flush=True)
            del vae
        except Exception as e:  # diffusers missing or out of memory: the DiT numbers stand alone
            out["vae_decode"] = f"skipped: {type(e).__name__}: {str(e)[:200]}"
            print(f"vae      {out['vae_decode']}", flush=True)
    del lat
    if cuda:
        torch.cuda.empty_cache()

    # ---- (b) one NFT update, (c) its MFU
    model.train()
    fwd, bwd = train_flops(cfg, F, (H, W), args.batch, args.lora_rank)  # x_theta: LoRA, frozen base
    total = 3 * fwd + bwd  # x_old, x_ref (both LoRA adapters) and x_theta forwards + one backward
    out.update(update_tflop=total / 1e12, fwd_tflop=fwd / 1e12, bwd_tflop=bwd / 1e12)
    lora_share = 1 - train_flops(cfg, F, (H, W), args.batch)[0] / fwd
    print(f"update   NFT model FLOPs: 3 forwards x {fwd / 1e12:.3g} + backward {bwd / 1e12:.3g} = "
          f"{total / 1e12:.3g} TFLOP (LoRA r {args.lora_rank}: {lora_share:.1%} of a forward)", flush=True)
    for ckpt in (True, False):  # checkpointed first: without it the real size may not fit
        model.grad_checkpointing = ckpt
        key = "ckpt" if ckpt else "no_ckpt"
        try:
            if cuda:  # warm-up step
                update_step(model, "nft", F, (H, W), ctx, dev, rank=args.lora_rank, B=args.batch, ref="ref")
            r = update_step(model, "nft", F, (H, W), ctx, dev, rank=args.lora_rank, B=args.batch, ref="ref")
        except torch.OutOfMemoryError as e:
            out[key] = dict(oom=str(e)[:200])
            print(f"update   checkpointing {'on ' if ckpt else 'off'}: out of memory", flush=True)
        else:
            peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
            # MFU = model FLOPs / time / peak FLOP/s; recomputation is not model work, so it
            # lowers MFU (its FLOPs would count in the hardware utilisation, HFU)
            mfu = total / r["seconds"] / (args.peak_tflops * 1e12)
            mfu_2x = (3 * fwd + 2 * fwd) / r["seconds"] / (args.peak_tflops * 1e12)
            out[key] = dict(r, peak_total_mb=peak, mfu=mfu, mfu_bwd_2x=mfu_2x)
            mem = (f"peak {peak / 1024:.2f} GiB allocated (+{r['peak_mem_mb'] / 1024:.2f} over weights "
                   f"and adapters)" if cuda else f"peak RSS +{r['peak_mem_mb']:.0f} MiB (one process: rough)")
            print(f"update   checkpointing {'on ' if ckpt else 'off'}: {r['seconds']:7.2f} s  {mem}  MFU "
                  f"{mfu:.1%} (backward counted as 2x forward: {mfu_2x:.1%}; of {args.peak_tflops:g} "
                  f"TFLOP/s)", flush=True)
        for p in adapter_params(model, "default"):
            p.grad = None
        if cuda:
            torch.cuda.empty_cache()
    model.grad_checkpointing = False
    return out


def write_json(path, results):
    """Results to `path` (if given), through a temp file so a crash leaves no half file."""
    if path:
        write_atomic(path, lambda tmp: _dump(tmp, results))


def _dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def subprocess_json(cmd, env=None):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)), env=env)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def streaming(args):
    """One full streaming RL step per video length (a fresh train.py process each): the window is
    always the last 21 frames, so the history before it grows with the length; memory must not."""
    import tempfile
    rows = []
    print(f"{'frames':>6} {'rollout s':>10} {'update s':>9} {'step peak MiB':>14} | "
          f"{'naive fwd+bwd s':>15} {'naive peak MiB':>14}")
    for n in args.lengths:
        with tempfile.TemporaryDirectory() as out:
            subprocess_json([sys.executable, "train.py", "--steps", "1", "--num-frames", str(n), "--window", "21",
                             "--window-select", "last", "--local-attn", "12", "--sink", "3", "--height", str(STREAM_HW[0]),
                             "--width", str(STREAM_HW[1]), "--prompts-per-step", "1", "--group-size", "2",
                             "--micro-batch", "2", "--eval-every", "0", "--ckpt-every", "0", "--no-progress",
                             "--out-dir", out])
            with open(os.path.join(out, "metrics.jsonl")) as f:
                m = json.loads(f.readlines()[-1])
        naive = json.loads(subprocess_json([sys.executable, __file__, "--case", f"naive:tiny:{n}",
                                            "--threads", str(args.threads)]).strip().splitlines()[-1])
        rows.append({"frames": n, "peak_mem_mb": m["mem/peak_mb"], "update_s": m["time/update_s"],
                     "rollout_s": m["time/rollout_s"], "naive_peak_mem_mb": naive["peak_mem_mb"],
                     "naive_s": naive["seconds"]})
        r = rows[-1]
        print(f"{n:6d} {r['rollout_s']:10.2f} {r['update_s']:9.2f} {r['peak_mem_mb']:14.1f} | "
              f"{r['naive_s']:15.2f} {r['naive_peak_mem_mb']:14.1f}", flush=True)
    print(f"peak memory longest / shortest: streaming {rows[-1]['peak_mem_mb'] / rows[0]['peak_mem_mb']:.3f}, "
          f"naive {rows[-1]['naive_peak_mem_mb'] / rows[0]['naive_peak_mem_mb']:.2f}")
    return rows


# ----------------------------------------------------------------------------------------------
# Random Wan files in the real layouts, for dry runs of train.py (nothing is downloaded)

def write_random_generator(path, cfg, seed=0):
    """A random DiT of config `cfg` saved as a Self-Forcing checkpoint ({"generator_ema": ...},
    keys prefixed "model.", bf16 as released), for train.py --ckpt."""
    torch.manual_seed(seed)
    m = random_model(cfg, "cpu", torch.bfloat16)
    torch.save({"generator_ema": {"model." + k: v for k, v in m.state_dict().items()}}, path)


def word_tokenizer(folder, words):
    """A word-level stand-in for google/umt5-xxl's tokenizer, saved as the real one is: pad <pad> =
    0, EOS </s> = 1 appended by the post-processor ("$A </s>", as T5's), unk = 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def write_random_frozen(folder, text_dim):
    """A Diffusers-layout folder (vae/, text_encoder/, tokenizer/): the full Wan2.1 VAE with random
    weights and a one-layer umT5 of width `text_dim` (the real one is 24 layers: its 11 GB are
    freed before the DiT loads, so they never meet the step's peak)."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(0)
    AutoencoderKLWan().save_pretrained(os.path.join(folder, "vae"))
    t5 = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=text_dim, d_kv=64, d_ff=256, num_layers=1, num_heads=4,
                                     feed_forward_proj="gated-gelu"))
    t5.save_pretrained(os.path.join(folder, "text_encoder"))
    word_tokenizer(os.path.join(folder, "tokenizer"), "a fox in the snow cat".split())


class LatentParts:
    """Stand-ins for umT5 and the VAE in the memory dry runs: fixed random text rows of the model's
    width, and the first 3 latent channels shown as pixels, so the rewards run at latent size and
    the DiT's step is all that is measured (memory.predict(..., decode=False))."""
    def __init__(self, args, prompts, device):
        self.cfg, self.device = CONFIGS[args.model], device

    def embed(self, prompts):
        g = torch.Generator().manual_seed(0)
        return torch.randn(len(prompts), self.cfg.text_len, self.cfg.text_dim, generator=g).to(self.device)

    def decode(self, lat):
        return ((lat[:, :, :3].float() + 1) / 2).clamp(0, 1)


# (name, size, latent H x W, frames, window, cache window, sink, grad checkpointing)
MEMORY_CASES = [
    ("bench 30x52 F6 s=0", "bench", (30, 52), 6, 6, -1, 0, False),
    ("bench 30x52 F6 s=0 ckpt", "bench", (30, 52), 6, 6, -1, 0, True),
    ("bench 30x52 F9 s=6 rolling", "bench", (30, 52), 9, 3, 6, 3, False),
    ("bench 30x52 F9 s=6 rolling ckpt", "bench", (30, 52), 9, 3, 6, 3, True),
    ("small 20x36 F12 s=0", "small", (20, 36), 12, 12, -1, 0, False),
    ("small 20x36 F12 s=0 ckpt", "small", (20, 36), 12, 12, -1, 0, True),
    ("small 20x36 F12 s=6", "small", (20, 36), 12, 6, -1, 0, False),
    ("small 20x36 F12 s=6 ckpt", "small", (20, 36), 12, 6, -1, 0, True),
]


def memory_case_args(case, ckpt_file, out):
    """train.py's self-forcing preset at a case's size: 1 prompt x 2 videos, one step."""
    _, size, (h, w), F, T, local, sink, gc = case
    return replace(train.PRESETS["self-forcing"], ckpt=ckpt_file, vae=None, text_encoder=None, height=8 * h, width=8 * w, num_frames=F,
                   window=T, window_select="last", local_attn=local, sink=sink, grad_checkpointing=gc,
                   prompts=["a fox in the snow"], prompts_per_step=1, group_size=2, micro_batch=1,
                   rewards=["colorfulness=1"], lora_rank=64, lora_alpha=64.0, steps=1, eval_every=0,
                   bf16="off", progress=False, out_dir=out)


def live_tensor_mb():
    """MiB held by every tensor alive now (each storage once): what a GPU allocator would hold."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2 ** 20


def memory_case(index, ckpt_file):
    """(in a fresh process) one RL step of a MEMORY_CASES entry: measured peak next to predicted.
    Measured = the tensors alive when the step starts (counted) + the step's RSS growth over that
    start, so the process's own non-tensor memory (libraries, allocator, Python) is not counted,
    as a GPU's allocated counter would not count it."""
    import tempfile
    case = MEMORY_CASES[index]
    CONFIGS["wan-1.3b"] = SIZES[case[1]]  # the self-forcing preset's path at this size
    train.FrozenParts = LatentParts  # latents stand in for pixels: the DiT's step alone
    at_start = []

    def reset_peak_counting(device):  # train.py's probe, plus a count of the live tensors
        at_start.append(live_tensor_mb())
        return reset_peak(device)
    train.reset_peak = reset_peak_counting
    with tempfile.TemporaryDirectory() as out:
        args = memory_case_args(case, ckpt_file, out)
        train.main(args)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            row = [json.loads(line) for line in f][-1]
    pred = memory.predict(args, SIZES[case[1]], start=max(streaming.window_starts(args)), decode=False)
    return {"name": case[0], "measured_mb": at_start[-1] + row["mem/peak_mb"], "predicted_mb": pred["peak"] / 2 ** 20,
            "rss_total_mb": row["mem/total_mb"],
            "step_s": row["time/step_s"], "terms_mb": {k: v / 2 ** 20 for k, v in pred.items()}}


def memory_bench(args):
    """Every MEMORY_CASES entry in a fresh process, with glibc's mmap threshold fixed at 64 KiB so
    that a freed tensor leaves RSS at once: RSS then follows the live tensor bytes, the number
    CUDA's allocator reports (by default glibc keeps freed heap pages, so RSS only ever grows).
    Then the prediction for every preset at its real size."""
    import tempfile
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for size in sorted({c[1] for c in MEMORY_CASES}):
            files[size] = os.path.join(tmp, f"{size}.pt")
            write_random_generator(files[size], SIZES[size])
        for i, case in enumerate(MEMORY_CASES):
            out = subprocess_json([sys.executable, __file__, "--case", f"memory:{i}:{files[case[1]]}"], env=env)
            r = json.loads(out.strip().splitlines()[-1])
            cases.append(r)
            print(f"{r['name']:34s} measured {r['measured_mb']:8.0f} MiB  predicted {r['predicted_mb']:8.0f} MiB  "
                  f"({r['predicted_mb'] / r['measured_mb'] - 1:+.1%})  step {r['step_s']:.0f} s", flush=True)
    presets = []
    for name, preset in train.PRESETS.items():
        cfg = CONFIGS[preset.model]
        pred = memory.predict(preset, cfg, start=max(streaming.window_starts(preset)), bf16=preset.model != "tiny")
        presets.append({"name": name, "predicted_gb": pred["peak"] / memory.GB})
        print(f"preset {name:15s} predicted {memory.summary(pred)}", flush=True)
    return {"cases": cases, "presets": presets}


def realsize(args):
    """The full wan-1.3b (1.42 B parameters, LoRA rank 256 on every block linear: 0.35 B per
    adapter) through train.py's self-forcing preset, float32 on the CPU: random generator in the
    Self-Forcing layout, random full Wan2.1 VAE, a one-layer umT5; 64x64 pixels, 6 latent frames,
    1 prompt x 2 videos, one RL step end to end. Measured peak (RSS) next to the memory model."""
    import tempfile
    folder = os.path.join(tempfile.gettempdir(), "astrolabe_realsize")
    os.makedirs(folder, exist_ok=True)
    gen = os.path.join(folder, "self_forcing_random.pt")
    cfg = CONFIGS["wan-1.3b"]
    t0 = time.perf_counter()
    if not os.path.exists(gen):
        write_random_generator(gen, cfg)
        write_random_frozen(folder, cfg.text_dim)
    print(f"random files in {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = os.path.join(folder, "run")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "train.py", "self-forcing", "--ckpt", gen, "--vae", folder, "--text-encoder", folder,
           "--height", "64", "--width", "64", "--num-frames", "6", "--prompts", "a fox in the snow",
           "--prompts-per-step", "1", "--group-size", "2", "--steps", "1", "--eval-every", "0",
           "--rewards", "colorfulness=1", "--bf16", "off", "--no-progress", "--out-dir", out]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    log = subprocess_json(cmd, env=env)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        row = [json.loads(line) for line in f][-1]
    a = replace(train.PRESETS["self-forcing"], height=64, width=64, num_frames=6, prompts_per_step=1, group_size=2,
                eval_every=0, rewards=["colorfulness=1"], bf16="off")
    pred = memory.predict(a, cfg)
    res = {"measured_mb": row["mem/total_mb"], "predicted_mb": pred["peak"] / 2 ** 20, "step_s": row["time/step_s"],
           "rollout_s": row["time/rollout_s"], "update_s": row["time/update_s"], "wall_s": wall,
           "terms_mb": {k: v / 2 ** 20 for k, v in pred.items()}}
    print("\n".join(line for line in log.splitlines() if line.startswith(("memory", "step", "1 rank"))))
    print(f"realsize wan-1.3b: step {res['step_s']:.0f} s (rollout {res['rollout_s']:.0f}, update "
          f"{res['update_s']:.0f}), whole run {wall:.0f} s; peak {res['measured_mb'] / 1024:.2f} GiB measured, "
          f"{res['predicted_mb'] / 1024:.2f} GiB predicted ({res['predicted_mb'] / res['measured_mb'] - 1:+.1%})")
    if not args.keep:
        shutil.rmtree(folder)
    return res


def main(args: Args):
    args = replace(args, device=args.device or ("cuda" if args.what == "gpu" else "cpu"))
    if args.case.startswith("memory:"):
        _, index, ckpt_file = args.case.split(":", 2)
        print(json.dumps(memory_case(int(index), ckpt_file)))
        return
    if args.case:
        print(json.dumps(run_case(args, args.case)))
        return
    if args.what == "memory":
        return write_json(args.json, memory_bench(args))
    if args.what == "realsize":
        return write_json(args.json, realsize(args))
    if args.what == "streaming":
        return write_json(args.json, streaming(args))
    if args.what == "gpu":
        return write_json(args.json, gpu_bench(args))
    specs = []
    for size in args.sizes:
        if args.what == "rollout":  # 21 frames on a global cache; 42 on LongLive's rolling cache
            specs += [f"rollout:{size}:21:-1:0", f"rollout:{size}:42:12:3"]
        elif args.what == "train":
            specs += [f"train:{size}:{args.frames}:0", f"train:{size}:{args.frames}:1"]
        else:
            specs += [f"update:{size}:{args.frames}:fm", f"update:{size}:{args.frames}:nft"]
    results = []
    for spec in specs:
        runs = []
        for _ in range(args.repeats):
            out = subprocess_json([sys.executable, __file__, "--case", spec, "--device", args.device,
                                   "--threads", str(args.threads)])
            runs.append(json.loads(out.strip().splitlines()[-1]))
        res = dict(runs[len(runs) // 2], seconds=statistics.median(x["seconds"] for x in runs),
                   seconds_all=[x["seconds"] for x in runs])
        results.append(res)
        if res["case"].startswith("rollout"):
            cache = "global" if res["local"] < 0 else f"rolling (sink {res['sink']}, window {res['local']})"
            blocks = res["block_s"]
            print(f"rollout {res['size']:>8} {res['frames']:3d} frames {cache:28s} {res['seconds']:7.2f} s "
                  f"{res['latent_fps']:7.2f} latent frames/s  KV cache {res['kv_cache_mb']:7.1f} MiB  "
                  f"peak +{res['peak_mem_mb']:7.1f} MiB  block s: first {blocks[0]:.2f} "
                  f"last {blocks[-1]:.2f}", flush=True)
        elif res["case"].startswith("update"):
            what = "NFT update (3 fwd + 1 bwd)" if res["mode"] == "nft" else "flow-matching step"
            ratio = ""
            if res["mode"] == "nft" and results[-2]["case"].endswith(":fm"):
                fm = results[-2]
                ratio = (f"  = {res['seconds'] / fm['seconds']:.2f}x time, "
                         f"{res['peak_mem_mb'] / max(fm['peak_mem_mb'], 1e-9):.2f}x memory of flow matching")
            print(f"update  {res['size']:>8} {res['frames']:3d} frames {what:27s} {res['seconds']:7.2f} s "
                  f"peak +{res['peak_mem_mb']:8.1f} MiB{ratio}", flush=True)
        else:
            what = "forward+backward" if res["backward"] else "forward"
            print(f"train   {res['size']:>8} {res['frames']:3d} frames {what:17s} {res['seconds']:7.2f} s "
                  f"peak +{res['peak_mem_mb'] / 1024:6.2f} GiB", flush=True)
    write_json(args.json, results)


if __name__ == "__main__":
    main(tyro.cli(Args))
