"""
Small plumbing shared by the scripts: seeds, paths, atomic writes, the DDP collectives, memory
probes and PNG figures. Nothing here is part of the algorithm.

Test:  python -m pytest tests/test_train.py -q      (every helper runs in a training run)
"""
import contextlib
import hashlib
import io
import os
import re
import shutil
import sys
import time

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))  # the repository root


# ----------------------------------------------------------------------------------------------
# Seeds and paths

def seed_of(*parts) -> int:
    """A 63-bit seed from any tuple, e.g. (seed, step, prompt, k): the same on every rank and for
    any batch layout, so a sample's noise depends only on which sample it is."""
    # sha256, not hash(): Python salts str hashes per process, so ranks and resumes would disagree;
    # >> 1: a non-negative 63-bit int, which fits a signed int64 wherever it is passed or stored
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def find_file(path):
    """`path` as given, else relative to this repository, so `assets/...` works from any cwd."""
    alt = os.path.join(HERE, path)
    # the path as given wins; the repository's copy only when the given one does not exist
    return path if os.path.exists(path) or not os.path.exists(alt) else alt


def missing_files(args, fields):
    """'--flag path' for every path field of args that is set but exists nowhere (find_file)."""
    out = []
    for f in fields:
        path = getattr(args, f)
        if path and not os.path.exists(find_file(path)):
            out.append(f"--{f.replace('_', '-')} {path}")
    return out


# write_atomic's temporaries: "<root>.astrolabe-tmp<pid><ext>" while written, "<path>.astrolabe-old<pid>"
# for a folder being replaced. The marker makes them this project's own names, so clean-up
# (runs.survey) never mistakes a user's `notes.tmp1` or `ckpt_000002.old1` for one
TEMP = re.compile(r"(?P<root>.+)\.astrolabe-(?:tmp\d+(?P<ext>\.[^.]+)?|old\d+)")


def temp_origin(name):
    """The name a write_atomic temporary stands for (None for any other name).
    >>> temp_origin("metrics.astrolabe-tmp12.jsonl"), temp_origin("ckpt_000002.astrolabe-old7")
    ('metrics.jsonl', 'ckpt_000002')
    >>> temp_origin("notes.tmp1"), temp_origin("ckpt_000002.old1")  # a user's backups
    (None, None)
    """
    m = TEMP.fullmatch(name)
    return m.group("root") + (m.group("ext") or "") if m else None


def write_atomic(path, write):
    """write(tmp), then rename tmp -> path, so a crash never leaves a half-written file or folder
    under `path` (a folder that already exists is replaced only once the new one is complete).
    The temporary name keeps the extension (a.mp4 -> a.astrolabe-tmp123.mp4): writers pick formats
    by it. Returns what write(tmp) returns."""
    root, ext = os.path.splitext(path)
    # the pid in the name: two processes writing the same path never share a temporary
    tmp = f"{root}.astrolabe-tmp{os.getpid()}{ext}"
    result = write(tmp)
    if os.path.isdir(path):  # os.replace cannot overwrite a folder: move the old one aside first
        old = f"{path}.astrolabe-old{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:  # a file: os.replace is atomic on one filesystem (the temporary sits beside `path`)
        os.replace(tmp, path)
    return result


class UsageError(Exception):
    """A problem the user can fix: a flag, a file, a folder, a reward file, a learning rate that made
    the weights diverge. train.py and sample.py print its message, one line per problem, and exit
    with code 2, never a traceback."""


def log(*args):
    """print on rank 0 only (torchrun sets RANK), flushed at once."""
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun: every rank says the same; one copy is enough
        print(*args, flush=True)


def run_cli(main, parse, fixable, interrupted):
    """main(parse()) as a command. A problem the user can fix (UsageError or one of the `fixable`
    exception types) ends in its message, one line per problem, and exit code 2, never a traceback;
    Ctrl-C ends in the line `interrupted` and exit code 130 (the shell's code for SIGINT). Under
    torchrun every rank finds the same problem: rank 0 alone prints it, and the other ranks parse
    the flags silently (tyro's own errors would come once per rank). torchrun itself then reports
    the failed ranks in its own words; that report is its, not ours to silence."""
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        if rank0:
            args = parse()
        else:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                args = parse()
        main(args)
    except (UsageError, *fixable) as e:
        # "error: " on each line: a message listing several problems stays readable and greppable
        if rank0:
            print("\n".join(f"error: {line}" for line in str(e).splitlines()), file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        if rank0:
            print(f"\n{interrupted}", file=sys.stderr, flush=True)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------
# DDP plumbing: every rank holds n_local samples; these restore the global picture

def gather(x, world):
    """(n_local, ...) on every rank -> (N, ...) in global sample order (rank 0's rows first)."""
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]  # every rank holds the same n_local rows
    dist.all_gather(out, x.contiguous())  # NCCL / gloo need contiguous memory
    return torch.cat(out)


