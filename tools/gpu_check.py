"""
The GPU check: one command that runs on a CUDA GPU what only a GPU can show, and measures the real
size there (about 8 minutes on one H100 / H200); one JSON and a short text report.

    python tools/gpu_check.py --out DIR           CUDA: the real sizes
    python tools/gpu_check.py --out DIR --tiny    small shapes on any device (on by itself without
                                                  CUDA): what tests/test_gpu_check.py runs on a CPU

Parts, each in its own process under its own time budget (BUDGET_S); a part that fails or runs
late records its error in the JSON and the check goes on with the next:
  parity  the released code's fixtures (tests/fixtures, as tests/test_parity.py) replayed in
          float32 on the device, max |diff| <= 1e-4; the bf16 forward (bf16 weights, autocast)
          against float32 on the same inputs, relative L2 error <= BF16_BOUND
  tiny    train.py's tiny world: a plain step and a streaming step, then exact resume (the step-2
          row of a run resumed from step 1 equals the uninterrupted run's)
  bench   wan-1.3b, random bf16 weights, 480x832, 21 latent frames (tools/bench.py gpu): AR rollout
          frames/s, one NFT update with and without activation checkpointing (time, MFU from
          memory.train_flops, peak against memory.predict); the VAE decoding one video, whole frames
          and in 160-pixel tiles, peak against memory.vae_decode_bytes
  full    train.py self-forcing at full size (LoRA 256, 480x832, 21 frames), 2 steps of 1 prompt x 2
          videos on random weights: measured peak against the prediction it printed
  24gb    train.py self-forcing-24gb the same way, the card capped at 24 GiB
          (torch.cuda.set_per_process_memory_fraction): it must finish
Writes DIR/gpu_check.json (every part's numbers or error) and DIR/gpu_check.txt (a line or two each).

A preset without its real files (what full and 24gb do; weight-free rewards, since learned ones
need their own files):
    python tools/gpu_check.py --write-random DIR    random generator, Wan2.1 VAE and a one-layer umT5
    python train.py self-forcing --ckpt DIR/self_forcing_random.pt --vae DIR --text-encoder DIR \\
        --prompts "a fox in the snow" --rewards colorfulness=1
    python tools/gpu_check.py train [--cap-gib N] PRESET --flags    train.py without the final
        before/after mp4s (for a machine without ffmpeg), the CUDA allocator capped at N GiB

On a GPU machine without internet access whose Python has torch but not tyro or diffusers (the
one this was prepared for: Python 3.12, torch 2.11, transformers 5.17, no ffmpeg), the missing
packages travel as wheels: `sh tools/gpu_wheels.sh` where pip works puts them in .whl/ (ignored by
git, 6.4 MB); there (docs/benchmarks.md, "GPU check"):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    PYTHONUNBUFFERED=1 python3 tools/gpu_check.py --out /tmp/check 2>&1 | tee /tmp/check.log

Test:  python -m pytest tests/test_gpu_check.py -q
Shape legend: B batch, F latent frames, C channels, H, W latent size (tiny: pixels), Fp pixel frames.
"""
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import memory
from model import CONFIGS

# seconds each part may take on one H100 / H200 (about 8 minutes in all); a late part is stopped
BUDGET_S = {"parity": 40, "tiny": 75, "bench": 100, "full": 150, "24gb": 120}
FIXTURE_TOL = 1e-4  # as tests/test_parity.py
# bf16 weights and autocast against float32, relative L2 of the fixture forward: bf16 keeps 8
# mantissa bits (relative rounding 2^-9 = 0.2% per op); a few dozen ops compound to ~1%
BF16_BOUND = 0.03
# the small Wan stand-in of --tiny: Wan's block layout at width 64, two layers, a short text
# (umT5's 512 tokens kept: FrozenParts embeds to that length)
TINY_WAN = replace(CONFIGS["wan-1.3b"], dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32)
TINY_VAE = dict(base_dim=8, num_res_blocks=2)  # the Wan2.1 VAE's layout, narrow
PROMPT = "a fox in the snow"
TEXT_WORDS = "a fox in the snow cat"


@dataclass
class Args:
    out: str = "gpu_check"
    """folder of gpu_check.json, gpu_check.txt and the runs' outputs"""
    tiny: bool = False
    """small shapes, on any device (on by itself without CUDA): a smoke run of every part"""
    parts: tuple[str, ...] = tuple(BUDGET_S)
    """the parts to run, in order"""
    write_random: str = ""
    """only write random Wan files for train.py's real presets into this folder, then stop"""
    part: str = ""
    """(internal) run one part in this process and write DIR/part_<name>.json"""


