"""
Everything about a run that can be wrong, checked in one pass before anything loads: every
flag's range and the batch layout, input files, rewards (each called once on a probe video) and
their weight files, optional libraries, the out-dir (one run per folder, its lock, the user's own
files in it), the checkpoint to resume and whether its flags and files allow an exact
continuation, the memory the run will need. Plus the settings that run but cannot learn, as
warnings. train.py prints every problem at once, one line each, and exits with code 2.

    args, resume_path, lineage = start_run(args, world, registry, device)  # what train.py calls: all below
    errors, warnings = check_args(args, world, registry)
    errors += check_out_dir(args)
    path, saved, notes, more = find_resume(args)  # the newest intact checkpoint of the run (or None)
    errors += resume_errors(saved, args)         # flags and files that would break the continuation
Which run an out-dir, a checkpoint and a metrics row belong to, the lock and what may be deleted:
runs.py.

Test:  python -m pytest tests/test_worst_day.py tests/test_lineage.py -q
"""
import dataclasses
import importlib.util
import json
import math
import os

from safetensors import safe_open

import torch.distributed as dist
import tyro

import memory
import runs
import tiny_world
from checkpoints import FINGERPRINTED, adapter_rank_alpha, describe_file, fingerprint
from common import UsageError, find_file, log, set_threads, use_bf16
from kvcache import check_window
from model import CONFIGS
from streaming import window_starts
from reward_models import LEARNED, missing_weights
from reward_videoalign import REWARDS as VIDEOALIGN, missing_videoalign_files
from rewards import parse_rewards, probe_rewards, takes_frames

FILES = ("ckpt", "lora_init", "vae", "text_encoder", "tokenizer", "prompt_file")
# flags a resumed run may change: they do not enter the numbers of the steps still to come
# (paths: the same files may have moved; what is in them is compared: checkpoints.FINGERPRINTED).
# Every other flag must equal the checkpoint's.
RESUME_FREE = {"out_dir", "steps", "lr", "weight_decay", "grad_clip", "ckpt_every", "keep_ckpts", "eval_every",
               "eval_prompts", "resume", "track", "progress", "threads", "overwrite", "decode_batch",
               "grad_checkpointing", "ignore_memory_check", *FILES}


def start_run(args, world, registry, device):
    """Everything before anything loads: check_run; the memory model's predicted peak (stops when
    it cannot fit); rank 0 takes the out-dir (the lock, away with what a killed run left
    half-written, run.json); CPU threads per process. Returns (args with each input file as found,
    the checkpoint folder to resume from or None, the run's lineage: runs.py)."""
    master = int(os.environ.get("RANK", 0)) == 0
    args, resume_path, saved, lineage = check_run(args, world, registry, master, device)
    # the largest window start draws the longest history
    memory.report(args, CONFIGS[args.model], start=max(window_starts(args)), world=world,
                  bf16=use_bf16(args, device), device=device)
    if world > 1:  # every rank has checked before rank 0 touches the out-dir
        dist.barrier()
    if master:
        runs.own_out_dir(args, lineage, saved["step"] if saved else 0)
    if not str(device).startswith("cuda"):  # ranks on one machine must not fight over its cores
        set_threads(args.threads)
    return args, resume_path, lineage


def training_prompts(args):
    """--prompts, then the lines of --prompt-file; the shapes world's prompts when both are empty."""
    prompts = list(args.prompts)
    if args.prompt_file:
        prompts += prompt_lines(args.prompt_file)
    return prompts or tiny_world.PROMPTS


def check_run(args, world, registry, master=True, device="cpu"):
    """Every check of a run at once: raises UsageError with one line per problem, logs the
    warnings and what a resume changes. Returns (args with each input file as found, the
    checkpoint folder to resume from or None, its state.json or None, the run's lineage)."""
    errors, warnings = check_args(args, world, registry)
    if not errors:  # each reward once on a probe video (a flag error may make the probe meaningless)
        errors += reward_probe(args, registry, device)
    errors += check_out_dir(args, check_lock=master)
    resume_path, saved, notes, resume_problems = find_resume(args)
    errors += resume_problems + resume_errors(saved, args) + runs.resume_target_errors(args, resume_path, saved)
    if errors:
        raise UsageError("\n".join(errors))
    for line in warnings + notes:
        log(f"warning: {line}")
    if saved is not None:
        for line in resume_changes(saved, args):
            log(f"resume: {line}")
    lineage = runs.run_lineage(args, resume_path, saved)
    # each input file as found (relative to the cwd, else to this repository: `assets/...` anywhere)
    found = {f: find_file(getattr(args, f)) for f in FILES if getattr(args, f)}
    return dataclasses.replace(args, **found), resume_path, saved, lineage


