"""
One run per out-dir and one lineage per run: who may write an out-dir (the lock), which of its
files this project wrote (the only ones it ever deletes), and which checkpoints and metrics rows
continue which run (the lineage).

  lineage    {"id": 8 hex digits, "ancestry": [[id, last step], ...]}. A fresh start draws a new id;
             `--resume latest` keeps the id of the run that wrote the out-dir last (its run.json);
             resuming from a named checkpoint starts a branch: a new id whose ancestry is that
             checkpoint's lineage up to its step. Every checkpoint's state.json and every metrics
             row carry the id, so a resume keeps exactly the rows and checkpoints of its own history.
  lock       out/.lock, held with flock(2) while the run lives: the kernel grants it to one process
             at a time (two starts at the same moment: one runs) and drops it when the process dies,
             however it dies, so a lock left behind is never mistaken for a live run, whoever now has
             the pid written in it (the pid and host are in the file only for the message).
  ownership  survey(out): the paths this project writes, by their exact names (OUT_FILES, eval/step_*.mp4,
             ckpt_<step>/ with its CKPT_FILES, and write_atomic's temporaries of these), and
             everything else ("foreign": never deleted; --overwrite refuses while there is any).
  pruning    only the checkpoints of the run's own lineage count towards --keep-ckpts: a foreign
             ckpt_* folder never pushes the newest checkpoint out.

Test:  python -m pytest tests/test_lineage.py tests/test_worst_day.py -q
"""
import fcntl
import glob
import json
import os
import re
import secrets
import socket

from common import UsageError, log, temp_origin, write_atomic

# what a run writes at the top of its out-dir (besides eval/ and ckpt_<step>/); .lock is never
# deleted by a clean-up (it is the live run's own lock)
OUT_FILES = ("metrics.jsonl", "run.json", "before_after.mp4", "before_after.png", "reward_curve.png", ".lock")
# what says that an out-dir holds a run (a stale .lock alone does not)
OUTPUTS = ("metrics.jsonl", "run.json", "eval", "before_after.mp4", "before_after.png", "reward_curve.png")
CKPT_FILES = ("adapters.safetensors", "optim.safetensors", "state.json")
# ckpt_<step>/lora/: the exported policy (PEFT files, and the original-Wan layout for diffusers / ComfyUI)
LORA_FILES = ("adapter_model.safetensors", "adapter_config.json", "pytorch_lora_weights.safetensors")
CKPT_NAME = re.compile(r"ckpt_(\d+)")
EVAL_NAME = re.compile(r"step_\d{6}\.mp4")
_HELD = {}  # out-dir (real path) -> the open .lock whose flock is this process's hold on it


# ----------------------------------------------------------------------------------------------
# Checkpoint folders

