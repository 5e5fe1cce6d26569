"""
The real-model presets: each parses, builds at its real size on the meta device, and its loading
path (checkpoints.load_base, then train.add_policies) accepts a synthetic checkpoint in that family's
real file layout at tiny size; missing files fail with one clear message.

Test: python -m pytest tests/test_presets.py -q
"""
import dataclasses

import pytest
import torch
from safetensors.torch import save_file

import streaming
import common
import train
from checkpoints import load_base
from common import UsageError
from frozen import FrozenParts
from model import CONFIGS, CausalWanModel
from lora import adapter_names, adapter_params, adapter_state_dict, add_adapter, set_adapter, use_adapter

REAL = ["self-forcing", "self-forcing-24gb", "causal-forcing", "longlive", "longlive-lora", "krea-14b"]
TINY = CONFIGS["tiny"]


def out_of(model, seed=0):
    """The model's block-causal output on fixed inputs (adapter as currently set)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, TINY.in_dim, 8, 8, generator=g)
    ctx = torch.randn(1, TINY.text_len, TINY.text_dim, generator=g)
    return model(x, torch.full((1, 3), 500.0), ctx)


def test_presets_parse_and_are_distinct():
    seen = set()
    for name in ["tiny"] + REAL:
        args = train.parse_args([name])
        assert args == train.PRESETS[name]
        seen.add(tuple(sorted(dataclasses.asdict(args).items(), key=str)).__repr__())
    assert len(seen) == 1 + len(REAL)
    over = train.parse_args(["longlive", "--lr", "3e-5", "--window", "9"])
    assert (over.lr, over.window, over.sink, over.local_attn) == (3e-5, 9, 3, 12)  # flags win
    with pytest.raises(UsageError, match="unknown preset 'selfforcing'"):
        train.parse_args(["selfforcing"])


@pytest.mark.parametrize("name,params", [("self-forcing", 1.42e9), ("krea-14b", 14.29e9)])
def test_real_size_on_meta(name, params):
    args = train.PRESETS[name]
    with torch.device("meta"):
        m = CausalWanModel(CONFIGS[args.model])
        n_base = sum(p.numel() for p in m.parameters())
        add_adapter(m, "default", args.lora_rank, args.lora_alpha)
    n_lora = sum(p.numel() for p in adapter_params(m, "default"))
    assert abs(n_base / params - 1) < 0.01, n_base
    cfg = CONFIGS[args.model]
    # rank r on 10 linears per block: 8 attention (dim x dim) and the FFN pair (dim x ffn)
    assert n_lora == cfg.num_layers * args.lora_rank * (8 * 2 * cfg.dim + 2 * (cfg.dim + cfg.ffn_dim))
    assert (args.height // 8, args.width // 8) == streaming.latent_hw(args) == (60, 104)


def family_file(name, sd, tmp_path):
    """sd written the way that family's release stores its generator."""
    if name == "krea-14b":  # flat safetensors, keys 'model.<key>'
        path = tmp_path / "krea-realtime-video-14b.safetensors"
        save_file({"model." + k: v.contiguous() for k, v in sd.items()}, str(path))
    elif name.startswith("longlive"):  # FSDP-wrapped keys in a generator dict
        path = tmp_path / "longlive_base.pt"
        torch.save({"generator_ema": {"model._fsdp_wrapped_module." + k: v for k, v in sd.items()}}, path)
    else:  # Self-Forcing / Causal Forcing: generator + generator_ema (Astrolabe takes the EMA)
        path = tmp_path / "generator.pt"
        junk = {k: torch.zeros_like(v) for k, v in sd.items()}
        torch.save({"generator": {"model." + k: v for k, v in junk.items()},
                    "generator_ema": {"model." + k: v for k, v in sd.items()}}, path)
    return str(path)


