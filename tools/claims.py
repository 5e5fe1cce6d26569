"""
The paper's claims (Astrolabe, arXiv 2603.17051, abstract and Sec. 4), reproduced in miniature on
the tiny shapes world: every arm is a `python train.py` run (the code path users run), evaluated
on prompts and seeds it never trained on.

  nft        negative-aware RL improves the distilled AR model from its own clean samples, and
             contrasting positive *and* negative samples beats reward-weighted fine-tuning on the
             good samples alone.       arms: base, nft, positive-only (--objective positive-only)
  streaming  clip-window training over the rolling KV cache improves the *late* part of long
             videos, which short-clip RL never trains.   arms: base, short-clip, streaming
  hacking    multi-reward with selective regularization keeps properties nobody rewarded from
             degrading while the main reward rises.
             arms: base, single-reward, multi-reward, multi+selective (held-out detectors)
  memory     streaming peak memory does not grow with the video length.  arms: 12 / 24 / 48 frames

Run:   python tools/claims.py                    (every claim, 3 training seeds; ~1 h on 2 cores)
       python tools/claims.py --only nft --seeds 3 --seed0 100 --out /tmp/claims
       python tools/claims.py --quick --out /tmp/q    (plumbing smoke test: tiny budgets, no verdicts)
Test:  python -m pytest tests/test_claims.py -q
Writes OUT/claims.json, OUT/claims.md, OUT/<claim>.png and OUT/runs/<claim>/<arm>/seed<S>/ (the
train.py runs). The committed results are in assets/claims/.

Held out: the 48 prompts split by shape, one shape per (colour, direction) pair is never trained
(16 eval prompts, every word still seen in training); eval seeds come from their own stream.
Verdict per comparison: Welch's t of the two arms' run means, "better" if t > 2, "worse" if
t < -2, else "no difference"; a claim is "reproduced" when every comparison it names is "better".

Shape legend: V eval videos, F frames, C = 3 channels, H, W pixels.
"""
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import tyro
from PIL import Image, ImageDraw
from tqdm import tqdm

# a tool, not part of the algorithm: the repository root on the import path, so that
# `python tools/claims.py` (from anywhere) finds train.py, model.py and the rest
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tiny_world
import train
from checkpoints import load_adapter_file, load_base
from common import log, save_strip, seed_of, write_atomic
from frozen import to_pixels
from lora import use_adapter
from rewards import MultiReward
from streaming import rollout

NAMES = ("nft", "streaming", "hacking", "memory")


@dataclass
class Args:
    """The paper's claims in miniature: `python tools/claims.py [--only NAME] [--seeds N]`."""
    only: Optional[Literal["nft", "streaming", "hacking", "memory"]] = None
    """run one claim (default: all four)"""
    seeds: int = 3
    """training seeds per arm (mean ± std over them)"""
    seed0: int = 0
    """the first training seed; arms use seed0, seed0 + 1, ..."""
    out: str = "out/claims"
    """folder for claims.json, claims.md, the figures and the runs"""
    quick: bool = False
    """smoke test: 1 step, 1 seed, 1 eval video, 2 memory lengths (checks the plumbing; no verdicts)"""


# ----------------------------------------------------------------------------------------------
# The experiment: prompts, budgets and arms (chosen before any evaluation; never tuned on it)

def prompt_split():
    """(train, eval) prompts: for each (colour, direction) pair one shape is held out."""
    train_p, eval_p = [], []
    for ci, color in enumerate(tiny_world.COLOR_WORDS):
        for di, direction in enumerate(tiny_world.DIRECTION_WORDS):
            for si, shape in enumerate(tiny_world.SHAPES):
                prompt = f"a {color} {shape} moving {direction}"
                # the held-out shape rotates with (colour, direction): each shape held out 5-6 times
                if si == (ci + di) % len(tiny_world.SHAPES):
                    eval_p.append(prompt)
                else:
                    train_p.append(prompt)
    return train_p, eval_p