def all_reduce_grads(params, stats, world):
    """One all-reduce per step: gradients averaged over ranks, `stats` (a 1-D tensor of sums)
    summed. Returns the summed stats; the averaged gradients are written back into p.grad."""
    if world == 1:
        return stats
    # a parameter no loss reached has no grad on this rank but may have one on another: send zeros
    grads = [p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten() for p in params]
    # one flat buffer, one collective: hundreds of small all-reduces cost a round trip each
    flat = torch.cat(grads + [stats])
    dist.all_reduce(flat)  # sums over ranks
    i = 0  # where the next parameter's gradient starts in `flat`
    for p in params:
        p.grad = flat[i:i + p.numel()].view_as(p) / world
        i += p.numel()
    return flat[i:]


def all_reduce_step(params, parts, world):
    """The step's statistics, in the one all-reduce that also averages the gradients of `params`
    over the ranks. parts: (loss, reference term, reference term on every sample, ||x̂_θ - x̂_old||²)
    of each of this rank's micro-batches. Returns {"loss", "kl", "kl_all", "theta_old"}: means over
    every micro-batch of every rank, and {"nonfinite"}: how many of them had a non-finite loss."""
    names = ("loss", "kl", "kl_all", "theta_old")  # the order of each part's entries
    zero = torch.zeros((), device=parts[0][0].device)
    sums = [sum((part[i] for part in parts), zero) for i in range(len(names))]  # in order: as one += after another
    # counted, not only summed: one NaN micro-batch makes the summed loss NaN without saying how many
    nonfinite = sum(float(not torch.isfinite(part[0])) for part in parts)
    # the micro-batch count travels too: the means divide by the count over every rank
    total = all_reduce_grads(params, torch.stack(sums + [zero + nonfinite, zero + len(parts)]), world)
    count = total[-1]  # micro-batches over all ranks
    stats = {name: (total[i] / count).item() for i, name in enumerate(names)}
    stats["nonfinite"] = int(total[len(names)].item())
    return stats


