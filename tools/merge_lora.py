"""
Merge a trained LoRA adapter into its base generator: the weights W' = W + (alpha / r) B A of every
adapted linear, the rest unchanged, no adapter keys, in one of two upstream layouts (by --out's
extension):
  .safetensors  the original Wan2.1 keys (`blocks.0.self_attn.q.weight`, ...), as Wan2.1's own
                DiT file and ComfyUI hold them
  .pt           Self-Forcing's container {"generator_ema": sd, "generator": sd} with the wrapper's
                `model.` prefix, what Self-Forcing / Causal Forcing / LongLive inference loads
                (`--checkpoint_path merged.pt [--use_ema]`); tensors only (torch.load weights_only)
Either is a plain generator: `train.py --ckpt` and `sample.py --ckpt` load it (our block-causal
few-step sampler, no --lora). README, "Use the tuned model elsewhere".

What it merges:
  a run checkpoint  ckpt_<step>/ of train.py: the adapter --adapter (default ema, the policy train.py
                    evaluates and exports) onto the base the run was trained on (state.json; a
                    --ckpt given instead must be the same file by content, as a resume demands)
  an adapter        a ckpt_*/lora folder, a PEFT or original-Wan-layout (diffusers / ComfyUI) file, or
                    LongLive's lora.pt, onto --ckpt, a model of size --model

Run:   python tools/merge_lora.py out/tiny/ckpt_000030 --out tuned.safetensors
       python tools/merge_lora.py longlive_models/models/lora.pt --ckpt longlive_models/models/longlive_base.pt \
           --model wan-1.3b --out longlive_merged.safetensors
Test:  python -m pytest tests/test_export.py -q

Shape legend: r LoRA rank, I input features, O output features of an adapted linear.
"""
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import tyro
from safetensors.torch import load_file, save_file

# a tool, not part of the algorithm: the repository root on the import path, so that
# `python tools/merge_lora.py` (from anywhere) finds checkpoints.py, lora.py and the rest
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoints import describe_file, fingerprint, load_adapter_file, load_checkpoint  # noqa: E402
from common import UsageError, find_file, log, run_cli, write_atomic  # noqa: E402
from lora import adapter_names, load_adapter_state, lora_layers, merged_state_dict  # noqa: E402
from model import CONFIGS, CausalWanModel  # noqa: E402


@dataclass
class Args:
    source: tyro.conf.Positional[str]
    """a run checkpoint folder (ckpt_<step>/, with state.json) or an adapter: a ckpt_*/lora folder, a
    PEFT or original-Wan-layout .safetensors, LongLive's lora.pt"""
    out: str = "merged.safetensors"
    """the merged generator to write: .safetensors (original Wan2.1 keys) or .pt (Self-Forcing's container)"""
    adapter: Literal["ema", "default", "old", "ref"] = "ema"
    """a run checkpoint's adapter to merge: ema (what train.py evaluates and exports) or default
    (theta at that step); old / ref for inspection"""
    ckpt: Optional[str] = None
    """the base generator (a run checkpoint: default the one it was trained on)"""
    model: Optional[Literal["tiny", "wan-1.3b", "wan-14b"]] = None
    """model size (a run checkpoint: default the one it was trained with)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the written weights; bfloat16 halves the file but rounds small updates away
    (the share lost is printed)"""


def run_checkpoint_plan(args):
    """For a run checkpoint: (model size, base file, take generator_ema, rank/alpha, adapter tensors)."""
    with open(os.path.join(args.source, "state.json")) as f:
        state = json.load(f)
    run = state["args"]
    if not (args.ckpt or run["ckpt"]):
        raise UsageError(f"{args.source} was trained on a random base (--ckpt None): there is no generator to merge into")
    ckpt = find_file(args.ckpt or run["ckpt"])
    if not os.path.isfile(ckpt):
        raise UsageError(f"{args.source} was trained on --ckpt {run['ckpt']}, not found here; give --ckpt")
    # an adapter belongs on the generator it was trained on: the same content, wherever it lies now
    recorded = state.get("files", {}).get("ckpt")
    if recorded is not None and fingerprint(ckpt) != recorded:
        raise UsageError(f"--ckpt {ckpt}: not the file {args.source} was trained on (this file: "
                         f"{describe_file(fingerprint(ckpt))}; trained on: {describe_file(recorded)})")
    ad = load_file(os.path.join(args.source, "adapters.safetensors"))  # {"<adapter>/<PEFT key>": tensor}
    have = sorted({k.split("/", 1)[0] for k in ad})
    if args.adapter not in have:
        raise UsageError(f"{args.source} holds the adapters {have}, not {args.adapter!r} (--adapter)")
    prefix = args.adapter + "/"
    tensors = {k[len(prefix):]: v for k, v in ad.items() if k.startswith(prefix)}
    return args.model or run["model"], ckpt, run["ckpt_ema"], run["lora_alpha"], tensors