# Every arm trains 20 steps of 4 prompts x 4 videos (2.5 passes over the 32 training prompts;
# sized so that the whole command fits an hour on 2 cores) at the default lr, except the hacking
# claim, which trains at lr 2e-3: the rate at which the detectors are visibly hacked on this world.
BUDGET = ["--steps", "20", "--prompts-per-step", "4", "--group-size", "4"]
# --quick: plumbing only (1 step of 2 x 2 videos, 1 eval prompt in train.py's before/after)
QUICK_BUDGET = ["--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--micro-batch", "4", "--eval-prompts", "1"]
SHORT = ["--num-frames", "6", "--window", "0"]  # 2 blocks, the whole clip is trained
LONG = ["--num-frames", "18", "--window", "6"]  # 6 blocks, 2-block windows over the rolling cache
DEFAULT_REWARDS = ["direction_progress=1", "color_match=1", "size_constancy=1"]
TRAINED = [spec.split("=")[0] for spec in DEFAULT_REWARDS]  # their names, summed into the claims' totals
HELD_OUT = ["direction_match", "smoothness"]  # detectors no arm trains on

CLAIMS = {
    "nft": {
        "arms": {
            "base": None,
            "nft": SHORT + ["--rewards", *DEFAULT_REWARDS],
            "positive-only": SHORT + ["--rewards", *DEFAULT_REWARDS, "--objective", "positive-only"],
        },
        "eval_frames": 6,
        "metric": "total reward (direction_progress + color_match + size_constancy), held-out prompts/seeds",
        # (arm, against, number): the claim holds when every one of these is "better"
        "compare": [("nft", "base", "total"), ("nft", "positive-only", "total")],
        "report": [("positive-only", "base", "total")],  # shown, not required
    },
    "streaming": {
        "arms": {
            "base": None,
            # short-clip RL: the first 6 frames only, as RL on short clips does
            "short-clip": SHORT + ["--rewards", *DEFAULT_REWARDS],
            # streaming: a random 2-block window of the 18-frame video each step
            "streaming": LONG + ["--rewards", *DEFAULT_REWARDS, "--window-select", "random"],
        },
        "eval_frames": 18,
        "metric": "total reward on the LAST 6 of 18 frames (first 6 frames reported too)",
        "compare": [("streaming", "short-clip", "last_window"), ("streaming", "base", "last_window")],
        "report": [("short-clip", "base", "first_window"), ("short-clip", "base", "last_window")],
    },
    "hacking": {
        "arms": {
            "base": None,
            "single-reward": SHORT + ["--lr", "2e-3", "--rewards", "direction_progress=1"],
            "multi-reward": SHORT + ["--lr", "2e-3", "--rewards", *DEFAULT_REWARDS],
            "multi+selective": SHORT + ["--lr", "2e-3", "--rewards", *DEFAULT_REWARDS, "--selective"],
        },
        "eval_frames": 6,
        "metric": "held-out detectors (mean of direction_match, smoothness); main = direction_progress",
        "compare": [("multi+selective", "single-reward", "held_out"), ("multi+selective", "base", "main")],
        "report": [("multi-reward", "single-reward", "held_out"), ("single-reward", "base", "main"),
                   ("single-reward", "base", "held_out"), ("multi+selective", "multi-reward", "held_out")],
    },
}
# memory: one streaming step (window 6, rolling cache 6 + sink 3, the last window) per length
MEMORY_LENGTHS = (12, 24, 48)
MEMORY_FLAGS = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "4", "--window", "6",
                "--local-attn", "6", "--sink", "3", "--window-select", "last", "--rewards", "color_match=1"]
MEMORY_QUICK = ["--steps", "1", "--prompts-per-step", "1", "--group-size", "2", "--micro-batch", "2", "--eval-prompts", "1", "--window", "6",
                "--local-attn", "6", "--sink", "3", "--window-select", "last", "--rewards", "color_match=1"]


# ----------------------------------------------------------------------------------------------
# Runs and evaluation

def train_run(flags, out_dir, seed, train_prompts, env=None):
    """One train.py run in its own process (its log next to it; `env` adds environment
    variables); returns its folder."""
    os.makedirs(out_dir, exist_ok=True)
    prompt_file = os.path.join(out_dir, "prompts.txt")
    with open(prompt_file, "w") as f:
        f.write("\n".join(train_prompts) + "\n")
    # the claim's flags first; then what every arm shares: its seed, its folder, the training
    # prompts only, no eval or intermediate checkpoints (claims.py evaluates the final policy itself)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *flags, "--seed", str(seed), "--out-dir", out_dir,
           "--prompt-file", prompt_file, "--eval-every", "0", "--ckpt-every", "0", "--keep-ckpts", "1",
           "--no-progress", "--overwrite"]
    # a fresh process per arm: nothing (RNG state, threads, memory peaks) leaks between arms
    with open(os.path.join(out_dir, "train.log"), "w") as logf:
        done = subprocess.run(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"train.py failed (exit {done.returncode}); see {out_dir}/train.log")
    return out_dir


