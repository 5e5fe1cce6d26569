"""
Checkpoint loading: the real key manifests, every container layout, and the error messages.

Test:  python -m pytest tests/test_checkpoint.py -q

Layouts are synthetic (docs/wan_architecture.md#checkpoint-files): a random tiny model written in
each real key form, loaded back into a fresh model, must give bit-identical outputs.
"""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import load_adapter_file, load_checkpoint, save_adapter
from model import CONFIGS, CausalWanModel, ModelConfig
from lora import adapter_names, adapter_params, adapter_state_dict, add_adapter, set_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the key manifests: every key and shape of the released 1.3B and 14B generators (fixtures README)
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
CFG = ModelConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4,
                  text_dim=16, text_len=8)


def random_model(seed, cfg=CFG):
    """A tiny model with every parameter random (the default init zeroes the head: output 0)."""
    torch.manual_seed(seed)
    m = CausalWanModel(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


def inputs(cfg=CFG, B=1):
    g = torch.Generator().manual_seed(0)
    F = 2 * cfg.frames_per_block
    x = torch.randn(B, F, cfg.in_dim, 4, 4, generator=g)
    t = torch.rand(B, F, generator=g) * 1000
    return x, t, torch.randn(B, 5, cfg.text_dim, generator=g)


@torch.no_grad()
def same_output(a, b):
    x, t, ctx = inputs()
    return torch.equal(a(x, t, ctx), b(x, t, ctx))


def meta_model(cfg=CFG):
    with torch.device("meta"):
        return CausalWanModel(cfg)


# ---- (a) the real sizes: our parameter names and shapes are the checkpoints'

@pytest.mark.parametrize("name,manifest", [("wan-1.3b", "wan_keys_1_3b.json"),
                                           ("wan-14b", "wan_keys_14b.json")])
def test_manifest(name, manifest):
    with open(os.path.join(FIXTURES, manifest)) as f:
        ref = json.load(f)
    m = meta_model(CONFIGS[name])
    got = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert list(got) == list(ref["keys"])  # same keys, same order
    assert got == ref["keys"]
    assert sum(p.numel() for p in m.parameters()) == ref["_num_params"]
    assert not adapter_names(m)
    add_adapter(m, "default", rank=4)
    add_adapter(m, "old", rank=4)
    base = {k: list(v.shape) for k, v in m.state_dict().items() if ".lora." not in k}
    assert base == ref["keys"]
    assert len(m.state_dict()) == len(ref["keys"]) + 2 * 2 * 10 * CONFIGS[name].num_layers


# ---- (b) every container layout

def prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def test_self_forcing_ema_and_generator(tmp_path):
    ema, gen = random_model(1), random_model(2)
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": prefixed(gen.state_dict(), "model."),
                "generator_ema": prefixed(ema.state_dict(), "model."), "step": torch.tensor(5)}, path)
    a, b = load_checkpoint(random_model(3), str(path)), load_checkpoint(random_model(3), str(path),
                                                                        ema=False)
    assert same_output(a, ema) and same_output(b, gen) and not same_output(a, b)


def test_longlive_fsdp_prefix_into_meta_model(tmp_path):
    src = random_model(1)
    path = tmp_path / "longlive_base.pt"
    sd = prefixed(src.state_dict(), "model._fsdp_wrapped_module.")
    torch.save({"generator": sd, "generator_ema": sd}, path)
    m = load_checkpoint(meta_model(), str(path))
    assert not any(p.is_meta for p in m.parameters())
    assert same_output(m, src)


def test_krea_safetensors(tmp_path):
    src = random_model(1)
    path = tmp_path / "krea-realtime-video-14b.safetensors"
    save_file(prefixed(src.state_dict(), "model."), str(path))
    assert same_output(load_checkpoint(random_model(2), str(path)), src)


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict", "legacy", "compiled"])
def test_other_containers(tmp_path, wrap):
    src = random_model(1)
    sd = src.state_dict()
    path = tmp_path / "ckpt.pth"
    if wrap == "legacy":  # the pre-zip torch.save format cannot be mmapped
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif wrap == "compiled":  # torch.compile + DDP wrappers, as nanoGPT users hit
        torch.save(prefixed(sd, "module._orig_mod."), path)
    else:
        torch.save(sd if wrap == "bare" else {wrap: sd}, path)
    assert same_output(load_checkpoint(random_model(2), str(path)), src)


def test_dtype(tmp_path):
    """bf16 file: copied (cast) into a float32 model, but assigned as-is into a meta model."""
    src = random_model(1)
    path = tmp_path / "bf16.pt"
    torch.save({k: v.bfloat16() for k, v in src.state_dict().items()}, path)
    a, b = load_checkpoint(random_model(2), str(path)), load_checkpoint(meta_model(), str(path))
    w = src.blocks[0].ffn[0].weight
    assert a.blocks[0].ffn[0].weight.dtype == torch.float32
    assert torch.equal(a.blocks[0].ffn[0].weight, w.bfloat16().float())
    assert b.blocks[0].ffn[0].weight.dtype == torch.bfloat16