# ----------------------------------------------------------------------------------------------
# Random files in the released layouts, and train.py run without its real files

def write_random_files(folder, cfg, device="cpu", vae_kw=None):
    """The generator of config `cfg` with random weights as a Self-Forcing checkpoint
    (self_forcing_random.pt) and a Diffusers-layout folder: a random Wan2.1 VAE (vae_kw: a narrower
    one) and a one-layer umT5 of the model's text width with a word tokenizer. Returns the
    generator's path; --vae and --text-encoder take the folder."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel
    from bench_memory import random_model, word_tokenizer
    os.makedirs(folder, exist_ok=True)
    gen = os.path.join(folder, "self_forcing_random.pt")
    torch.manual_seed(0)
    m = random_model(cfg, device, torch.bfloat16)  # on the GPU when there is one: seconds, not a minute
    torch.save({"generator_ema": {"model." + k: v.cpu() for k, v in m.state_dict().items()}}, gen)
    del m
    AutoencoderKLWan(**(vae_kw or {})).save_pretrained(os.path.join(folder, "vae"))
    t5 = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=cfg.text_dim, d_kv=64, d_ff=256, num_layers=1,
                                     num_heads=4, feed_forward_proj="gated-gelu"))
    t5.save_pretrained(os.path.join(folder, "text_encoder"))
    word_tokenizer(os.path.join(folder, "tokenizer"), TEXT_WORDS.split())
    return gen


def train_without_videos(argv):
    """`gpu_check.py train [--cap-gib N] [--tiny-wan] PRESET --flags`: train.py's main() on the
    flags, without the before/after videos of the end (imageio needs ffmpeg, which a GPU machine may
    lack; they are two more rollouts and measure nothing new); --cap-gib: the CUDA caching
    allocator may hold at most N GiB; --tiny-wan: the wan-1.3b config is TINY_WAN (--tiny runs)."""
    if argv[:1] == ["--cap-gib"]:
        cap, argv = float(argv[1]), argv[2:]
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2 ** 30 / total))
    if argv[:1] == ["--tiny-wan"]:
        CONFIGS["wan-1.3b"], argv = TINY_WAN, argv[1:]
    import train
    train.save_before_after = lambda *a, **k: None
    train.main(train.parse_args(argv))


def run_train(argv, out, tiny_wan=False, cap_gib=0):
    """train.py (through train_without_videos) in a fresh process: (stdout, its metrics rows)."""
    cmd = [sys.executable, os.path.abspath(__file__), "train"] + (["--cap-gib", str(cap_gib)] if cap_gib else [])
    cmd += (["--tiny-wan"] if tiny_wan else []) + argv + ["--out-dir", out, "--no-progress"]
    cmd += [] if torch.cuda.is_available() else ["--threads", "1"]  # a CPU run is a test beside others
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"train.py {' '.join(argv)} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return r.stdout, [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------
# The parts; each returns a dict of numbers for the JSON and its report lines under "report"

def part_parity(dev, tiny):
    """The fixture sets replayed in float32 on `dev`, and bf16 against float32."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_parity  # the fixture loader
    from kvcache import KVCache
    from sample import TensorNoise, generate, sampler_timesteps
    # float32 means float32: cuDNN's convolutions (the patch embedding) default to TF32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    out, report = {"sets": {}}, []
    for path in test_parity.SETS:
        d, model, T = test_parity.load_set(path)
        model = model.to(dev)
        T = {k: v.to(dev) for k, v in T.items()}
        diffs = {}
        for name, c in d["cases"].items():
            key = name.replace("a_local", "alocal")
            with torch.no_grad():
                if key in ("a", "alocal", "d"):  # block-causal training forward
                    y = model(T[f"{key}_x"], T[f"{key}_t"], T[f"{key}_context"], clean_x=T.get(f"{key}_clean_x"),
                              local=c.get("local_attn_size", -1))
                    ref = T[f"{key}_flow"]
                elif key in ("b", "c"):  # 4-step AR sampling through the KV cache, stored noise
                    noise, shift = T[f"{key}_noise"], d["sampler"]["timestep_shift"]
                    B, F = noise.shape[:2]
                    cache = KVCache.for_model(model.cfg, B, F, d["latent_hw"], c.get("sink_size", 0),
                                              c.get("local_attn_size", -1), device=dev)
                    steps = sampler_timesteps(d["sampler"]["denoising_step_list"], shift,
                                              d["sampler"]["warp_denoising_step"])[0]
                    y = generate(model, T[f"{key}_context"], cache, F, TensorNoise(noise, T[f"{key}_renoise"]),
                                 shift=shift, timesteps=steps)
                    ref = T[f"{key}_latents"]
                else:
                    continue
            diffs[key] = (y.double() - ref.double()).abs().max().item()
        # bf16 as train.py runs it on a GPU: bf16 weights, bf16 autocast, against float32 (case a)
        x, t, ctx = T["a_x"], T["a_t"], T["a_context"]
        with torch.no_grad():
            y32 = model(x, t, ctx).double()
            with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
                y16 = model.to(torch.bfloat16)(x, t, ctx).double()
        rel = ((y16 - y32).norm() / y32.norm()).item()
        name = os.path.basename(path)
        out["sets"][name] = {"max_diff": diffs, "bf16_rel_l2": rel}
        ok = max(diffs.values()) <= FIXTURE_TOL and rel <= BF16_BOUND
        report.append(f"parity {name}: max |diff| float32 {max(diffs.values()):.2e} over {len(diffs)} cases "
                      f"(<= {FIXTURE_TOL:g}), bf16 relative L2 {rel:.2e} (<= {BF16_BOUND:g}): "
                      f"{'ok' if ok else 'FAILED'}")
    out["ok"] = all(max(s["max_diff"].values()) <= FIXTURE_TOL and s["bf16_rel_l2"] <= BF16_BOUND
                    for s in out["sets"].values())
    return dict(out, report=report)


