"""
Checkpoint files: the released distilled generators (read), LoRA adapter files (read and write),
and train.py's own run checkpoints (write, read, find). One strict key check serves the
generators here and the frozen VAE / umT5 in frozen.py.

Released generators (docs/wan_architecture.md#checkpoint-files): every one is the reference
wrapper's `state_dict()` inside some container; unwrap it, strip the wrapper prefixes and the
keys are exactly model.py's:
    Self-Forcing / Causal Forcing / LongLive   .pt   {"generator_ema": sd, "generator": sd, ...}
    Krea Realtime 14B                          .safetensors, a bare state dict
    LongLive lora.pt                           {"generator_lora": PEFT-keyed LoRA tensors}
A run checkpoint `ckpt_<step>/` holds adapters.safetensors (every adapter), optim.safetensors
(AdamW moments), state.json (step, args, schedule states, the run's lineage (runs.py), the
fingerprints of the files it read) and lora/ (the exported policy, save_adapter: PEFT's
adapter_model.safetensors + adapter_config.json, and the original-Wan layout's
pytorch_lora_weights.safetensors that diffusers and ComfyUI load). Tensors go to safetensors,
everything else to JSON; nothing is pickled.
load_base gives train.py its frozen base from --ckpt (train.add_policies puts the adapters on it).

Test:  python -m pytest tests/test_checkpoint.py tests/test_presets.py -q
"""
import hashlib
import json
import os
import re
import shutil
import zipfile

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common import UsageError, find_file, log, write_atomic
from lora import adapter_names, adapter_state_dict, load_adapter_state, peft_config, wan_lora_state_dict
from model import CONFIGS, CausalWanModel, randomize_head
from runs import prune

# wrapper prefixes of the released files: WanDiffusionWrapper ("model."), FSDP, DDP, torch.compile
PREFIXES = ("model.", "_fsdp_wrapped_module.", "diffusion_model.", "module.", "_orig_mod.")


# ----------------------------------------------------------------------------------------------
# Reading any tensor file, and the one strict key check

def read_tensors(path, what="a checkpoint"):
    """The raw contents of a .safetensors or torch file, or one ValueError naming the file."""
    path = os.fspath(path)  # a pathlib.Path too; endswith below needs a str
    # a missing file and a folder, each said in words before torch's own error could bury them
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; expected {what} file (.pt / .pth / .safetensors)")
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        # mmap: a 14B checkpoint is paged in as it is assigned, never copied whole into RAM
        # (legacy non-zip files cannot be mapped); weights_only: tensors, never code
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # garbage, truncated, or pickled Python objects besides tensors
        kind = "safetensors" if path.endswith(".safetensors") else "torch.save (dict of tensors)"
        # torch's weights_only refusal buries the actual reason in a long paragraph
        why = " ".join(str(e).split()).split("WeightsUnpickler error: ")[-1]
        raise ValueError(f"cannot read {path} as {what} ({kind}): {type(e).__name__}: "
                         f"{why.split(' Check the documentation')[0][:300]}") from None


def check_keys(model, sd, path, what, hint="", skip=()):
    """strict=True, explained: one ValueError listing every missing, unexpected and mis-shaped
    key, and `hint`, the likely cause. Keys containing a `skip` string (our LoRA adapters) are
    not expected in the file."""
    # shapes only: comparing keys and shapes never touches the (possibly meta) tensors themselves
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not any(s in k for s in skip)}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    # three lists, because each points to a different cause: a wrapper prefix or another model
    # (missing / unexpected), or another size of the same model (mis-shaped)
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    shaped = [f"{k}: file {have[k]} vs model {want[k]}" for k in want if k in have and have[k] != want[k]]
    if not (missing or unexpected or shaped):  # the file fits exactly
        return
    cause = f"\n  likely cause: {hint}" if hint else ""
    # the first few of each kind: enough to recognise the layout, short enough to read
    raise ValueError(
        f"{path} does not match {what} ({len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(shaped)} mis-shaped keys):\n  missing:     {missing[:4]}\n  unexpected:  "
        f"{unexpected[:4]}\n  mis-shaped:  {shaped[:4]}{cause}")


