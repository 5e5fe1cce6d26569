"""
Named LoRA adapters on a frozen base network, and their key layouts (PEFT, LongLive).

Astrolabe trains LoRA, not the full model (rank 256, alpha 256 on every linear of every
transformer block: franklinz233/Astrolabe `configs/base.py:107-111`), and keeps several copies
of the low-rank weights side by side on one frozen base:
    default  theta, the trained policy           old  theta_old, the rollout policy
    ref      the dynamic reference (--selective) ema  the evaluation / export average
Switching policy is switching which adapter the linears use, so one base serves all four.

    lora.add_adapter(model, "default", rank=16)      # every LoRALinear gets A (r, I), B (O, r)
    with lora.use_adapter(model, "old"):             # forwards now use W + (alpha/r) B_old A_old
        ...
    lora.lerp_adapter(model, "old", "default", d)    # theta_old <- d theta_old + (1 - d) theta

Works on any nn.Module whose linears are LoRALinear; imports nothing of this repository, so it
can be copied alone. File I/O (PEFT folders, LongLive lora.pt) is in checkpoints.py.
Key layouts here: PEFT's (adapter_state_dict, what PEFT and the released code read), the
original-Wan layout diffusers and ComfyUI read (wan_lora_state_dict), and the adapter merged into
the base weights (merged_state_dict).

Test:  python -m pytest tests/test_lora.py -q

Shape legend: r rank, I input features, O output features, M input rows (tokens) of a call.
"""
import math
import re
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as Fn

# PEFT's target_modules for the Wan blocks: a suffix match picks the 10 linears of each block
# (self_attn q k v o, cross_attn q k v o, ffn.0 and ffn.2)
LORA_TARGETS = ["q", "k", "v", "o", "ffn.0", "ffn.2"]


class LoRALinear(nn.Linear):
    """nn.Linear plus named low-rank adapters: y = W x + b + (alpha/r) B A x.

    Adapters live in `self.lora[name]` as A (r, I) and B (O, r), PEFT's layout. `active` names the
    adapter in use (None = base weights only). The base weight keeps its checkpoint name, so a
    state dict without adapters is exactly the checkpoint's.
    """
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.lora = nn.ModuleDict()
        self.scale = {}  # name -> alpha / r
        self.active = None

    def forward(self, x):
        if self.active is None:  # adapters off: the base model
            return super().forward(x)
        ad, s = self.lora[self.active], self.scale[self.active]
        if merge_applies(self, x):  # speed, fenced below: without a gradient, one matmul (same numbers)
            return merged_forward(self, x)
        y = super().forward(x)  # W x + b: the frozen base
        # y = W x + b + s B (A x); the adapter stays float32 while the base may run in bf16 (cast in,
        # compute, cast back), so a small update to A or B is never rounded away in W's precision
        return y + s * Fn.linear(Fn.linear(x.to(ad.A.dtype), ad.A), ad.B).to(y.dtype)


# ---- speed, fenced: the one optimisation in this file -----------------------------------------
# Rollouts and the old / reference predictions run without a gradient, with a fixed adapter: its
# update can be merged into the weight first, y = (W + s B A) x + b, one matmul instead of three
# (the two skinny LoRA matmuls run far below a CPU's matmul rate: the tiny default's rollout
# 3.5 -> 2.5 s, 2-core CPU). Only where it changes no number beyond float rounding: base and
# adapter both float32 and no autocast (a bf16 W + s B A would round the update away). With a
# gradient the plain path above runs, so autograd saves what memory.py counts. tests/test_lora.py
# checks this path against the plain one.

def merge_applies(layer, x):
    """True when layer(x) may use merged_forward: no gradient, float32 base and adapter, no autocast."""
    return (not torch.is_grad_enabled() and layer.weight.dtype == torch.float32
            and layer.lora[layer.active].A.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type))


def merged_forward(layer, x):
    """(W + s B A) x + b with the active adapter merged into the weight for this call."""
    return Fn.linear(x, merged_weight(layer, layer.active), layer.bias)
# ---- end of the fenced optimisation -------------------------------------------------------------