class NonFiniteGuard:
    """A non-finite loss on any rank skips the whole step on every rank (no update; its metrics row
    says skipped); three such steps in a row stop the run. Weights an update made non-finite stop it
    before they can be saved or exported (the checkpoints on disk stay intact)."""

    def __init__(self):
        self.bad_steps = 0  # skipped steps in a row (kept in checkpoints: a resume continues the count)
        self.skipped = False  # this step's verdict

    def skip(self, stats, step):
        """True when step `step` (0-based) must be skipped, from all_reduce_step's statistics."""
        # the count is all-reduced, so every rank reaches the same verdict and no rank waits alone
        self.skipped = stats["nonfinite"] > 0
        self.bad_steps = self.bad_steps + 1 if self.skipped else 0
        if self.skipped:
            log(f"step {step + 1}: non-finite loss, step skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= 3:
            raise UsageError("3 steps in a row had a non-finite loss; lower --lr or check the rewards")
        return self.skipped

    def check_weights(self, params, step, lr):
        """Stop if the update of step `step` made any of `params` non-finite."""
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise UsageError(f"step {step + 1} made the LoRA weights non-finite (--lr {lr:g} too high?); "
                             f"stopped before saving them (the checkpoints on disk are intact)")


# ----------------------------------------------------------------------------------------------
# Memory probes: allocated bytes on a GPU, resident memory (RSS) on a CPU

def rss_mb(field_name="VmRSS"):
    """Resident memory of this process (MiB) from /proc (Linux); VmHWM is its peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name):  # e.g. "VmRSS:   123456 kB"
                return int(line.split()[1]) / 1024
    return 0.0  # no such field (not Linux): the probes report 0 rather than fail a run


def reset_peak(device):
    """Start a peak-memory measurement; returns the baseline (MiB)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()  # start once earlier work has finished, as StepClock's laps do
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2 ** 20
    if os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
            f.write("5")
    return rss_mb()


def peak_growth(device, base):
    """Peak memory since reset_peak, above its baseline (MiB)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20 - base
    return rss_mb("VmHWM") - base


def memory_in_use(device):
    """Memory this process holds now (MiB): allocated on a GPU, resident (RSS) on a CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.memory_allocated() / 2 ** 20
    return rss_mb()


class StepClock:
    """Wall time of the parts of one RL step (lap after each) and its peak memory, for the metrics row."""

    def __init__(self, device):
        self.device, self.laps = device, {}
        self.start = self.last = time.time()
        self.mem0 = reset_peak(device)  # the step's baseline; its peak is measured from here

    def lap(self, name):
        # CUDA runs kernels after the host queued them: wait for them, else this part's queued work
        # would be timed in the next part's lap (once per lap: 3 waits per step)
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()
        now = time.time()
        self.laps[name], self.last = now - self.last, now  # seconds since the previous lap or the start

    def row(self, mem_start):
        """time/<part>_s, time/step_s, mem/peak_mb (above the step's start) and mem/total_mb (above
        `mem_start`, the process before anything loaded)."""
        row = {f"time/{name}_s": seconds for name, seconds in self.laps.items()}
        row["time/step_s"] = time.time() - self.start
        row["mem/peak_mb"] = peak_growth(self.device, self.mem0)
        row["mem/total_mb"] = row["mem/peak_mb"] + self.mem0 - mem_start
        return row


# ----------------------------------------------------------------------------------------------
# Video files, and PNG figures drawn with PIL (no plotting library needed)

def save_video(path, video, fps=16):
    """Write (F, 3, H, W) floats in [0, 1] as an H.264 mp4 (imageio + its bundled ffmpeg).
    Written to a temporary file first and renamed, so a crash never leaves half a video."""
    import imageio.v2 as imageio  # its ffmpeg starts only when a video is written
    # round, not truncate: truncation would darken every frame by half a level on average
    frames = (video.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (F, H, W, 3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # yuv420p: plays in every player; macro_block_size=1: imageio never resizes the frames
    write_atomic(path, lambda tmp: imageio.mimwrite(tmp, list(frames), fps=fps, codec="libx264", quality=8,
                                                    pixelformat="yuv420p", macro_block_size=1))


def save_strip(path, videos, labels=None, frames=8, scale=2):
    """A PNG of frame strips, one row per video ((F, 3, H, W) in [0, 1]): `frames` evenly spaced
    frames per row, upscaled `scale`x (nearest) so tiny videos stay visible. labels: one text per
    row, printed on a white band above it."""
    rows = []
    for v in videos:
        # evenly spaced frames, first and last included, each at most once
        idx = torch.linspace(0, len(v) - 1, min(frames, len(v))).round().long()
        rows.append(torch.cat(list(v[idx]), dim=-1))  # (3, H, frames * W)
    band = 14 if labels else 0  # pixels of label text above each row
    row_h, width = rows[0].shape[1] * scale, rows[0].shape[2] * scale
    img = Image.new("RGB", (width, len(rows) * (row_h + band)), "white")
    draw = ImageDraw.Draw(img)
    for i, row in enumerate(rows):
        # nearest-neighbour upscaling: every pixel becomes a scale x scale block, nothing is blurred
        row = row.clamp(0, 1).repeat_interleave(scale, -1).repeat_interleave(scale, -2)
        arr = (row * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        top = i * (row_h + band)
        img.paste(Image.fromarray(arr), (0, top + band))
        if labels:
            draw.text((2, top + 1), labels[i], fill="black")
    write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))


def save_curve(path, series, title="reward", size=(560, 320)):
    """A line chart PNG: series = {name: (xs, ys)}, one coloured line each, a legend, y ticks."""
    W, H, m = size[0], size[1], 44  # canvas and margin
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = [x for v in series.values() for x in v[0]]
    ys = [y for v in series.values() for y in v[1]]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)  # a single step still spans one unit: no division by 0
    pad = 0.05 * ((max(ys) - min(ys)) or 1)  # 5% head room above and below the data
    y0, y1 = min(ys) - pad, max(ys) + pad

    def px(x):  # data -> pixel coordinates
        return m + (x - x0) / (x1 - x0) * (W - 2 * m)

    def py(y):
        return H - m - (y - y0) / (y1 - y0) * (H - 2 * m)
    d.rectangle([m, m, W - m, H - m], outline="black")
    d.text((m, 8), title, fill="black")
    for y in (y0, (y0 + y1) / 2, y1):  # three y ticks: bottom, middle, top
        d.text((4, py(y) - 6), f"{y:.3f}", fill="black")
    d.text((m, H - m + 6), f"{x0:g}", fill="black")
    d.text((W - m - 20, H - m + 6), f"{x1:g}", fill="black")
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for i, (name, (sx, sy)) in enumerate(series.items()):
        c = colors[i % len(colors)]
        pts = [(px(x), py(y)) for x, y in zip(sx, sy)]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        if len(pts) < 40:  # dots only while they stay readable
            for p in pts:
                d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=c)
        d.text((W - m - 150, m + 6 + 14 * i), name, fill=c)
    write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))


def use_bf16(args, device):
    """--bf16 auto: on with CUDA, off on a CPU."""
    if args.bf16 == "auto":
        return str(device).startswith("cuda")
    return args.bf16 == "on"


def init_distributed():
    """(rank, world, device): torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain
    `python train.py` is rank 0 of 1. NCCL between GPUs, gloo between CPU processes."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, "cuda" if cuda else "cpu"
    # NCCL runs only on GPUs; gloo lets the torchrun tests run two ranks on a CPU
    dist.init_process_group("nccl" if cuda else "gloo")
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"
    if cuda:  # else every rank's kernels and NCCL buffers land on GPU 0
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def set_threads(threads=0):
    """CPU threads per process: `threads`, or the cores this process may use divided by the ranks
    on this machine (torch's default, every core per process, makes 2 ranks on 2 cores ~6x slower)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // local_world))
    log(f"threads: {torch.get_num_threads()} per process (--threads to change)")