def part_tiny(dev, tiny):
    """The tiny world on `dev`: 2 steps of 6 frames, windows of 3 drawn at random (each start once
    per cycle: one plain step, one streaming), checkpoints every step; then a run stopped at step 1
    and resumed must write the same step-2 row."""
    flags = ["--steps", "2", "--num-frames", "6", "--window", "3", "--window-select", "random",
             "--prompts-per-step", "2", "--group-size", "2", "--micro-batch", "2", "--eval-every", "0",
             "--ckpt-every", "1"] + (["--height", "16", "--width", "16"] if tiny else [])
    with tempfile.TemporaryDirectory() as tmp:
        _, whole = run_train(flags, os.path.join(tmp, "whole"))
        b = os.path.join(tmp, "resumed")
        run_train(flags[:1] + ["1"] + flags[2:], b)
        _, resumed = run_train(flags + ["--resume", "latest"], b)
    result = lambda row: {k: v for k, v in row.items() if not k.startswith(("time/", "mem/")) and k != "lineage"}
    a, r = result(whole[-1]), result(resumed[-1])
    differ = sorted(k for k in a if a[k] != r.get(k))
    starts = [row["window_start"] for row in whole]
    out = {"window_starts": starts, "losses": [row["loss"] for row in whole], "resume_equal": not differ,
           "resume_differs_in": differ, "step_s": [row["time/step_s"] for row in whole]}
    out["ok"] = not differ and sorted(starts) == [0, 3]
    out["report"] = [f"tiny: steps at window starts {starts} (plain and streaming), losses "
                     f"{', '.join(f'{v:.5f}' for v in out['losses'])}; resume from step 1: "
                     + ("the same step-2 row" if not differ else f"DIFFERS in {differ}")]
    return out


def part_bench(dev, tiny):
    """bench.py gpu at the real size (--tiny: its tiny smoke size), the update's peak against
    memory.predict; then the VAE decoding one video, whole frames and tiled."""
    import bench
    import train
    cuda = dev.startswith("cuda")
    a = bench.Args(what="gpu", device=dev, size="tiny" if tiny else "wan-1.3b", frames=6 if tiny else 21,
                   lora_rank=8 if tiny else 256, vae=False)
    out = bench.gpu_bench(a)
    H, W = bench.GPU_HW.get(a.size, bench.LATENT[a.size])
    px = (H, W) if tiny else (8 * H, 8 * W)  # the preset's --height / --width: pixels (tiny: its own)
    report = [f"bench {a.size}: rollout {out['latent_fps']:.2f} latent frames/s = {out['video_fps_dit']:.2f} "
              f"video frames/s (DiT only, {a.frames} latent frames)"]
    for key in ("ckpt", "no_ckpt"):
        # what the update holds: weights, adapters default / old / ref, theta's gradients and the
        # update term (bench.update_step: one micro-batch, noisy context, no history, no optimizer)
        args = replace(train.PRESETS["self-forcing"], model=a.size, height=px[0], width=px[1], num_frames=a.frames,
                       lora_rank=a.lora_rank, prompts_per_step=1, group_size=a.batch, micro_batch=a.batch,
                       selective=True, ema=False, grad_checkpointing=key == "ckpt", rewards=[], eval_every=0)
        pred = memory.predict(args, bench.SIZES[a.size], decode=False, bf16=cuda)
        grads = pred["optimizer"] / 3  # one of the optimizer term's three adapter-sized buffers
        r = out[key]
        r["predicted_mb"] = (pred["weights"] + pred["adapters"] + grads + pred["update"]) / 2 ** 20
        if "oom" in r:
            report.append(f"bench update {key}: out of memory")
            continue
        meas = r["peak_total_mb"]
        vs = f"peak {meas / 1024:.2f} GiB, predicted {r['predicted_mb'] / 1024:.2f}" if meas else "peak: CUDA only"
        report.append(f"bench update {key}: {r['seconds']:.2f} s, MFU {r['mfu']:.1%}, {vs}")
    out["vae"] = vae_decode_peaks(dev, tiny, a.frames, (64, 64) if tiny else px)  # tiny: 4 tiles of 32
    for v in out["vae"]:
        report.append(f"bench vae {v['tile'] or 'whole frames'}: {v['seconds']:.2f} s, peak +{v['measured_mb']:.0f} "
                      f"MiB, predicted +{v['predicted_mb']:.0f} MiB")
    return dict(out, report=report)