def load_policy(run_dir):
    """The tiny base model with the run's exported policy (its final lora/, the EMA) as 'default'."""
    ckpts = sorted(d for d in os.listdir(run_dir) if d.startswith("ckpt_"))
    path = os.path.join(run_dir, ckpts[-1])
    # the run's own flags rebuild the same base
    with open(os.path.join(path, "state.json")) as f:
        saved = json.load(f)["args"]
    saved = train.Args(**{**saved, "released": train.Released(**saved["released"])})
    model = load_base(saved)
    # lora/ is what a user would ship: the EMA policy (or theta with --no-ema); rank and alpha from its files
    load_adapter_file(model, "default", os.path.join(path, "lora"))
    return model.eval()


@torch.no_grad()
def eval_videos(model, adapter, prompts, frames, n_seeds):
    """Each held-out prompt with n_seeds eval seeds (never used in training): (V, F, C, H, W)."""
    # the sampler's settings: the whole video, one KV cache, global attention (as the runs trained)
    args = train.Args(num_frames=frames, window=0)
    ctx = tiny_world.toy_text_embed(prompts, model.cfg.text_len, model.cfg.text_dim)  # the same for every seed
    videos = []
    for k in range(n_seeds):
        # a seed stream of its own: no training rollout (seeded by (seed, step, sample)) shares it
        seeds = [seed_of("claims-eval", k, i) for i in range(len(prompts))]
        with use_adapter(model, adapter):
            lat = rollout(model, ctx, seeds, frames, args)  # pixel space: latents are frames
        videos.append(to_pixels(lat))  # [-1, 1] -> [0, 1]
    return torch.cat(videos)


def scores_of(videos, prompts, n_seeds):
    """Every detector's mean over the eval videos (prompts repeated once per seed)."""
    # every detector on every eval video, trained on or not; the claim picks what it reports
    names = DEFAULT_REWARDS + [f"{h}=1" for h in HELD_OUT]
    multi = MultiReward(names, registry=train.REGISTRY, frames=None)
    per = multi.score(videos, prompts * n_seeds)
    return {name: value.mean().item() for name, value in per.items()}


def claim_metric(name, videos, prompts, n_seeds):
    """The claim's numbers for one model: {metric: value}; the first key is the claim's metric."""
    if name == "streaming":
        # the same 18-frame videos scored on their first and on their last 6 frames (2 blocks)
        last, first = scores_of(videos[:, -6:], prompts, n_seeds), scores_of(videos[:, :6], prompts, n_seeds)
        return {"last_window": sum(last[k] for k in TRAINED), "first_window": sum(first[k] for k in TRAINED)}
    s = scores_of(videos, prompts, n_seeds)
    if name == "nft":
        return {"total": sum(s[k] for k in TRAINED), **s}
    # hacking: the held-out detectors first, then the main reward
    return {"held_out": sum(s[h] for h in HELD_OUT) / len(HELD_OUT), "main": s["direction_progress"], **s}


def variance(runs):
    """Unbiased sample variance; 0 for a single run (it counts as exact)."""
    return statistics.variance(runs) if len(runs) > 1 else 0.0


def welch_t(a, b):
    """Welch's t of two lists of run means."""
    # t = (mean_a - mean_b) / sqrt(var_a / n_a + var_b / n_b)
    se = math.sqrt(variance(a) / len(a) + variance(b) / len(b))
    ma, mb = statistics.mean(a), statistics.mean(b)
    # no spread in either arm (one run each, or identical runs): t is undefined
    return (ma - mb) / se if se > 0 else None


def compare(a, b):
    """'better' / 'worse' / 'no difference' for arm runs a against b (|t| > 2 decides)."""
    t = welch_t(a, b)
    if t is None:  # one run per arm (--quick, --seeds 1): no test, and no claim either way
        return "no difference", t
    if t > 2:
        return "better", t
    if t < -2:
        return "worse", t
    return "no difference", t


def summary(runs):
    """{'mean', 'std', 'runs'} of a list of numbers (sample std; 0 for one run)."""
    return {"mean": statistics.mean(runs), "std": math.sqrt(variance(runs)), "runs": runs}