def lora_layers(model):
    """(name, LoRALinear) for every adapted linear of `model`, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_names(model):
    """Names of the adapters every LoRALinear holds, in the order they were added."""
    layers = lora_layers(model)
    return list(layers[0][1].lora.keys()) if layers else []


def add_adapter(model, name, rank=256, alpha=None):
    """Add adapter `name` to every LoRALinear: A kaiming-uniform as PEFT, B = 0, so the new
    adapter starts as the base model. alpha: scale = alpha / rank; default alpha = rank (scale 1,
    LongLive's and Astrolabe's r = alpha = 256)."""
    # ModuleDict keys become attribute names: refuse names that would shadow its own methods
    if not name.isidentifier() or hasattr(nn.ModuleDict(), name):
        raise ValueError(f"adapter name {name!r} is not allowed (use e.g. 'default', 'old', 'ref')")
    alpha = rank if alpha is None else alpha
    for _, m in lora_layers(model):
        dev = m.weight.device  # beside the base weight, but always float32 (a bf16 base included)
        A = torch.empty(rank, m.in_features, device=dev, dtype=torch.float32)  # (r, I)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # PEFT's init for A
        ad = nn.Module()  # the adapter: parameters A and B, named as PEFT names them
        ad.A = nn.Parameter(A)
        # B = 0: B A x = 0, the adapter changes nothing until it is trained
        ad.B = nn.Parameter(torch.zeros(m.out_features, rank, device=dev))  # (O, r)
        # scale s = alpha / r multiplies B A x
        m.lora[name], m.scale[name] = ad, alpha / rank


def set_adapter(model, name):
    """Use adapter `name` in every forward from now on (None = the base model, adapters off)."""
    if name is not None and name not in adapter_names(model):
        raise KeyError(f"no adapter {name!r}; have {adapter_names(model)}")
    for _, m in lora_layers(model):
        m.active = name  # every adapted linear switches: the whole network is now this policy


@contextmanager
def use_adapter(model, name):
    """`with use_adapter(model, "old"): ...` runs the block with adapter `name`, then restores the
    previous selection (also on an exception)."""
    prev = lora_layers(model)[0][1].active  # all layers share the selection: the first one tells it
    set_adapter(model, name)
    try:
        yield
    finally:  # restored even when the block raises
        set_adapter(model, prev)


def adapter_params(model, name):
    """The parameters of adapter `name`: A, B of every layer, in layer order."""
    return [p for _, m in lora_layers(model) for p in m.lora[name].parameters()]


def adapter_numel(model, name):
    """Number of parameters of adapter `name` (r (I + O) per layer)."""
    return sum(p.numel() for p in adapter_params(model, name))


@torch.no_grad()
def copy_adapter(model, src, dst):
    """dst <- src, adding dst (same rank and scale) if it does not exist yet."""
    if dst not in adapter_names(model):  # a new adapter of the same shape: rank and alpha of src
        m = lora_layers(model)[0][1]
        rank = m.lora[src].A.shape[0]  # A is (r, I)
        add_adapter(model, dst, rank, m.scale[src] * rank)
    for a, b in zip(adapter_params(model, src), adapter_params(model, dst)):
        b.copy_(a)  # in place: the optimizer (of default) and every reference stay valid


@torch.no_grad()
def lerp_adapter(model, dst, src, decay):
    """dst <- decay * dst + (1 - decay) * src: the old-policy and EMA updates."""
    for d, s in zip(adapter_params(model, dst), adapter_params(model, src)):
        # d <- decay d + (1 - decay) s, in place, parameter by parameter
        d.mul_(decay).add_(s.to(d.dtype), alpha=1 - decay)


# ----------------------------------------------------------------------------------------------
# Key layouts: PEFT's (what we save, what Astrolabe saves), LongLive's lora.pt, and the original-Wan
# layout of diffusers / ComfyUI

def adapter_state_dict(model, name):
    """Adapter `name` in PEFT's layout: base_model.model.<layer>.lora_{A,B}.weight."""
    sd = {}
    for n, m in lora_layers(model):
        sd[f"base_model.model.{n}.lora_A.weight"] = m.lora[name].A.detach()  # (r, I)
        sd[f"base_model.model.{n}.lora_B.weight"] = m.lora[name].B.detach()  # (O, r)
    return sd


def peft_config(model, name):
    """adapter_config.json of adapter `name`, so PEFT (and Astrolabe's loader) can read it back."""
    m = lora_layers(model)[0][1]
    r = m.lora[name].A.shape[0]
    return dict(peft_type="LORA", r=r, lora_alpha=m.scale[name] * r, lora_dropout=0.0, bias="none",
                target_modules=LORA_TARGETS)