def check_args(args, world, registry):
    """(errors, warnings): one line each."""
    err, warn = [], []
    block = CONFIGS[args.model].frames_per_block
    # ---- ranges
    positive = {"steps": args.steps, "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
                "micro_batch": args.micro_batch, "num_frames": args.num_frames, "lora_rank": args.lora_rank,
                "keep_ckpts": args.keep_ckpts, "eval_prompts": args.eval_prompts, "height": args.height,
                "width": args.width, "decode_batch": args.decode_batch}
    for name, value in positive.items():
        if value < 1:
            err.append(f"--{name.replace('_', '-')} {value}: must be >= 1")
    for name in ("ckpt_every", "eval_every", "window", "threads", "sink", "rollout_batch", "released.aux_rewards",
                 "released.reward_frames"):
        if value_of(args, name) < 0:
            err.append(f"{flag(name)} {value_of(args, name)}: must be >= 0")
    for name in ("lr", "beta", "adv_clip", "grad_clip", "lora_alpha", "released.ref_thres_cap"):
        value = value_of(args, name)
        if not (math.isfinite(value) and value > 0):
            err.append(f"{flag(name)} {value}: must be a finite number > 0")
    for name in ("kl_weight", "weight_decay"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            err.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a finite number >= 0")
    ranges_ok = not err  # the layout checks divide by these numbers
    # ---- the batch layout must be the same whatever the world size
    N = args.prompts_per_step * args.group_size
    if ranges_ok and (N % world or (N // world) % args.micro_batch):
        err.append(f"prompts_per_step x group_size = {N} samples must split evenly over {world} rank(s) and "
                   f"then into micro-batches of {args.micro_batch}; change --prompts-per-step, --group-size "
                   f"or --micro-batch")
    # ---- video, window and cache
    T = args.window or args.num_frames
    if ranges_ok and (args.num_frames % block or T % block or T > args.num_frames):
        err.append(f"--num-frames {args.num_frames} and --window {T} must be multiples of the block size "
                   f"{block}, with the window inside the video")
    bad = [x for x in args.window_starts if x % block or not 0 <= x <= args.num_frames - T]
    if bad or (args.window_select == "random_choice" and not args.window_starts):
        err.append(f"--window-starts {args.window_starts}: give block-aligned starts in [0, "
                   f"{args.num_frames - T}] for --window-select random_choice")
    if args.window_starts and args.window_select != "random_choice":
        warn.append(f"--window-starts is used only by --window-select random_choice (here "
                    f"{args.window_select}): ignored")
    try:
        check_window(block, args.sink, args.local_attn)
    except ValueError as e:
        err.append(f"--local-attn {args.local_attn} --sink {args.sink}: {e}")
    if args.sink and args.local_attn < 0:
        warn.append("--sink is used only with a rolling cache (--local-attn > 0): ignored")
    cfg = CONFIGS[args.model]
    step = cfg.patch_size[1] * (1 if args.model == "tiny" else 8)  # pixels per token side
    if ranges_ok and (args.height % step or args.width % step):
        err.append(f"--height {args.height} --width {args.width}: must be multiples of {step} for "
                   f"--model {args.model} ({'its patch' if args.model == 'tiny' else 'the VAE x the patch'})")
    # ---- files: each as given, else relative to this repository
    missing = [f"--{f.replace('_', '-')} {getattr(args, f)}" for f in FILES
               if getattr(args, f) and not os.path.exists(find_file(getattr(args, f)))]
    if missing:
        err.append("not found: " + ", ".join(missing) + " (download list and default paths: README, "
                   "Real models; or point the flags at your copies)")
    if args.prompt_file and os.path.exists(find_file(args.prompt_file)):
        path = find_file(args.prompt_file)
        if not os.path.isfile(path):
            err.append(f"--prompt-file {args.prompt_file}: not a file")
        else:
            try:
                if not prompt_lines(path):
                    err.append(f"--prompt-file {args.prompt_file}: no prompts in it (one per line)")
            except UsageError as e:
                err.append(str(e))
    err += lora_init_errors(args)
    if args.model != "tiny":
        for name in ("ckpt", "vae", "text_encoder"):
            if not getattr(args, name):
                err.append(f"--model {args.model} needs {flag(name)} (README, Real models)")
        if not (args.prompts or args.prompt_file):
            err.append(f"--model {args.model}: give training prompts with --prompt-file or --prompts")
        for lib in ("diffusers", "transformers"):
            if importlib.util.find_spec(lib) is None:
                err.append(f"--model {args.model} needs the {lib} package (pip install -r requirements.txt)")
    # ---- rewards: names, files, weights, the selective mode's needs
    try:
        parsed = parse_rewards(args.rewards, registry, args.released.reward_frames)
    except (Exception, SystemExit) as e:  # a user's reward file that fails to import (or exits) lands here too
        err.append(f"--rewards: {type(e).__name__}: {e}")
        parsed = []
    if not args.rewards:
        err.append("--rewards: none given; name at least one, e.g. --rewards shape_match=1 color_match=1")
    names = [name for name, _, _ in parsed]
    framed = [name for name, fn, _ in parsed if takes_frames(fn)]  # what --released.reward-frames reaches
    err += [f"--rewards: {line}" for line in missing_weights(names) + missing_videoalign_files(names)]
    if any(name in LEARNED for name in names) and importlib.util.find_spec("open_clip") is None:
        err.append("learned rewards need the open_clip_torch package (pip install -r requirements.txt)")
    if args.selective and len(names) < 2:
        err.append("--selective needs at least two rewards (the first is the main one)")
    if args.track and importlib.util.find_spec("wandb") is None:
        err.append("--track needs the wandb package (pip install wandb), or leave --track off")
    # ---- settings that run but cannot learn, or flags that something else makes inert
    if args.group_size == 1:
        warn.append("--group-size 1: every advantage is 0 (r = 0.5), so the loss has no gradient; "
                    "use 2 or more videos per prompt")
    if not args.selective and not args.exact_reference:
        default = type(args.released)()
        inert = [flag(f"released.{name}") for name in ("aux_rewards", "uncertainty_sign", "rank_ties", "ref_thres_cap")
                 if getattr(args.released, name) != getattr(default, name)]
        if inert:
            warn.append(f"{', '.join(inert)}: used only with --selective: ignored")
    if args.released.reward_frames != 8 and not args.exact_reference and not framed:
        takers = sorted(name for name, fn in registry.items() if takes_frames(fn))
        warn.append(f"--released.reward-frames: used only by rewards with a `frames` keyword "
                    f"({', '.join(takers)}): ignored")
    if args.model == "tiny":
        unreadable = [p for p in args.prompts if not tiny_world.readable(p)]
        if args.prompt_file and os.path.isfile(find_file(args.prompt_file)) and not err:
            unreadable += [p for p in prompt_lines(find_file(args.prompt_file)) if not tiny_world.readable(p)]
        if unreadable:
            warn.append(f"{len(unreadable)} prompt(s) the tiny model cannot read (it knows "
                        f"'a <colour> <shape> moving <direction>', tiny_world.PROMPTS), e.g. "
                        f"{unreadable[0]!r}: its detectors score them 0 and nothing is learned")
    return err, warn


def prompt_lines(path):
    """The non-empty lines of a prompt file (UTF-8 text; anything else is a UsageError naming it)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise UsageError(f"--prompt-file {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} on line {line}); "
                         f"save it as UTF-8") from None
    except OSError as e:
        raise UsageError(f"--prompt-file {path}: cannot read it ({e.strerror})") from None


def parse_cli(args_class, presets, argv, doc):
    """`train.py [PRESET] [--flags]`: a leading word names the preset (a named default of
    args_class), the flags override it; the --help text lists the presets."""
    argv = list(argv)
    name = "tiny"
    if argv and not argv[0].startswith("-"):  # a leading word names the preset
        name = argv.pop(0)
    if name not in presets:
        raise UsageError(f"unknown preset {name!r}; presets: {', '.join(presets)}")
    return tyro.cli(args_class, args=argv, default=presets[name],
                    description=doc.split("\n\n")[0] + f"\n\nPresets: {', '.join(presets)}")


def released_behaviour(args, released):
    """args with every value of `released` (train.RELEASED) in place: what --exact-reference runs,
    said in the log."""
    args = dataclasses.replace(args, **released)
    flags = {k: v for k, v in flat_args(args).items() if k in flat_args(released)}
    log("--exact-reference: " + ", ".join(f"{flag(k)} {v}" for k, v in flags.items()))
    return args


def lora_init_errors(args):
    """The rank and alpha --lora-init declares (adapter_config.json, or the original-Wan file's
    .alpha), when it declares them, must agree with --lora-rank and --lora-alpha: the run records
    and exports those, and a resume rebuilds its adapters from them."""
    path = find_file(args.lora_init) if args.lora_init else None
    if path is None or not os.path.exists(path):
        return []
    try:
        rank, alpha, where = adapter_rank_alpha(path)
    except FileNotFoundError as e:  # a folder without adapter files
        return [f"--lora-init {args.lora_init}: {e}"]
    except (OSError, ValueError) as e:
        return [f"--lora-init {args.lora_init}: cannot read its adapter_config.json ({type(e).__name__})"]
    err = []
    if rank is not None and rank != args.lora_rank:
        err.append(f"--lora-rank {args.lora_rank}: the --lora-init adapter has rank {rank} ({where}); "
                   f"give --lora-rank {rank}")
    if alpha is not None and alpha != args.lora_alpha:
        err.append(f"--lora-alpha {args.lora_alpha}: the --lora-init adapter was trained with alpha "
                   f"{alpha} ({where}); give --lora-alpha {alpha}")
    return err


def reward_probe(args, registry, device):
    """Each reward called once on two small random videos shaped as the run's (rewards.probe_rewards):
    a wrong signature, output or an exception is one line naming the reward and its file, before
    anything loads. The learned rewards are not called: they would load their models (GBs)."""
    try:
        parsed = parse_rewards(args.rewards, registry, args.released.reward_frames)
    except (Exception, SystemExit):  # reported by check_args already
        return []
    cheap = [spec for spec in parsed if spec[0] not in LEARNED and spec[0] not in VIDEOALIGN]
    T = args.window or args.num_frames
    if args.model == "tiny":  # pixel space: the videos the rewards will see, at their size
        shape = (T, 3, args.height, args.width)
    else:  # a Wan video decodes to 1 + 4 (T - 1) frames at 480x832: probe a few small frames instead
        shape = (1 + 4 * (min(T, 3) - 1), 3, 64, 64)
    prompts = (list(args.prompts) or tiny_world.PROMPTS)[:2]
    return probe_rewards(cheap, shape, (prompts * 2)[:2], device)


def check_out_dir(args, check_lock=True):
    """Errors if the out-dir cannot be written, belongs to another run (or, with check_lock, to a
    live one), or holds files this project did not write that --overwrite would have to pass over."""
    out = args.out_dir
    if not out.strip():
        return ["--out-dir '': give a folder name (e.g. --out-dir out/run1)"]
    if os.path.exists(out) and not os.path.isdir(out):
        return [f"--out-dir {out}: is a file, not a folder"]
    parent = out
    while not os.path.exists(parent):  # the nearest folder that exists must be writable
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.path.isdir(parent):
        return [f"--out-dir {out}: {parent} is a file, not a folder"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"--out-dir {out}: cannot write into {parent}"]
    holder = runs.lock_holder(out) if check_lock else None
    if holder:
        return [runs.live_message(out, holder)]
    if not runs.holds_run(out) or args.resume:
        return []
    if not args.overwrite:
        n = len(runs.run_checkpoints(out))
        return [f"--out-dir {out}: holds another run ({n} checkpoint(s), "
                f"{'a' if os.path.exists(os.path.join(out, 'metrics.jsonl')) else 'no'} metrics.jsonl); "
                f"--resume latest continues it, --overwrite replaces it, or choose another --out-dir"]
    foreign = [os.path.relpath(p, out) for p in runs.survey(out)["foreign"]]
    if foreign:  # --overwrite deletes only what this project wrote: it will not leave a mixed folder
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        return [f"--out-dir {out}: --overwrite deletes only this project's files, and {out} also holds "
                f"{len(foreign)} other(s): {', '.join(foreign[:5])}{more}; move them away or choose another --out-dir"]
    return []


# ---- resume

def checkpoint_problem(path):
    """Why a checkpoint folder cannot be resumed from (None if it is intact)."""
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        for name in ("adapters.safetensors", "optim.safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:  # reads and checks the header
                for key in f.keys():
                    f.get_slice(key)
        if not isinstance(state.get("step"), int) or "args" not in state:
            return "state.json has no step / args"
    except Exception as e:
        return f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
    named = runs.checkpoint_step(path)
    if named is not None and named != state["step"]:  # renamed or copied over another: which step is it?
        return f"its folder name says step {named} but its state.json says step {state['step']}"
    return None


def find_resume(args):
    """(checkpoint folder or None, its state.json or None, notes, errors): for --resume latest the
    newest intact checkpoint of the run that wrote the out-dir last (its lineage, runs.py: a damaged
    newer one, or one of another run or an abandoned branch, is noted and skipped; none at all: a
    fresh start), or the folder --resume names."""
    if not args.resume:
        return None, None, [], []
    latest = args.resume == "latest"
    lineage = runs.read_lineage(args.out_dir) if latest else None  # None: any (an out-dir from before lineages)
    candidates = runs.run_checkpoints(args.out_dir)[::-1] if latest else [args.resume]
    notes, others = [], []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is not None:
            notes.append(f"checkpoint {path} is damaged ({problem}): skipped")
            continue
        state = runs.read_state(path)
        if lineage is not None and not runs.continues(lineage, runs.lineage_id(state), state["step"]):
            others.append(os.path.basename(path))
            continue
        if others:
            notes.append(f"--resume latest: skipped {', '.join(others)}: of another run or an abandoned branch "
                         f"(not of run {lineage['id']}, which wrote {args.out_dir} last)")
        return path, state, notes, []
    if latest and len(notes) == 0:
        why = f" ({', '.join(others)}: of other runs)" if others else ""
        return None, None, [f"--resume latest: no checkpoint of the run in {args.out_dir} yet{why}: starting "
                            f"fresh"], []
    return None, None, [], notes + [f"--resume {args.resume}: no intact checkpoint to resume from"]


def flat_args(args):
    """{"lr": ..., "released.train_mask": ...}: every flag by its dotted name, from an Args or from
    a checkpoint's state.json args."""
    d = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else args
    out = {}
    for key, value in d.items():
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        if isinstance(value, dict):  # a flag group (--released.*)
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def value_of(args, name):
    """args.<name> for a dotted name (released.train_mask)."""
    for part in name.split("."):
        args = getattr(args, part)
    return args


def flag(name):
    """The command-line spelling of a field: released.ref_thres_cap -> --released.ref-thres-cap."""
    return "--" + name.replace("_", "-")


def resume_errors(saved, args):
    """Flags that differ from the checkpoint's and would break an exact continuation."""
    if saved is None:
        return []
    old, new = flat_args(saved["args"]), flat_args(args)
    errors = []
    for key, value in new.items():
        if key not in RESUME_FREE and key in old and old[key] != _jsonable(value):
            errors.append(f"{flag(key)} {value}: the checkpoint was trained with {old[key]} "
                          f"(resuming needs the same value; start a new --out-dir to change it)")
    # the same files, wherever they are now (a checkpoint from before fingerprints: at least a
    # file where there was none, --ckpt None for a random base, is a change)
    files = saved.get("files", {name: None for name in FINGERPRINTED if old.get(name) is None})
    for name, was in files.items():
        now = fingerprint(getattr(args, name))
        if now != was:
            errors.append(f"{flag(name)} {getattr(args, name)}: not the file the checkpoint was trained with "
                          f"({describe_file(was)}; now {describe_file(now)}); resuming needs the same file")
    if args.steps <= saved["step"]:
        errors.append(f"--steps {args.steps}: the checkpoint is already at step {saved['step']}; give a "
                      f"larger --steps to train on")
    return errors


def resume_changes(saved, args):
    """'--flag new (was old)' for the free flags a resumed run changes."""
    old = flat_args(saved["args"])
    return [f"{flag(k)} {v} (was {old[k]})" for k, v in flat_args(args).items()
            if k in RESUME_FREE and k in old and old[k] != _jsonable(v) and k not in ("resume", "overwrite")]


def _jsonable(value):
    """A value as it reads back from state.json (tuples become lists)."""
    return json.loads(json.dumps(value))