def vae_decode_peaks(dev, tiny, F, px):
    """The Wan2.1 VAE (random weights; --tiny: TINY_VAE) decoding one video of F latent frames at
    px pixels, whole frames and in tiles as FrozenParts decodes: time and the peak's growth over the
    loaded VAE, next to memory.vae_decode_bytes less the weights."""
    from common import peak_growth, reset_peak
    from diffusers import AutoencoderKLWan
    from frozen import WanVAE
    torch.manual_seed(0)
    vae = WanVAE(AutoencoderKLWan(**(TINY_VAE if tiny else {})).to(dev).eval())
    z = torch.randn(1, F, 16, px[0] // 8, px[1] // 8, device=dev)
    rows = []
    for tile in (0, 32 if tiny else 160):
        if tile:
            vae.tile(tile)
        base = reset_peak(dev)
        t0 = time.perf_counter()
        video = vae.decode(z)  # (1, Fp, 3, H, W)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        pred = memory.vae_decode_bytes(px[0], px[1], video.shape[1], tile) - memory.VAE_WEIGHTS
        rows.append({"tile": tile, "seconds": seconds, "measured_mb": peak_growth(dev, base),
                     "predicted_mb": pred / 2 ** 20})
        del video
    return rows


def part_preset(dev, tiny, preset, cap_gib=0):
    """train.py `preset` for 2 steps of 1 prompt x 2 videos on random files: measured peak (the
    step rows' mem/total_mb) against the prediction it printed at start."""
    folder = os.path.join(OUT, "random_files")
    gen = os.path.join(folder, "self_forcing_random.pt")
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(folder, "tokenizer")):  # written once, by full or by 24gb
        gen = write_random_files(folder, TINY_WAN if tiny else CONFIGS["wan-1.3b"], dev, TINY_VAE if tiny else None)
    written = time.perf_counter() - t0
    argv = [preset, "--ckpt", gen, "--vae", folder, "--text-encoder", folder, "--prompts", PROMPT,
            "--prompts-per-step", "1", "--group-size", "2", "--micro-batch", "1", "--steps", "2",
            "--eval-every", "0", "--ckpt-every", "0", "--rewards", "colorfulness=1", "--overwrite"]
    if tiny:  # 64x64 pixels, 6 latent frames; tiles of 32 pixels where the preset tiles
        argv += ["--height", "64", "--width", "64", "--num-frames", "6"]
        argv += ["--vae-tile", "32"] if preset.endswith("24gb") else []
    t0 = time.perf_counter()
    stdout, rows = run_train(argv, os.path.join(OUT, f"run_{preset}"), tiny, cap_gib)
    wall = time.perf_counter() - t0
    predicted = float(re.search(r"memory model: predicted peak ([\d.]+) GB", stdout).group(1))
    measured = max(row["mem/total_mb"] for row in rows) / 1024
    out = {"preset": preset, "steps": len(rows), "predicted_gib": predicted, "measured_gib": measured,
           "cap_gib": cap_gib or None, "step_s": [row["time/step_s"] for row in rows],
           "rollout_s": [row["time/rollout_s"] for row in rows], "reward_s": [row["time/reward_s"] for row in rows],
           "update_s": [row["time/update_s"] for row in rows], "run_s": wall, "random_files_s": written}
    out["ok"] = len(rows) == 2
    cap = f", capped at {cap_gib:g} GiB" if cap_gib else ""
    out["report"] = [f"{preset}: {len(rows)} steps finished{cap}; peak {measured:.2f} GiB measured, "
                     f"{predicted:.2f} predicted; step {', '.join(f'{s:.1f}' for s in out['step_s'])} s"]
    return out