# ----------------------------------------------------------------------------------------------
# Released generators

def strip_prefixes(sd):
    """Drop leading wrapper prefixes, repeatedly: 'model._fsdp_wrapped_module.blocks.0...'."""
    out = {}
    for k, v in sd.items():
        while k.startswith(PREFIXES):  # wrappers nest (FSDP inside the diffusion wrapper, ...)
            prefix = next(p for p in PREFIXES if k.startswith(p))
            k = k[len(prefix):]
        out[k] = v
    return out


def generator_state_dict(obj, path, ema):
    """Pick the generator state dict out of a checkpoint container (ema: generator_ema)."""
    if not isinstance(obj, dict):  # e.g. a bare tensor or a list of them, saved with torch.save
        raise ValueError(f"{path} holds a {type(obj).__name__}; expected a dict of tensors")
    if "generator_ema" in obj or "generator" in obj:  # Self-Forcing, Causal Forcing, LongLive
        want = "generator_ema" if ema else "generator"
        if want not in obj:
            other = "generator" if ema else "generator_ema"
            raise ValueError(f"{path} has no {want!r} (keys: {list(obj)}); use ema={not ema} to load {other!r}")
        obj = obj[want]
    else:  # generic trainers' containers, else a bare state dict (generator_lora: for the hint)
        for key in ("model", "state_dict", "generator_lora"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    # a training checkpoint's other entries (step counters, configs) have been left behind above;
    # anything still not a tensor means this is not the container we think it is
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path} is not a state dict: entries {bad[:5]} are not tensors (top-level "
                         f"keys: {list(obj)[:8]}; expected generator_ema / generator / model / "
                         f"state_dict or a bare state dict)")
    return strip_prefixes(obj)


def _guess_mismatch(cfg, sd):
    """The likely cause when a generator file does not fit the model: which file it is instead."""
    # from the most specific sign to the least: LoRA keys, no Wan keys at all, Wan of another size
    if any("lora_A" in k for k in sd):
        return "this looks like a LoRA file; pass it as lora="
    if "patch_embedding.weight" not in sd:
        return "no Wan DiT keys found (expected e.g. 'patch_embedding.weight', 'blocks.0.self_attn.q.weight')"
    # the size from the file itself: dim from the patch embedding, depth from block indices
    dim = sd["patch_embedding.weight"].shape[0]
    blocks = [int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))]
    n = 1 + max(blocks, default=-1)
    if (dim, n) == (cfg.dim, cfg.num_layers):
        return "same dim and depth, so another layout or variant (channels, patch, text dim?)"
    name = next((f"a {c} checkpoint" for c, m in CONFIGS.items() if (m.dim, m.num_layers) == (dim, n)),
                "a different-size checkpoint")
    return (f"this looks like {name} (dim {dim}, {n} blocks) but the model is built with dim "
            f"{cfg.dim}, {cfg.num_layers} blocks: pass the matching --model")


def load_checkpoint(model, path, *, ema=True, lora=None, lora_adapter="default"):
    """Load a released generator (Self-Forcing / Causal Forcing / LongLive .pt, Krea .safetensors).

    ema: take `generator_ema` (what Astrolabe trains from) rather than `generator`.
    lora: a LongLive lora.pt, PEFT adapter file or folder, loaded into adapter `lora_adapter`
          (not activated: lora.set_adapter(model, lora_adapter) makes forwards use it).
    A model built under `torch.device("meta")` gets the file's tensors assigned (no second copy);
    otherwise they are copied into the existing parameters, in their dtype and device.
    """
    sd = generator_state_dict(read_tensors(path), path, ema)
    check_keys(model, sd, path, "the model", hint=_guess_mismatch(model.cfg, sd), skip=(".lora.",))
    # built on meta: assign the file's tensors as the parameters (a copy into a meta tensor keeps no data)
    meta = any(v.is_meta for k, v in model.state_dict().items() if ".lora." not in k)
    # strict=False can only skip our adapters: check_keys has vouched for every other key
    model.load_state_dict(sd, strict=False, assign=meta)
    if lora is not None:
        load_adapter_file(model, lora_adapter, lora)
    return model