def run_claim(name, args, train_p, eval_p, done):
    """Train every arm of a claim for every seed, evaluate, and judge. Returns the claim's dict.
    done: {(flags, seed): run folder} of the runs so far; an arm with the same flags and seed as
    an earlier one (nft's `nft` is streaming's `short-clip`) reuses that run instead of repeating it."""
    spec = CLAIMS[name]
    n_seeds = 1 if args.quick else 2  # eval seeds per held-out prompt: 32 eval videos per model
    prompts = eval_p[:1] if args.quick else eval_p
    seeds = [args.seed0 + i for i in range(1 if args.quick else args.seeds)]
    values, strips = {}, {}  # arm -> [metrics of each run]; arm -> first run's first video
    base = None
    for arm, flags in spec["arms"].items():
        values[arm] = []
        for seed in ([None] if flags is None else seeds):
            if flags is None:  # the base model: adapters off, evaluated once
                base = base or base_model()
                model, adapter = base, None
            else:
                run_flags = (QUICK_BUDGET if args.quick else BUDGET) + flags
                key = (tuple(run_flags), seed)
                if key not in done:
                    folder = os.path.join(args.out, "runs", name, arm, f"seed{seed}")
                    done[key] = train_run(run_flags, folder, seed, train_p)
                run_dir = done[key]
                model, adapter = load_policy(run_dir), "default"
            videos = eval_videos(model, adapter, prompts, spec["eval_frames"], n_seeds)  # (V, F, C, H, W)
            values[arm].append(claim_metric(name, videos, prompts, n_seeds))
            strips.setdefault(arm, videos[:2])
            log(f"{name} / {arm} / seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in values[arm][-1].items()))
    # per arm and per number: mean and std over the training seeds
    keys = list(values["base"][0])
    arms = {arm: {k: summary([v[k] for v in vals]) for k in keys} for arm, vals in values.items()}
    metric = keys[0]
    # judged with the rule stated in the docstring; "report" rows are context, not part of the verdict
    comparisons = []
    for a, b, key in spec["compare"] + spec["report"]:
        word, t = compare(arms[a][key]["runs"], arms[b][key]["runs"])
        comparisons.append({"arm": a, "vs": b, "on": key, "t": t, "result": word,
                            "required": (a, b, key) in spec["compare"]})
    reproduced = all(c["result"] == "better" for c in comparisons if c["required"])
    verdict = "reproduced" if reproduced else "not reproduced"
    if args.quick:
        verdict = "quick run: no verdict"
    result = {"name": name, "metric": spec["metric"], "key": metric, "show": keys[:2] if name != "nft" else keys[:1],
              "arms": {arm: stats[metric] for arm, stats in arms.items()},
              "details": arms, "comparisons": comparisons, "verdict": verdict}
    save_bars(os.path.join(args.out, f"{name}.png"), result)
    labels, rows = [], []
    for arm, vids in strips.items():
        for v, p in zip(vids, prompts):
            labels.append(f"{arm}: {p}")
            rows.append(v)
    save_strip(os.path.join(args.out, f"{name}_videos.png"), rows, labels=labels,
               frames=min(spec["eval_frames"], 9))
    return result


def base_model():
    """The base model itself (assets/tiny_world.safetensors), no adapter."""
    return load_base(train.Args()).eval()


def run_memory(args):
    """Peak memory of one streaming step (the second; RSS growth on CPU, freed memory returned at
    once) per video length."""
    arms = {}
    lengths = MEMORY_LENGTHS[:2] if args.quick else MEMORY_LENGTHS  # --quick: 12 and 24 frames
    for frames in lengths:
        out_dir = os.path.join(args.out, "runs", "memory", f"{frames}_frames")
        flags = (MEMORY_QUICK if args.quick else MEMORY_FLAGS) + ["--num-frames", str(frames)]
        # glibc returns every freed block over 64 KiB at once, so that RSS follows the live tensor
        # bytes (what CUDA's allocator would report) instead of keeping freed heap pages forever
        train_run(flags, out_dir, args.seed0, tiny_world.PROMPTS, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if "mem/peak_mb" in line]
        arms[f"{frames} frames"] = summary([rows[-1]["mem/peak_mb"]])
        log(f"memory / {frames} frames: step peak {rows[-1]['mem/peak_mb']:.0f} MB")
    # flat = the longest video's step peak within 20% of the shortest's, at 4x the length
    peaks = [a["mean"] for a in arms.values()]
    ratio = max(peaks) / max(min(peaks), 1e-9)
    verdict = "reproduced" if ratio < 1.2 else "not reproduced"
    result = {"name": "memory", "metric": "peak MB of one streaming RL step (RSS growth, CPU), video 12 -> 48 frames",
              "key": "peak_mb", "arms": arms, "ratio": ratio,
              "verdict": "quick run: no verdict" if args.quick else verdict}
    save_bars(os.path.join(args.out, "memory.png"), result)
    return result


# ----------------------------------------------------------------------------------------------
# Outputs: claims.json, claims.md, one bar chart per claim

def save_bars(path, claim, size=(520, 300)):
    """Arm means as bars with ± std whiskers and each run as a dot, titled with the metric."""
    arms = claim["arms"]
    W, H, m = size[0], size[1], 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    values = [x for a in arms.values() for x in a["runs"]] + [a["mean"] + a["std"] for a in arms.values()]
    # bars start at 0 (or below, for negative numbers): their lengths compare
    lo, hi = min(0.0, min(values)), max(values) * 1.05 or 1.0

    # data value -> pixel row
    def py(v):
        return H - m - (v - lo) / (hi - lo) * (H - 2 * m)
    d.text((6, 6), f"{claim['name']}: {claim['metric']}"[:80], fill="black")
    d.text((6, 20), claim["verdict"], fill="black")
    step = (W - 2 * m) / len(arms)
    for i, (arm, a) in enumerate(arms.items()):
        x0 = m + i * step + step * 0.2
        x1 = m + (i + 1) * step - step * 0.2
        d.rectangle([x0, py(a["mean"]), x1, py(lo)], fill="#9ecae1", outline="black")
        xc = (x0 + x1) / 2
        d.line([xc, py(a["mean"] - a["std"]), xc, py(a["mean"] + a["std"])], fill="black", width=2)
        for v in a["runs"]:
            d.ellipse([xc - 3, py(v) - 3, xc + 3, py(v) + 3], fill="#d62728")
        d.text((x0, H - m + 4), arm, fill="black")
        d.text((x0, py(a["mean"]) - 14), f"{a['mean']:.3f}", fill="black")
    write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))