@pytest.mark.parametrize("name", REAL)
def test_preset_loader_takes_its_family_layout(name, tmp_path):
    torch.manual_seed(1)
    src = CausalWanModel(TINY)
    for p in src.parameters():  # every weight non-trivial, so a skipped key would show
        torch.nn.init.normal_(p, std=0.05)
    args = dataclasses.replace(train.PRESETS[name], ckpt=family_file(name, src.state_dict(), tmp_path),
                               lora_rank=4, lora_alpha=4.0, lora_init=None, grad_checkpointing=False)
    if name == "longlive-lora":  # LongLive's lora.pt: {'generator_lora': PEFT-style keys}
        add_adapter(src, "default", 4, 4.0)
        for p in adapter_params(src, "default"):
            torch.nn.init.normal_(p, std=0.1)
        torch.save({"generator_lora": {"base_model.model." + k: v for k, v in adapter_state_dict(src, "default").items()}},
                   tmp_path / "lora.pt")
        args = dataclasses.replace(args, lora_init=str(tmp_path / "lora.pt"))
        set_adapter(src, "default")
    args = dataclasses.replace(args, selective=True)  # every adapter a run can have
    m = load_base(args, cfg=TINY)
    train.add_policies(m, args)
    assert adapter_names(m) == ["default", "old", "ref", "ema"]
    with torch.no_grad():
        with use_adapter(m, "default" if args.lora_init else None):
            assert torch.allclose(out_of(m), out_of(src), atol=1e-5)
        outs = []
        for a in adapter_names(m):  # the warm start (or B = 0) is in every adapter
            with use_adapter(m, a):
                outs.append(out_of(m))
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_real_model_needs_its_files(tmp_path):
    args = dataclasses.replace(train.PRESETS["self-forcing"], ckpt=None)
    with pytest.raises(UsageError, match="needs --ckpt"):
        load_base(args, cfg=TINY)
    with pytest.raises(UsageError, match="needs --vae and --text-encoder"):
        FrozenParts(dataclasses.replace(args, vae=None, text_encoder=None), ["a cat"], "cpu")
    with pytest.raises(UsageError, match="not found: .*nowhere/self_forcing_dmd.pt"):
        load_base(dataclasses.replace(args, ckpt=str(tmp_path / "nowhere/self_forcing_dmd.pt")), cfg=TINY)


def test_missing_files_are_listed_before_anything_loads(tmp_path):
    args = dataclasses.replace(train.PRESETS["longlive-lora"], prompts=["a cat"], out_dir=str(tmp_path),
                               vae=str(tmp_path))  # the VAE path exists (a folder), the rest do not
    with pytest.raises(common.UsageError) as e:
        train.main(args)
    msg = str(e.value)
    for flag, name in [("--ckpt", "longlive_base.pt"), ("--lora-init", "lora.pt"),
                       ("--text-encoder", "models_t5_umt5-xxl-enc-bf16.pth")]:
        assert f"{flag} " in msg and name in msg, msg
    assert "--vae" not in msg and "README" in msg


def test_24gb_preset_fits_a_24gb_gpu():
    """self-forcing-24gb: memory.py's peak on one GPU (bf16, its default batch) <= 22 GiB, leaving 2
    of a 24 GB card to the allocator; self-forcing itself needs half as much again. It differs from
    self-forcing only in the LoRA rank and the tiled VAE decode, and each alone would not fit."""
    import memory
    cfg = CONFIGS["wan-1.3b"]
    small, full = train.PRESETS["self-forcing-24gb"], train.PRESETS["self-forcing"]
    p, q = memory.predict(small, cfg, bf16=True), memory.predict(full, cfg, bf16=True)
    assert p["peak"] <= 22 * memory.GB < 30 * memory.GB < q["peak"]
    changed = {k for k, v in dataclasses.asdict(small).items() if dataclasses.asdict(full)[k] != v}
    assert changed == {"lora_rank", "lora_alpha", "vae_tile", "out_dir"}
    assert p["decode"] < q["decode"] / 3 and p["adapters"] == q["adapters"] / 4
    untiled = memory.predict(dataclasses.replace(small, vae_tile=0), cfg, bf16=True)
    full_rank = memory.predict(dataclasses.replace(small, lora_rank=256, lora_alpha=256.0), cfg, bf16=True)
    assert full_rank["peak"] > 24 * memory.GB
    assert untiled["peak"] > 24 * memory.GB and "VAE decode in tiles (--vae-tile 160)" in memory.levers(
        dataclasses.replace(small, vae_tile=0))