def test_longlive_base_plus_lora(tmp_path):
    src = random_model(1)
    add_adapter(src, "default", rank=4, alpha=4)
    with torch.no_grad():
        for p in adapter_params(src, "default"):
            p.normal_(0, 0.2)
    set_adapter(src, "default")
    base = {k: v for k, v in src.state_dict().items() if ".lora." not in k}
    torch.save({"generator_ema": prefixed(base, "model._fsdp_wrapped_module.")}, tmp_path / "base.pt")
    # LongLive key variants: 'model.' in front and PEFT's '.default' before '.weight'
    lsd = {"model." + k.replace(".weight", ".default.weight") if i % 2 else k: v
           for i, (k, v) in enumerate(adapter_state_dict(src, "default").items())}
    torch.save({"generator_lora": lsd}, tmp_path / "lora.pt")
    m = load_checkpoint(meta_model(), str(tmp_path / "base.pt"), lora=str(tmp_path / "lora.pt"))
    assert adapter_names(m) == ["default"]
    assert not same_output(m, src)  # loaded but not active yet
    set_adapter(m, "default")
    assert same_output(m, src)


def test_peft_folder_roundtrip(tmp_path):
    src = random_model(1)
    add_adapter(src, "trained", rank=4, alpha=8)  # scale 2: alpha must come back from the json
    with torch.no_grad():
        for p in adapter_params(src, "trained"):
            p.normal_(0, 0.2)
    set_adapter(src, "trained")
    save_adapter(src, "trained", str(tmp_path / "lora"))
    assert sorted(os.listdir(tmp_path / "lora")) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "pytorch_lora_weights.safetensors"]
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"]) == (4, 8, "LORA")
    # every file of the folder reads back as the same adapter: the PEFT one (alpha from the json)
    # and the original-Wan one (alpha from its own .alpha keys; tests/test_export.py: diffusers)
    for path in [tmp_path / "lora", tmp_path / "lora" / "adapter_model.safetensors",
                 tmp_path / "lora" / "pytorch_lora_weights.safetensors"]:
        m = random_model(1)
        load_adapter_file(m, "x", str(path))
        set_adapter(m, "x")
        assert same_output(m, src)
    torch.save({k: v for k, v in src.state_dict().items() if ".lora." not in k}, tmp_path / "full.pt")
    m = load_checkpoint(random_model(2), str(tmp_path / "full.pt"), lora=str(tmp_path / "lora"),
                        lora_adapter="x")
    set_adapter(m, "x")
    assert same_output(m, src)


# ---- (c) errors: one clear message naming the file and the cause

def test_wrong_size(tmp_path):
    big = ModelConfig(**{**CFG.__dict__, "dim": 64, "num_layers": 3})
    path = tmp_path / "big.pt"
    torch.save({"generator_ema": prefixed(CausalWanModel(big).state_dict(), "model.")}, path)
    with pytest.raises(ValueError) as e:
        load_checkpoint(random_model(1), str(path))
    msg = str(e.value)
    assert str(path) in msg and "dim 64, 3 blocks" in msg and "dim 32, 2 blocks" in msg
    assert "--model" in msg and "blocks.2." in msg  # an unexpected key
    assert "patch_embedding.weight: file (64, 4, 1, 2, 2) vs model (32, 4, 1, 2, 2)" in msg


def test_named_size_hint(tmp_path):
    """A real-size checkpoint is recognised by name (keys only, zero-stride tensors: no memory)."""
    sd = {k: torch.zeros(1).expand(v.shape) for k, v in meta_model(CONFIGS["wan-14b"]).state_dict().items()
          if k.startswith(("patch_embedding", "blocks.39.norm3"))}
    torch.save({"generator_ema": sd}, tmp_path / "k.pt")
    with pytest.raises(ValueError, match=r"looks like a wan-14b checkpoint \(dim 5120, 40 blocks\) "
                                         r"but the model is built with dim 1536, 30 blocks"):
        load_checkpoint(meta_model(CONFIGS["wan-1.3b"]), str(tmp_path / "k.pt"))


def test_lora_as_base(tmp_path):
    m = random_model(1)
    add_adapter(m, "default", rank=2)
    torch.save({"generator_lora": adapter_state_dict(m, "default")}, tmp_path / "lora.pt")
    torch.save(adapter_state_dict(m, "default"), tmp_path / "bare_lora.pt")
    for f in ["lora.pt", "bare_lora.pt"]:
        with pytest.raises(ValueError, match="LoRA file; pass it as lora="):
            load_checkpoint(random_model(1), str(tmp_path / f))


def test_missing_dir_garbage(tmp_path):
    m = random_model(1)
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pt"):
        load_checkpoint(m, str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(m, str(tmp_path / "nope.pt"), lora=str(tmp_path / "nope_lora.pt"))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_checkpoint(m, str(tmp_path))
    for name in ["garbage.pt", "garbage.safetensors"]:
        (tmp_path / name).write_bytes(os.urandom(256))
        with pytest.raises(ValueError, match=f"cannot read .*{name}"):
            load_checkpoint(m, str(tmp_path / name))


def test_ema_missing_lists_keys(tmp_path):
    torch.save({"generator": random_model(1).state_dict(), "critic": {}}, tmp_path / "sf.pt")
    with pytest.raises(ValueError, match=r"no 'generator_ema' \(keys: \['generator', 'critic'\]\)"):
        load_checkpoint(random_model(2), str(tmp_path / "sf.pt"))
    assert same_output(load_checkpoint(random_model(2), str(tmp_path / "sf.pt"), ema=False),
                       random_model(1))