# ----------------------------------------------------------------------------------------------
# LoRA adapter files

# the original-Wan layout's file: the name diffusers' load_lora_weights(folder) looks for
WAN_LORA_FILE = "pytorch_lora_weights.safetensors"
# the adapter files a folder may hold, in the order the loaders take them: PEFT's (ours, the
# released code's .bin), then the original-Wan layout's
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin", WAN_LORA_FILE)


def save_adapter(model, name, folder):
    """Adapter `name` as a folder that PEFT, diffusers and ComfyUI all read: adapter_model.safetensors
    + adapter_config.json (PEFT layout) and pytorch_lora_weights.safetensors (original-Wan layout
    with per-layer alpha: WanPipeline.load_lora_weights(folder), or the file in ComfyUI's loras/)."""
    os.makedirs(folder, exist_ok=True)
    # safetensors refuses non-contiguous tensors (a transposed view); the file's bytes come from the CPU
    sd = {k: v.cpu().contiguous() for k, v in adapter_state_dict(model, name).items()}
    write_atomic(os.path.join(folder, "adapter_model.safetensors"),
                 lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    write_atomic(os.path.join(folder, "adapter_config.json"),
                 lambda tmp: _write_json(tmp, peft_config(model, name)))
    wan = {k: v.cpu().contiguous() for k, v in wan_lora_state_dict(model, name).items()}
    write_atomic(os.path.join(folder, WAN_LORA_FILE), lambda tmp: save_file(wan, tmp, metadata={"format": "pt"}))


def load_lora_init(model, path):
    """--lora-init into adapter "default"; a file that is no such adapter is a UsageError naming it."""
    try:
        load_adapter_file(model, "default", path)
    except (ValueError, OSError) as e:
        raise UsageError(f"--lora-init {path}: {' '.join(str(e).split())}") from None


def adapter_weights_file(path):
    """The weights file of an adapter path: the path itself, or a folder's first ADAPTER_FILES entry."""
    if not os.path.isdir(path):
        return path
    # the first present in ADAPTER_FILES' order: a folder of ours holds PEFT's file and the Wan one
    found = [os.path.join(path, f) for f in ADAPTER_FILES if os.path.isfile(os.path.join(path, f))]
    if not found:
        raise FileNotFoundError(f"no {', '.join(ADAPTER_FILES)} in {path}")
    return found[0]


def adapter_rank_alpha(path):
    """(rank, alpha, where it says so) of an adapter path without loading its weights: its
    adapter_config.json (PEFT), else the original-Wan file's first layer (lora_A's rows, .alpha);
    (None, None, None) when the files declare neither (LongLive's lora.pt: alpha = --lora-alpha).
    Raises FileNotFoundError for a folder without adapter files, ValueError for an unreadable config."""
    weights = adapter_weights_file(path)
    cfg = os.path.join(os.path.dirname(weights), "adapter_config.json")
    # the original-Wan file carries its own alpha: a PEFT config beside it does not speak for it
    if os.path.basename(weights) != WAN_LORA_FILE and os.path.isfile(cfg):
        with open(cfg) as f:
            config = json.load(f)
        return config.get("r"), config.get("lora_alpha"), cfg
    if weights.endswith(".safetensors"):  # a torch .pt / .bin would have to be unpickled whole
        try:
            with safe_open(weights, "pt") as f:  # the header only, plus one 0-d tensor
                a = next((k for k in f.keys() if k.endswith(".alpha")), None)
                if a is not None:
                    rank = f.get_slice(a[:-len("alpha")] + "lora_A.weight").get_shape()[0]  # A is (r, I)
                    return rank, float(f.get_tensor(a)), weights
        except Exception:  # not readable as safetensors: loading it says why (read_tensors)
            pass
    return None, None, None


def load_adapter_file(model, name, path):
    """A PEFT folder / adapter file, an original-Wan-layout file (diffusers, ComfyUI) or a LongLive
    lora.pt into adapter `name`. alpha: the file's per-layer .alpha, else adapter_config.json beside
    the weights, else alpha = r."""
    path = adapter_weights_file(path)  # a folder: ours, the released code's (.bin) or a diffusers one
    sd = read_tensors(path, "a LoRA file")
    if isinstance(sd, dict) and "generator_lora" in sd:  # LongLive wraps its adapter
        sd = sd["generator_lora"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}; expected a LoRA state dict")
    _, alpha, _ = adapter_rank_alpha(path)  # None: the layers' own .alpha, or alpha = r
    load_adapter_state(model, name, sd, alpha)


# ----------------------------------------------------------------------------------------------
# train.py's run checkpoints

def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def save_run(args, model, opt, state, export, rank=0, world=1):
    """Rank 0 writes checkpoint ckpt_<step> of the run into --out-dir (write_run), with the
    fingerprints of the files it was trained with, keeping the newest --keep-ckpts of its lineage;
    every rank waits until it is on disk."""
    if rank == 0:
        state = dict(state, files=fingerprints(args))
        write_run(os.path.join(args.out_dir, f"ckpt_{state['step']:06d}"), model, opt, state, export=export,
                  keep=args.keep_ckpts)
    if world > 1:
        dist.barrier()


def write_run(path, model, opt, state, export="default", keep=0):
    """ckpt folder: every adapter, the optimizer, `state` (JSON-able, with the run's "lineage") and
    `export` in PEFT layout. Written to a temporary folder, then renamed: a crash leaves the previous
    checkpoint intact. keep > 0: afterwards only the newest `keep` checkpoints of the lineage beside
    it remain (runs.prune: another run's ckpt_* folders are neither counted nor deleted)."""
    def write(tmp):
        # a folder left by a crashed write under the same process id: start empty, not on its files
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        ad = {}  # every adapter in one file, keys "<adapter>/<PEFT key>" (load_run splits them)
        for name in adapter_names(model):
            for k, v in adapter_state_dict(model, name).items():
                ad[f"{name}/{k}"] = v.cpu().contiguous()
        save_file(ad, os.path.join(tmp, "adapters.safetensors"))
        sd = opt.state_dict()
        # AdamW's state: {param index: {"step", "exp_avg", "exp_avg_sq"}} -> "i.name" tensors
        moments = {f"{i}.{k}": v.cpu().contiguous() for i, s in sd["state"].items() for k, v in s.items()}
        save_file(moments, os.path.join(tmp, "optim.safetensors"))
        _write_json(os.path.join(tmp, "state.json"), dict(state, param_groups=sd["param_groups"]))
        save_adapter(model, export, os.path.join(tmp, "lora"))  # the policy to sample with
    write_atomic(path, write)
    if keep:
        prune(os.path.dirname(path), state["lineage"], keep)


def load_run(path, model, opt):
    """Restore the adapters the model has (others in the file are ignored) and the optimizer;
    returns state.json's dict."""
    ad = load_file(os.path.join(path, "adapters.safetensors"))  # {"<adapter>/<PEFT key>": tensor}
    for name in adapter_names(model):  # the model decides which adapters matter (a run without --selective has no ref)
        # this adapter's keys, its "<adapter>/" prefix removed
        sd = {k[len(name) + 1:]: v for k, v in ad.items() if k.startswith(name + "/")}
        if not sd:
            raise ValueError(f"{path}: no adapter {name!r} in adapters.safetensors")
        load_adapter_state(model, name, sd)
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    flat = load_file(os.path.join(path, "optim.safetensors"))
    # rebuild AdamW's nested state from "i.name" keys; param_groups (lr, betas, ...) came from the JSON
    osd = {"state": {}, "param_groups": state.pop("param_groups")}
    for k, v in flat.items():
        i, name = k.split(".", 1)  # "12.exp_avg" -> parameter 12's "exp_avg"
        osd["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(osd)
    return state


def resume_run(path, model, opt, args, compensator, dynref, guard):
    """Continue a run from checkpoint `path`: adapters, optimizer (its learning rate and weight
    decay yield to the flags), the selective mode's states, the count of skipped steps in a row.
    Returns the step to continue from."""
    state = load_run(path, model, opt)
    compensator.load_state_dict(state["compensator"])
    dynref.load_state_dict(state["dynref"])
    guard.bad_steps = state["bad_steps"]
    # after load_run, which restored the saved values: a resume may change --lr deliberately
    for group in opt.param_groups:
        group["lr"], group["weight_decay"] = args.lr, args.weight_decay
    log(f"resumed from {path} at step {state['step']}")
    return state["step"]


# the files every step reads: a checkpoint records their fingerprints, a resume needs the same ones
# (--lora-init is not among them: a resume's adapters come from the checkpoint)
FINGERPRINTED = ("ckpt", "vae", "text_encoder", "prompt_file")


def fingerprint(path):
    """What a file is, wherever it has moved: its size and a hash of its first, middle and last MiB
    (a 28 GB checkpoint costs 3 MiB of reading); "folder" for a folder, None for no file."""
    if not path:
        return None
    path = find_file(path)
    if os.path.isdir(path) or not os.path.exists(path):  # a missing one is check_args' to report
        return "folder" if os.path.isdir(path) else "missing"
    # the size catches truncation; three samples catch another file of the same size (the weights
    # differ everywhere), without reading a 28 GB file whole on every start
    size, h = os.path.getsize(path), hashlib.sha256()
    with open(path, "rb") as f:
        for at in (0, max(0, size // 2 - 2 ** 19), max(0, size - 2 ** 20)):
            f.seek(at)
            h.update(f.read(2 ** 20))
    return {"size": size, "sha256": h.hexdigest()[:16]}


def fingerprints(args):
    """{flag: fingerprint} of the files every step reads (FINGERPRINTED), for a checkpoint's state."""
    return {name: fingerprint(getattr(args, name)) for name in FINGERPRINTED}


def describe_file(fp):
    """A fingerprint in words."""
    if isinstance(fp, dict):
        return f"{fp['size']} bytes, sha256 of 3 MiB {fp['sha256']}"
    return {"folder": "a folder", "missing": "missing"}.get(fp, "none")


# ----------------------------------------------------------------------------------------------
# The frozen base a run trains on

def load_base(args, device="cpu", dtype=torch.float32, cfg=None):
    """The frozen base network: --ckpt (a released generator), or for the tiny model without one a
    random init. Weights in `dtype` (bf16 on a GPU), no gradients. cfg overrides
    model.CONFIGS[args.model] (tests: tiny sizes through a real preset's loading path). A file that
    does not hold such a generator is a UsageError, one clear message."""
    cfg = cfg or CONFIGS[args.model]
    torch.manual_seed(args.seed)  # the only use of the global RNG: initial weights and adapters
    if args.ckpt:
        # meta: no random init; the file's tensors are assigned (a 14B model is never held twice)
        with torch.device("meta"):
            model = CausalWanModel(cfg)
        try:
            load_checkpoint(model, args.ckpt, ema=args.ckpt_ema)
        except (ValueError, OSError) as e:
            raise UsageError(f"--ckpt {args.ckpt}: {e}") from None
    elif args.model == "tiny":
        model = CausalWanModel(cfg)
        randomize_head(model)  # random but not all-zero videos
        log("no base checkpoint: RL starts from a randomly initialised tiny model")
    else:
        raise UsageError(f"--model {args.model} needs --ckpt (the distilled generator; README, Real models)")
    model.to(device, dtype).requires_grad_(False)  # the frozen base: bf16 on GPU
    model.grad_checkpointing = args.grad_checkpointing
    return model