def checkpoint_step(path):
    """The step of a ckpt_<step> folder (None for another name)."""
    m = CKPT_NAME.fullmatch(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def run_checkpoints(out_dir):
    """ckpt_<step> folders of out_dir, oldest step first (not the temporaries of a write)."""
    found = [p for p in glob.glob(os.path.join(glob.escape(out_dir), "ckpt_*"))
             if checkpoint_step(p) is not None and os.path.isdir(p)]
    return sorted(found, key=checkpoint_step)


def read_state(path):
    """A checkpoint's state.json (None when it cannot be read)."""
    try:
        with open(os.path.join(path, "state.json")) as f:
            return json.load(f)
    except (OSError, ValueError):  # missing, half-written or not JSON: the caller treats it as foreign
        return None


# ----------------------------------------------------------------------------------------------
# Lineage

def lineage_id(state):
    """The lineage id a checkpoint's state.json records (None: written before lineages existed)."""
    # checkpoints written before lineages existed have no "lineage" key: their id is None
    return (state.get("lineage") or {}).get("id")


def new_lineage(parent=None):
    """A new run's lineage: a fresh id; resumed from a checkpoint (`parent`: its state.json), the
    ancestry that checkpoint continues, headed by the checkpoint's own lineage up to its step."""
    ancestry = []
    if parent is not None:
        # the parent's own lineage (or, for a checkpoint from before lineages, an unnamed one)
        theirs = parent.get("lineage") or {"id": None, "ancestry": []}
        # the branch inherits the parent lineage's history up to the checkpoint's step, no further
        ancestry.append([theirs["id"], parent["step"]])
        for lid, last in theirs["ancestry"]:  # the parent's ancestors, never past the branch point
            ancestry.append([lid, min(last, parent["step"])])
    # 8 random hex digits: two runs of one folder never share an id by chance in practice
    return {"id": secrets.token_hex(4), "ancestry": ancestry}


def continues(lineage, lid, step):
    """Whether a checkpoint or row of lineage `lid` at `step` is part of `lineage`'s history: its
    own, or an ancestor's up to the step this lineage branched from it."""
    if lid == lineage["id"]:  # written by this lineage itself: every step counts
        return True
    # an ancestor's rows and checkpoints count only up to the step this lineage branched from it
    return any(lid == ancestor and step <= last for ancestor, last in lineage["ancestry"])


def read_lineage(out):
    """The lineage of the run that wrote out/run.json last (None: no run.json)."""
    try:
        with open(os.path.join(out, "run.json")) as f:
            return json.load(f)["lineage"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_lineage(args, path, saved):
    """The lineage this run writes under: a new one (fresh start), the out-dir's own (--resume
    latest, which found a checkpoint of it), or a branch from the checkpoint --resume names."""
    if saved is None:  # nothing to resume: a fresh start, a fresh id
        return new_lineage()
    current = read_lineage(args.out_dir)
    if args.resume == "latest" and current is not None:  # continue the run that wrote here last
        return current
    # an explicit checkpoint (or a folder from before run.json): a branch, said in one line
    lineage = new_lineage(saved)
    log(f"resume: branch {lineage['id']} from {path} (step {saved['step']} of run {lineage_id(saved)}); "
        f"--resume latest follows this branch from now on")
    return lineage


def resume_target_errors(args, path, saved):
    """--resume PATH into an --out-dir that holds another run: refused (its rows and checkpoints
    would mix with this one's). The out-dir's run is the checkpoint's own when the checkpoint's
    lineage is in its family (or, in an out-dir from before lineages, when it lies in the out-dir)."""
    # --resume latest reads its checkpoint from the out-dir itself, and an empty out-dir holds no run
    if saved is None or args.resume == "latest" or not holds_run(args.out_dir):
        return []
    current = read_lineage(args.out_dir)
    if current is not None:
        # the out-dir's run and every run it descends from: branching from any of them stays in family
        family = [current["id"]] + [lid for lid, _ in current["ancestry"]]
        if lineage_id(saved) in family:
            return []
    # no run.json (written before lineages): the checkpoint is the out-dir's own if it lies in it
    elif os.path.samefile(os.path.dirname(os.path.abspath(path)), args.out_dir):
        return []
    return [f"--resume {path} --out-dir {args.out_dir}: the out-dir holds another run (lineage "
            f"{(current or {}).get('id')}, the checkpoint's is {lineage_id(saved)}); resume into an empty "
            f"--out-dir or into the checkpoint's own folder"]


def metrics_rows(path, step, lineage):
    """(the rows of metrics.jsonl this run keeps, how many others there were): a row stays when it
    belongs to the run's lineage (its own or an ancestor's, up to the branch point) and comes no
    later than `step`, the checkpoint resumed (0: a fresh start keeps none). Rows after it (a crash,
    or a branch abandoned), of another run, or damaged (a full disk, a kill mid-write) go."""
    if not os.path.exists(path):
        return [], 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            # a JSON line that is not a row of ours (a user's edit) is dropped like a damaged one
            good = isinstance(row, dict) and isinstance(row.get("step"), int)
            if good and row["step"] <= step and continues(lineage, row.get("lineage"), row["step"]):
                kept.append(row)
            else:
                dropped += 1
    return kept, dropped


# ----------------------------------------------------------------------------------------------
# What in an out-dir this project wrote

def child_kind(kind, name):
    """What `name` inside a folder of `kind` ("out", "eval", "ckpt", "lora") is when this project
    wrote it: "file", the kind of folder it is, or None (not a name of ours)."""
    if kind == "out":
        if name in OUT_FILES:
            return "file"
        if name == "eval":
            return "eval"
        if CKPT_NAME.fullmatch(name):
            return "ckpt"
    elif kind == "eval" and EVAL_NAME.fullmatch(name):
        return "file"
    elif kind == "ckpt":
        if name in CKPT_FILES:
            return "file"
        if name == "lora":
            return "lora"
    elif kind == "lora" and name in LORA_FILES:
        return "file"
    return None


def survey(out):
    """{"files", "dirs", "temps", "foreign"}: under `out`, the files and folders this project wrote
    (by their exact names, write_atomic's temporaries of them included; folders outermost first),
    the temporaries among them (a killed write's leftovers), and every other path (a user's file,
    anything in a folder of ours that we never write there). A `wandb` folder (--track) is neither."""
    found = {"files": [], "dirs": [], "temps": [], "foreign": []}
    stack = [(out, "out")] if os.path.isdir(out) else []
    while stack:
        folder, kind = stack.pop()
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if kind == "out" and name == "wandb":  # Weights & Biases' own folder: left as it is
                continue
            # a write_atomic temporary is judged by the name it stands for (ckpt_000004.astrolabe-old7
            # is a checkpoint folder of ours), every other name as it is
            child = child_kind(kind, temp_origin(name) or name)
            plain = not os.path.islink(path)  # a link is never ours: we write plain files
            if child == "file" and plain and os.path.isfile(path):
                found["files"].append(path)
            elif child not in (None, "file") and plain and os.path.isdir(path):
                found["dirs"].append(path)
                stack.append((path, child))  # look inside: a folder of ours may hold a user's file
            else:  # not a name we write, or the right name but the wrong kind (a folder called metrics.jsonl)
                found["foreign"].append(path)
                continue
            if temp_origin(name) is not None:  # ours, and left half-written by a killed run
                found["temps"].append(path)
    return found


def holds_run(out):
    """Whether `out` holds a run's outputs (a metrics.jsonl, run.json, eval/, a checkpoint, ...)."""
    return any(os.path.exists(os.path.join(out, f)) for f in OUTPUTS) or bool(run_checkpoints(out))


def remove(paths, found):
    """Delete each of `paths` (files and folders survey() found ours): of a folder only what survey()
    found ours inside it, so a folder that also holds something else stays, with that in it."""
    def inside(p):
        return any(p == top or p.startswith(top + os.sep) for top in paths)
    for f in found["files"]:
        if inside(f):
            os.remove(f)
    for d in sorted(found["dirs"], key=len, reverse=True):  # deepest first: the folders empty out
        if inside(d):
            try:
                os.rmdir(d)
            except OSError:  # not empty: something not ours is inside; it stays
                log(f"warning: {d} kept: it holds files this project did not write")


def prune(out, lineage, keep):
    """Keep the newest `keep` checkpoints of `lineage`'s history in out (step order); delete the
    older ones. Checkpoints of another run or branch, and unreadable ones, are never counted or
    deleted."""
    ours = []
    for path in run_checkpoints(out):
        state = read_state(path)
        # a foreign or unreadable ckpt_* folder never counts, so it cannot push ours out
        if isinstance(state, dict) and isinstance(state.get("step"), int) and \
                continues(lineage, lineage_id(state), state["step"]):
            ours.append(path)
    if len(ours) > keep:  # run_checkpoints sorts by step: the oldest go
        remove(ours[:-keep], survey(out))


def own_out_dir(args, lineage, start):
    """Rank 0 takes the out-dir: the lock, then away with what a killed run left half-written, with
    the eval videos after `start` (their rows go too) and, on a fresh --overwrite, with the old
    run's outputs; all by their exact names. Then run.json names this run's lineage."""
    take_lock(args.out_dir)
    if holds_run(args.out_dir) and not (args.resume or args.overwrite):  # a run that started and ended
        release_lock(args.out_dir)  # between our checks and our lock: the folder is no longer free
        raise UsageError(f"--out-dir {args.out_dir}: another run wrote there while this one started; "
                         f"choose another --out-dir, or --resume latest")
    found = survey(args.out_dir)
    doomed = list(found["temps"])  # a killed run's half-written files: always ours to remove
    for path in found["files"]:
        # eval videos after the step we start from belong to steps this run will redo
        step = re.fullmatch(r"step_(\d{6})\.mp4", os.path.basename(path))
        if os.path.basename(os.path.dirname(path)) == "eval" and step and int(step.group(1)) > start:
            doomed.append(path)
    if args.overwrite and not args.resume:  # checks refused --overwrite while anything foreign is here
        doomed += [p for p in found["files"] + found["dirs"] if os.path.basename(p) != ".lock"]
    remove(doomed, found)
    # written last: only a run that got this far names the out-dir's lineage
    write_atomic(os.path.join(args.out_dir, "run.json"),
                 lambda tmp: _write_json(tmp, {"lineage": lineage, "resumed_from": args.resume}))


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


# ----------------------------------------------------------------------------------------------
# The lock: one live run per out-dir

def lock_holder(out):
    """Who holds out/.lock, as its file says ("pid 123 on host"), or None: no lock file, or one no
    live process holds (its run died; the pid in it may belong to another process by now), or
    this process's own."""
    path = os.path.join(out, ".lock")
    if os.path.realpath(out) in _HELD:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (or none we could read: then nobody can hold it either)
        return None
    try:  # a shared lock is granted unless a live process holds the exclusive one
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _describe(os.read(fd, 200).decode(errors="replace"))
    except OSError:  # no file locks on this file system: take_lock says so
        return None
    finally:
        os.close(fd)  # closing drops our shared lock at once


def _describe(text):
    """'pid 123 on host' from the lock file's JSON (a lock being written may still be empty)."""
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}"
    except (ValueError, KeyError, TypeError):
        return "pid unknown"


def take_lock(out):
    """Hold out/.lock (flock, exclusive) until release_lock or this process ends; UsageError when a
    live run holds it. Atomic: of two runs starting at the same moment exactly one gets it."""
    os.makedirs(out, exist_ok=True)
    key, path = os.path.realpath(out), os.path.join(out, ".lock")
    if key in _HELD:  # taken again in one process (tests call main twice): the old hold goes
        os.close(_HELD.pop(key))
    while True:
        # O_CREAT without O_EXCL: the file may stay from a dead run; the flock, not the file, is the lock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 200).decode(errors="replace"))
            os.close(fd)
            raise UsageError(live_message(out, holder)) from None
        except OSError as e:  # ENOLCK: a network file system without locks
            os.close(fd)
            raise UsageError(f"--out-dir {out}: cannot lock {path} ({e.strerror}); choose an --out-dir on a "
                             f"file system with file locks") from None
        # a run releasing the lock deletes the file: if ours is no longer the file at `path`,
        # another start may already hold the new one; try again on that one
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    # who holds it, for the message another start prints (the flock alone decides)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    _HELD[key] = fd  # the open descriptor is the hold: closing it (or dying) releases the flock


def live_message(out, holder):
    return (f"--out-dir {out}: a live run ({holder}) is writing there; wait for it, stop it, or choose "
            f"another --out-dir")


def release_lock(out):
    """Delete out/.lock if this process holds it, then let go (in that order: a start waiting on
    the old file sees it gone and takes a new one)."""
    fd = _HELD.pop(os.path.realpath(out), None)
    if fd is not None:
        try:
            os.remove(os.path.join(out, ".lock"))
        except FileNotFoundError:  # someone deleted it by hand meanwhile
            pass
        os.close(fd)
