"""
Speed and memory of the pieces that cost: AR rollout through the KV cache, and the block-causal
training forward (+ backward). Numbers here, never in tests. DESIGN.md §6 defines the "bench"
size so they can be set beside the public reference implementation's (same 2-core CPU,
float32, B = 1, 2 threads).

    python bench.py rollout              tiny + bench sizes, global and rolling cache
    python bench.py train                bench size, forward and forward+backward, 21 frames
    python bench.py update               one NFT update (3 forwards, 1 backward) vs one plain
                                         flow-matching step on the same batch (LoRA rank 64)
    python bench.py streaming --json s.json   one streaming RL step (window 21, last) per video
                                         length, tiny model, 32x32, rolling cache 12 / sink 3,
                                         vs back-propagating through the whole video
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
from train import peak_growth, reset_peak

# DESIGN.md §6: a Wan-shaped model small enough for a 2-core CPU (8190 tokens in 21 frames)
SIZES = dict(CONFIGS, bench=replace(CONFIGS["wan-1.3b"], dim=768, ffn_dim=3072, num_heads=6,
                                    num_layers=4))
LATENT = {"tiny": (64, 64), "bench": (30, 52), "wan-1.3b": (60, 104), "wan-14b": (60, 104)}
STREAM_HW = (32, 32)  # frame size of the streaming bench


@dataclass
class Args:
    what: tyro.conf.Positional[Literal["rollout", "train", "update", "streaming"]] = "rollout"
    """rollout: AR sampling (global and rolling cache); train: block-causal forward / +backward;
    update: an NFT update vs a flow-matching step; streaming: one RL step per video length"""
    lengths: list[int] = field(default_factory=lambda: [21, 42, 84, 168, 240])
    """video lengths (latent frames) of the streaming bench; the window is 21"""
    frames: int = 21
    """latent frames of the train / update cases"""
    sizes: list[str] = field(default_factory=lambda: ["tiny", "bench"])
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


def update_step(model, mode, frames, hw, ctx, dev, local=-1, sink=0):
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
    targs = TrainArgs(model="tiny", local_attn=local, sink=sink)
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


def write_json(path, results):
    """Results to `path` (if given), through a temp file so a crash leaves no half file."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)


def subprocess_json(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
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


def main(args: Args):
    if args.case:
        print(json.dumps(run_case(args, args.case)))
        return
    if args.what == "streaming":
        return write_json(args.json, streaming(args))
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
