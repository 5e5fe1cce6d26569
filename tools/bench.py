"""
Speed and memory of the pieces that cost: AR rollout through the KV cache, and the block-causal
training forward (+ backward). Numbers here, never in tests. The "bench" size (SIZES: dim 768,
4 layers, a 30x52 latent) is a Wan-shaped model a 2-core CPU can run, so the numbers can be set
beside those of the released code run the same way (float32, B = 1, 2 threads).

    python tools/bench.py rollout              tiny + bench sizes, global and rolling cache
    python tools/bench.py train                bench size, forward and forward+backward, 21 frames
    python tools/bench.py update               one NFT update (3 forwards, 1 backward) vs one plain
                                         flow-matching step on the same batch (LoRA rank 64)
    python tools/bench.py streaming --json s.json   one streaming RL step (window 21, last) per video
                                         length, tiny model, 32x32, rolling cache 12 / sink 3,
                                         vs back-propagating through the whole video
    python tools/bench.py rollout --sizes wan-1.3b --device cuda     (the real size, on a GPU)
    python tools/bench.py gpu                  the real 1.3B (--size wan-14b) at 480x832, 21 latent
                                         frames, random bf16 weights: rollout frames/s, one NFT
                                         update (LoRA r 256) with and without activation
                                         checkpointing: time, peak memory, MFU (skipped
                                         without CUDA; --device cpu --size tiny: a smoke run)
    python tools/bench.py memory / realsize / vae / vlm   the memory model against measured peaks (tools/bench_memory.py)

Every case runs in a fresh subprocess; peak memory is the RSS growth over the value just before
the measured call (CPU), or torch.cuda.max_memory_allocated growth (GPU).

Shape legend: B batch, F latent frames, C channels, H, W latent size (tiny: pixels), Nq, Nk
query and key tokens of one attention.
"""
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import tyro

# a tool, not part of the algorithm: the repository root on the import path, so that
# `python tools/bench.py` (from anywhere) finds train.py, model.py and the rest
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train
# the memory and realsize harnesses, and the bench sizes and helpers they share with this file
from bench_memory import (SIZES, memory_bench, memory_case, random_model, realsize, subprocess_json, vae_bench, vae_case,
                          vlm_bench, vlm_case)
from common import peak_growth, reset_peak, write_atomic
from memory import train_flops
from kvcache import KVCache
from lora import adapter_names, adapter_params, add_adapter, use_adapter
from sample import GeneratorNoise, generate, make_generators

LATENT = {"tiny": (64, 64), "bench": (30, 52), "wan-1.3b": (60, 104), "wan-14b": (60, 104)}
STREAM_HW = (32, 32)  # frame size of the streaming bench
GPU_HW = {"tiny": (32, 32)}  # latent size of `gpu --size tiny` (a CPU smoke run); else LATENT


@dataclass
class Args:
    what: tyro.conf.Positional[Literal["rollout", "train", "update", "streaming", "gpu", "memory",
                                       "realsize", "vae", "vlm"]] = "rollout"
    """rollout: AR sampling (global and rolling cache); train: block-causal forward / +backward;
    update: an NFT update vs a flow-matching step; streaming: one RL step per video length;
    gpu: the real size on one GPU (rollout, NFT update with/without checkpointing, MFU);
    memory: one RL step's measured peak next to memory.py's prediction, and every preset's
    prediction; realsize: the full wan-1.3b through the self-forcing preset, small frames, CPU;
    vae: the VAE's decode peak, whole frames and tiled, next to memory.py's; vlm: the working set of
    one HPSv3 / VideoAlign forward at real width, next to memory.py's"""
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
        loss, *_ = train.nft_microbatch(model, args, x0=x0, ctx=c, r=r, kl_mask=torch.ones(B, dtype=torch.bool),
                                          history=None, step=0, first_sample=0, start=0, autocast=autocast)
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


def main(args: Args):
    args = replace(args, device=args.device or ("cuda" if args.what == "gpu" else "cpu"))
    if args.case.startswith("memory:"):
        _, index, ckpt_file = args.case.split(":", 2)
        print(json.dumps(memory_case(int(index), ckpt_file)))
        return
    if args.case.startswith("vae:"):
        print(json.dumps(vae_case(int(args.case.split(":")[1]))))
        return
    if args.case.startswith("vlm:"):
        print(json.dumps(vlm_case(int(args.case.split(":")[1]))))
        return
    if args.case:
        print(json.dumps(run_case(args, args.case)))
        return
    if args.what == "memory":
        return write_json(args.json, memory_bench(args))
    if args.what == "vae":
        return write_json(args.json, vae_bench(args))
    if args.what == "vlm":
        return write_json(args.json, vlm_bench(args))
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