def markdown(results, wall_s, argv):
    """claims.md: one table, claim | arms | metric (mean ± std over training seeds) | verdict."""
    lines = [f"`python tools/claims.py {' '.join(argv)}` — {wall_s / 60:.1f} min on {machine()}", "",
             "| claim | arms: mean ± std (runs) | metric | verdict |", "|---|---|---|---|"]
    for c in results:
        cells = []
        for arm, a in c["arms"].items():
            cell = f"{arm}: {a['mean']:.3f} ± {a['std']:.3f} ({len(a['runs'])})"
            # the claim's second number (first window, main reward) beside its metric
            for key in c.get("show", [])[1:]:
                other = c["details"][arm][key]
                cell += f", {key} {other['mean']:.3f} ± {other['std']:.3f}"
            cells.append(cell)
        verdict = c["verdict"]
        for comp in c.get("comparisons", []):
            t = "n/a" if comp["t"] is None else f"{comp['t']:.1f}"
            mark = "" if comp["required"] else " (context)"
            verdict += f"<br>{comp['arm']} vs {comp['vs']} on {comp['on']}: {comp['result']} (t = {t}){mark}"
        if "ratio" in c:
            verdict += f"<br>max/min {c['ratio']:.2f}"
        lines.append(f"| {c['name']} | {'<br>'.join(cells)} | {c['metric']} | {verdict} |")
    return "\n".join(lines) + "\n"


def write_text(path, text):
    """A text file written to a temporary path, then renamed."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write)


def machine():
    """The CPU model and core count, for the record."""
    name = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def main(args: Args):
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    train_p, eval_p = prompt_split()
    names = [args.only] if args.only else list(NAMES)
    results, done = [], {}
    for name in tqdm(names, desc="claims"):
        results.append(run_memory(args) if name == "memory" else run_claim(name, args, train_p, eval_p, done))
    wall = time.time() - t0
    report = {"claims": results, "wall_s": wall, "machine": machine(), "argv": sys.argv[1:]}
    write_text(os.path.join(args.out, "claims.json"), json.dumps(report, indent=1))
    md = markdown(results, wall, sys.argv[1:])
    write_text(os.path.join(args.out, "claims.md"), md)
    print(md)


if __name__ == "__main__":
    main(tyro.cli(Args))