def bf16_loss(merged, base_sd, model):
    """How much of the update bf16 storage loses: ||bf16(W') - W'|| / ||W' - W|| over the adapted
    weights (0: kept exactly; >= 1: the update drowns in rounding)."""
    err = upd = 0.0
    for n, _ in lora_layers(model):
        w_new, w_old = merged[f"{n}.weight"], base_sd[f"{n}.weight"].float()
        err += (w_new.bfloat16().float() - w_new).pow(2).sum().item()  # rounding error of W'
        upd += (w_new - w_old).pow(2).sum().item()  # the update itself, ||s B A||^2
    return math.sqrt(err / max(upd, 1e-30))


def main(args: Args):
    if not args.out.endswith((".safetensors", ".pt")):
        raise UsageError(f"--out {args.out}: write the merged generator as .safetensors (original Wan2.1 keys) "
                         f"or .pt (Self-Forcing's container)")
    source = find_file(args.source) or args.source
    if not os.path.exists(source):
        raise UsageError(f"{args.source}: not found")
    args.source = source
    is_run = os.path.isfile(os.path.join(source, "state.json"))
    if is_run:  # a run checkpoint names its own base, size and alpha
        size, ckpt, ema, alpha, tensors = run_checkpoint_plan(args)
    else:  # a bare adapter: the base and size come from the flags
        if not (args.ckpt and args.model):
            raise UsageError(f"{source} is an adapter, not a run checkpoint: give --ckpt (its base) and --model")
        size, ckpt, ema = args.model, find_file(args.ckpt) or args.ckpt, True
    log(f"base {ckpt} ({size}); adapter {args.adapter if is_run else source}")
    with torch.device("meta"):  # no random init: the file's tensors are assigned
        model = CausalWanModel(CONFIGS[size])
    try:
        load_checkpoint(model, ckpt, ema=ema)
        if is_run:  # rank from the tensors, alpha from the run's flags
            load_adapter_state(model, "merge", tensors, alpha)
        else:  # alpha from the file's .alpha or adapter_config.json, else alpha = r
            load_adapter_file(model, "merge", source)
    except (ValueError, OSError) as e:
        raise UsageError(f"{' '.join(str(e).split())}") from None
    assert adapter_names(model) == ["merge"]
    base_sd = model.state_dict()
    # W' = W + (alpha / r) B A for every adapted linear, in float32
    merged = merged_state_dict(model, "merge")
    if args.dtype == "bfloat16":
        lost = bf16_loss(merged, base_sd, model)
        log(f"bfloat16: rounding error / update = {lost:.2f}" + (" (most of the update is lost: keep float32)"
                                                                 if lost > 0.5 else ""))
    out_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    merged = {k: v.to(out_dtype).contiguous() for k, v in merged.items()}
    # the merge recorded in the file's header (strings only), for whoever finds the file later
    meta = {"format": "pt", "merged_from": os.path.abspath(source), "base": os.path.abspath(ckpt),
            "adapter": args.adapter if is_run else "the file's"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.out.endswith(".pt"):  # Self-Forcing's container: the wrapper's keys, under both names
        wrapped = {f"model.{k}": v for k, v in merged.items()}  # WanDiffusionWrapper holds the DiT as .model
        # one dict under both names: torch.save stores each tensor once
        container = {"generator_ema": wrapped, "generator": wrapped, "merged_from": meta}
        write_atomic(args.out, lambda tmp: torch.save(container, tmp))
    else:
        write_atomic(args.out, lambda tmp: save_file(merged, tmp, metadata=meta))
    log(f"wrote {args.out}: {len(merged)} tensors, {sum(v.numel() for v in merged.values()) / 1e6:.1f} M "
        f"parameters ({args.dtype}); load it with --ckpt {args.out}")


if __name__ == "__main__":  # what the user can fix: one line, exit 2, no traceback
    run_cli(main, lambda: tyro.cli(Args), (), "interrupted: nothing was written")