PARTS = {"parity": part_parity, "tiny": part_tiny, "bench": part_bench,
         "full": lambda dev, tiny: part_preset(dev, tiny, "self-forcing"),
         "24gb": lambda dev, tiny: part_preset(dev, tiny, "self-forcing-24gb", cap_gib=24)}
OUT = ""  # the --out folder, for the parts


# ----------------------------------------------------------------------------------------------

# what the parts import besides torch and tyro; where diffusers travels as a wheel (tools/gpu_wheels.sh)
# it needs packages of that machine's own (requests, regex, filelock, huggingface_hub)
NEEDED = ("numpy", "einops", "tqdm", "safetensors", "PIL", "imageio", "transformers", "diffusers")


def package_versions():
    """Import each of NEEDED once, before any part spends GPU time: ({name: version}, [one line per
    package that fails to import]). Without it a missing package fails three parts one by one."""
    versions, errors = {}, []
    for name in NEEDED:
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as e:  # ImportError, or diffusers' PackageNotFoundError for a need of its own
            errors.append(f"{name}: {str(e).strip().splitlines()[0]}")
    return versions, errors


def run_part(name, args):
    """One part in a fresh process under its budget: its dict, or {"error": ...}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--out", args.out] + (["--tiny"] * args.tiny)
    t0 = time.perf_counter()
    # a session of its own: a late part is stopped with every process it started
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        log, _ = p.communicate(timeout=BUDGET_S[name])
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log, _ = p.communicate()
        return {"error": f"over its budget of {BUDGET_S[name]} s", "log_tail": log[-2000:]}
    seconds = time.perf_counter() - t0
    path = os.path.join(args.out, f"part_{name}.json")
    if p.returncode or not os.path.exists(path):
        return {"error": f"exit {p.returncode}", "log_tail": log[-3000:], "seconds": seconds}
    with open(path) as f:
        return dict(json.load(f), seconds=seconds)


def main(args):
    global OUT
    OUT = os.path.abspath(args.out)
    os.makedirs(OUT, exist_ok=True)
    cuda = torch.cuda.is_available()
    args = replace(args, tiny=args.tiny or not cuda)
    dev = "cuda" if cuda else "cpu"
    if args.write_random:
        print(write_random_files(args.write_random, CONFIGS["wan-1.3b"], dev))
        return
    if args.part:  # in a part's own process
        torch.manual_seed(0)
        torch.set_num_threads(1 if args.tiny else torch.get_num_threads())
        out = PARTS[args.part](dev, args.tiny)
        with open(os.path.join(OUT, f"part_{args.part}.json"), "w") as f:
            json.dump(out, f, indent=1)
        return
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu", "tiny": args.tiny,
           "python": sys.version.split()[0]}
    print(f"gpu check on {env['device']} (torch {env['torch']}{', tiny shapes' if args.tiny else ''})", flush=True)
    versions, errors = package_versions()
    env.update(versions)
    if errors:  # stop before any part: one line, the JSON says the same
        with open(os.path.join(OUT, "gpu_check.json"), "w") as f:
            json.dump({"env": env, "error": errors}, f, indent=1)
        sys.exit("gpu check stopped before any part: cannot import " + "; ".join(errors))
    results, lines, t0 = {"env": env}, [], time.perf_counter()
    for name in args.parts:
        r = run_part(name, args)
        results[name] = r
        last = (r.get("log_tail") or "").strip().splitlines()[-1:]  # a failed part: its error, its last line
        said = r.get("report") or [f"{name}: {r['error']}" + "".join(f"; {x}" for x in last)]
        for line in said:
            lines.append(line)
            print(line, flush=True)
        with open(os.path.join(OUT, "gpu_check.json"), "w") as f:  # after every part: a later crash keeps it
            json.dump(results, f, indent=1)
    results["seconds"] = time.perf_counter() - t0
    lines.append(f"total {results['seconds']:.0f} s; failed: {[n for n in args.parts if 'error' in results[n]] or 'none'}")
    print(lines[-1])
    with open(os.path.join(OUT, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(OUT, "gpu_check.txt"), "w") as f:
        f.write(f"gpu check on {env['device']} (torch {env['torch']}, Python {env['python']}, transformers "
                f"{env['transformers']}, diffusers {env['diffusers']})\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["train"]:
        train_without_videos(sys.argv[2:])
    else:
        main(tyro.cli(Args))
