"""
Speed and memory of the pieces that cost: AR rollout through the KV cache, and the block-causal
training forward (+ backward). Numbers here, never in tests. DESIGN.md §6 defines the "bench"
size so they can be set beside the public reference implementation's (same 2-core CPU,
float32, B = 1, 2 threads).

    python bench.py rollout              tiny + bench sizes, global and rolling cache
    python bench.py train                bench size, forward and forward+backward, 21 frames
    python bench.py update               one NFT update (3 forwards, 1 backward) vs one plain
                                         flow-matching step on the same batch (LoRA rank 64)
    python bench.py rollout --sizes wan-1.3b --device cuda     (the real size, on a GPU)

Every case runs in a fresh subprocess; peak memory is the RSS growth over the value just before
the measured call (CPU), or torch.cuda.max_memory_allocated growth (GPU).

Shape legend: B batch, F latent frames, C channels, H, W latent size.
"""
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import tyro

from kvcache import KVCache
from model import CONFIGS, CausalWanModel
from sample import GeneratorNoise, generate, make_generators

# DESIGN.md §6: a Wan-shaped model small enough for a 2-core CPU (8190 tokens in 21 frames)
SIZES = dict(CONFIGS, bench=replace(CONFIGS["wan-1.3b"], dim=768, ffn_dim=3072, num_heads=6,
                                    num_layers=4))
LATENT = {"tiny": (64, 64), "bench": (30, 52), "wan-1.3b": (60, 104), "wan-14b": (60, 104)}


@dataclass
class Args:
    what: tyro.conf.Positional[Literal["rollout", "train", "update"]] = "rollout"
    """rollout: AR sampling (global and rolling cache); train: block-causal forward / +backward;
    update: an NFT update vs a flow-matching step"""
    frames: int = 21
    """latent frames of the train / update cases"""
    sizes: list = field(default_factory=lambda: ["tiny", "bench"])
    """model sizes to measure (tiny, bench, wan-1.3b, wan-14b)"""
    device: str = "cpu"
    """cpu or cuda"""
    threads: int = 2
    """torch CPU threads (the reference numbers used 2)"""
    repeats: int = 1
    """fresh-process repeats per case; the median is reported"""
    json: str = ""
    """also write the results to this JSON file"""
    case: str = ""
    """(internal) run one case in this process and print its JSON"""


def rss_mb(field_name="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak(device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2 ** 20
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (peak RSS) to the current RSS
        f.write("5")
    return rss_mb()


def peak_growth(device, base):
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20 - base
    return rss_mb("VmHWM") - base


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
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    model = model.to_empty(device=dev).to(dtype)
    model.init_weights()
    for p in model.head.parameters():
        torch.nn.init.normal_(p, std=0.02)
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


def update_step(model, mode, frames, hw, ctx, dev):
    """One NFT update (old and ref predictions without grad, theta with grad, loss, backward), or
    for contrast one plain flow-matching step (theta forward + backward) on the same batch."""
    import nft_loss as nft
    from train import Args as TrainArgs, predict_x0
    cfg = model.cfg
    model.requires_grad_(False)
    for name in ("default", "old"):
        model.add_adapter(name, rank=64)
    for p in model.adapter_params("default"):
        p.requires_grad_(True)
    targs = TrainArgs(model="tiny")
    g = torch.Generator(dev).manual_seed(0)
    B = 2
    x0 = torch.randn(B, frames, cfg.in_dim, *hw, generator=g, device=dev)
    eps = torch.randn(x0.shape, generator=g, device=dev)
    sig = torch.full((B,), 0.625, device=dev)
    x_t = (1 - 0.625) * x0 + 0.625 * eps
    t = torch.full((B, frames), 625.0, device=dev)
    c = ctx.expand(B, -1, -1)
    base = reset_peak(dev)
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev == "cuda"):
        if mode == "nft":
            with torch.no_grad():
                x_old = predict_x0(model, "old", x_t, t, sig, c, targs)
                x_ref = predict_x0(model, None, x_t, t, sig, c, targs)
            x_th = predict_x0(model, "default", x_t, t, sig, c, targs)
            loss = nft.nft_policy_loss(x_th, x_old, x0, torch.rand(B, device=dev))[0] \
                + 1e-4 * nft.ref_loss(x_th, x_ref)
        else:  # flow matching: || v_theta(x_t, t) - (eps - x0) ||^2
            with model.adapter("default"):
                loss = (model(x_t, t, c).float() - (eps - x0)).pow(2).mean()
    loss.backward()
    if dev == "cuda":
        torch.cuda.synchronize()
    return dict(seconds=time.perf_counter() - t0, peak_mem_mb=peak_growth(dev, base))


def main(args: Args):
    if args.case:
        print(json.dumps(run_case(args, args.case)))
        return
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
            cmd = [sys.executable, __file__, "--case", spec, "--device", args.device,
                   "--threads", str(args.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
            if r.returncode:
                raise SystemExit(f"case {spec} failed:\n{r.stderr}")
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
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
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main(tyro.cli(Args))