def wan_lora_state_dict(model, name):
    """Adapter `name` in the original-Wan layout: diffusion_model.<layer>.lora_{A,B}.weight and a
    scalar diffusion_model.<layer>.alpha. diffusers (WanPipeline.load_lora_weights converts these
    keys: loaders/lora_conversion_utils.py, _convert_non_diffusers_wan_lora_to_diffusers) and ComfyUI
    read this layout; neither reads adapter_config.json, so the scale alpha / r travels in the file
    (without .alpha they use scale 1: silently another model whenever alpha != r)."""
    sd = {}
    for n, m in lora_layers(model):
        r = m.lora[name].A.shape[0]  # A is (r, I)
        sd[f"diffusion_model.{n}.lora_A.weight"] = m.lora[name].A.detach()  # (r, I)
        sd[f"diffusion_model.{n}.lora_B.weight"] = m.lora[name].B.detach()  # (O, r)
        # alpha = scale * r, a 0-d tensor: what the loaders divide by r
        sd[f"diffusion_model.{n}.alpha"] = torch.tensor(m.scale[name] * r, dtype=torch.float32)
    return sd


@torch.no_grad()
def merged_state_dict(model, name):
    """The base weights with adapter `name` merged in, keyed as the base checkpoint (no adapter
    keys): W' = W + (alpha/r) B A for every adapted linear, computed in float32, returned in float32.
    A model with W' and no adapter computes what the model with the adapter computes."""
    sd = {k: v.detach().float() for k, v in model.state_dict().items() if ".lora." not in k}
    for n, m in lora_layers(model):
        sd[f"{n}.weight"] = merged_weight(m, name)  # W' = W + s B A
    return sd


def merged_weight(layer, name):
    """W + s B A of one LoRALinear with adapter `name` folded in, in float32: (O, I). What
    merged_forward multiplies by (float32 there already) and merged_state_dict writes."""
    ad = layer.lora[name]
    # W + s B A:  (O, I) + s (O, r) @ (r, I)
    return torch.addmm(layer.weight.detach().float(), ad.B.detach().float(), ad.A.detach().float(),
                       alpha=layer.scale[name])


# a layer path of the Wan blocks, then lora_A / lora_B, then PEFT's optional adapter name
# ("...q.lora_A.default.weight" in LongLive's lora.pt, "...q.lora_A.weight" in a PEFT file; any
# prefix before the layer path: "base_model.model." (PEFT), "diffusion_model." (diffusers, ComfyUI))
_KEY = re.compile(r"(blocks\.\d+\.(?:self_attn|cross_attn)\.[qkvo]|blocks\.\d+\.ffn\.[02])"
                  r"\.lora_([AB])(?:\.[\w-]+)?\.weight$")
# the original-Wan layout's per-layer alpha: "diffusion_model.blocks.0.self_attn.q.alpha"
_ALPHA = re.compile(r"(blocks\.\d+\.(?:self_attn|cross_attn)\.[qkvo]|blocks\.\d+\.ffn\.[02])\.alpha$")


@torch.no_grad()
def load_adapter_state(model, name, sd, alpha=None):
    """Load PEFT, LongLive or original-Wan-layout LoRA tensors into adapter `name`, created with
    the file's rank if missing. alpha: LoRA alpha; default = rank (scale 1, as LongLive and Astrolabe
    use). A layer's own `.alpha` in the file (original-Wan layout) wins over `alpha`."""
    found = {}  # (layer path, "A" | "B") -> tensor
    alphas = {}  # layer path -> the file's alpha for it
    for key, val in sd.items():
        m = _KEY.search(key)  # a LoRA tensor of a block linear; other keys are ignored
        if m:
            found[(m.group(1), m.group(2))] = val
        a = _ALPHA.search(key)
        if a:
            alphas[a.group(1)] = float(val)
    layers = dict(lora_layers(model))
    missing = [n for n in layers if (n, "A") not in found or (n, "B") not in found]
    if missing:
        raise ValueError(f"LoRA file has no weights for {len(missing)} of {len(layers)} "
                         f"layers (first: {missing[:3]}); expected keys like "
                         f"'base_model.model.blocks.0.self_attn.q.lora_A.weight' (PEFT) or "
                         f"'diffusion_model.blocks.0.self_attn.q.lora_A.weight' (diffusers, ComfyUI)")
    rank = found[next(iter(layers)), "A"].shape[0]  # A is (r, I)
    if name not in adapter_names(model):
        add_adapter(model, name, rank, alpha)
    elif alpha is not None:  # an existing adapter takes the file's alpha
        for m in layers.values():
            m.scale[name] = alpha / rank
    for n, m in layers.items():
        if n in alphas:  # the file's own alpha for this layer: scale = alpha / r
            m.scale[name] = alphas[n] / rank
        for ab in "AB":
            p, v = getattr(m.lora[name], ab), found[(n, ab)]
            if p.shape != v.shape:
                raise ValueError(f"LoRA {n}.lora_{ab}: file {tuple(v.shape)} vs model "
                                 f"{tuple(p.shape)} (rank or model size differ)")
            p.copy_(v)
