"""
The tuned model outside this repository: the exported adapter through diffusers' own loader
(WanPipeline.load_lora_weights into a WanTransformer3DModel of the same base) gives our outputs,
our loaders and --lora-init read that file (alpha included), and tools/merge_lora.py writes a
generator in the base's key layout that --ckpt loads back and diffusers' converter reads.

Test:  python -m pytest tests/test_export.py -q     (diffusers and peft from requirements.txt; no download)

Shape legend: B videos, F latent frames, C channels, H, W pixels, P tokens per frame.
"""
import dataclasses
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import checks
import train
from checkpoints import fingerprint, load_adapter_file, load_checkpoint, save_adapter, write_run
from lora import add_adapter, adapter_params, set_adapter
from model import CONFIGS, CausalWanModel
import merge_lora  # tools/merge_lora.py (pytest.ini puts tools/ on the path)

diffusers = pytest.importorskip("diffusers")  # requirements.txt installs it; never a download
pytest.importorskip("peft")  # diffusers' LoRA loading needs it
from diffusers import WanPipeline, WanTransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402

CFG = CONFIGS["tiny"]  # 4 blocks, dim 128, pixel-space 3 channels, patch (1, 4, 4)
RANK, ALPHA = 4, 12.0  # alpha != rank: scale 3, which a loader that ignores alpha gets wrong


def tuned_model(seed=0):
    """The tiny model with random base weights and a random adapter "default" (scale alpha/r = 3)."""
    torch.manual_seed(seed)
    m = CausalWanModel(CFG).eval()
    add_adapter(m, "default", rank=RANK, alpha=ALPHA)
    with torch.no_grad():
        for p in m.parameters():  # base and adapter: nothing zero, so every term shows
            p.normal_(0, 0.05)  # outputs of order 1: the tolerance below is then also relative
    return m


def diffusers_transformer(model):
    """A diffusers WanTransformer3DModel with the same base weights, converted by diffusers' own
    single-file converter from the original Wan keys (our state dict's)."""
    tr = WanTransformer3DModel(patch_size=CFG.patch_size, num_attention_heads=CFG.num_heads,
                               attention_head_dim=CFG.dim // CFG.num_heads, in_channels=CFG.in_dim,
                               out_channels=CFG.out_dim, text_dim=CFG.text_dim, freq_dim=CFG.freq_dim,
                               ffn_dim=CFG.ffn_dim, num_layers=CFG.num_layers, cross_attn_norm=True,
                               qk_norm="rms_norm_across_heads", eps=CFG.eps)
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora." not in k}
    tr.load_state_dict(convert_wan_transformer_to_diffusers(base), strict=True)
    return tr.eval()


def inputs(per_frame_t):
    g = torch.Generator().manual_seed(1)
    B, F = 2, 2 * CFG.frames_per_block
    x = torch.randn(B, F, CFG.in_dim, 16, 16, generator=g)  # (B, F, C, H, W): our layout
    t = torch.rand(B, F, generator=g) * 1000 if per_frame_t else torch.full((B, F), 500.0)
    # diffusers applies no padding of its own: WanPipeline zero-pads the text to its full length,
    # as our model does inside; so the context is given at the full text_len here
    ctx = torch.randn(B, CFG.text_len, CFG.text_dim, generator=g)  # (B, Lt, Dt)
    return x, t, ctx


@torch.no_grad()
def ours(model, x, t, ctx):
    """Our forward, bidirectional (one attention block spanning every frame), as Wan2.1 runs."""
    return model(x, t, ctx, mask_block=x.shape[1])


@torch.no_grad()
def theirs(tr, x, t, ctx):
    """diffusers' forward in its conventions: (B, C, F, H, W); a timestep per token (B, F P)."""
    P = (x.shape[3] // CFG.patch_size[1]) * (x.shape[4] // CFG.patch_size[2])
    out = tr(hidden_states=x.transpose(1, 2), timestep=t.repeat_interleave(P, dim=1), encoder_hidden_states=ctx,
             return_dict=False)[0]
    return out.transpose(1, 2)  # back to (B, F, C, H, W)


def load_into_diffusers(model, folder):
    """diffusers' own route: a WanPipeline around the transformer, load_lora_weights(folder).
    Returns the transformer and how many of its linears got a LoRA."""
    from peft.tuners.lora import LoraLayer
    tr = diffusers_transformer(model)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=tr, vae=None, scheduler=None)
    pipe.load_lora_weights(str(folder), adapter_name="rl")
    return tr, sum(isinstance(mod, LoraLayer) for mod in tr.modules())


@pytest.mark.parametrize("per_frame_t", [False, True])
def test_diffusers_loads_every_layer_and_gives_our_outputs(tmp_path, per_frame_t):
    model = tuned_model()
    save_adapter(model, "default", str(tmp_path / "lora"))
    tr, n_lora = load_into_diffusers(model, tmp_path / "lora")
    assert n_lora == CFG.num_layers * 10  # q k v o, cross q k v o, ffn.0, ffn.2 of every block
    set_adapter(model, "default")
    x, t, ctx = inputs(per_frame_t)
    a, b = ours(model, x, t, ctx), theirs(tr, x, t, ctx)
    assert (a - b).abs().max().item() <= 1e-4, (a - b).abs().max().item()
    # the adapter matters at this size: the base alone is far from the tuned output
    set_adapter(model, None)
    assert (ours(model, x, t, ctx) - a).abs().max().item() > 0.1


def test_without_alpha_diffusers_would_silently_scale_wrong(tmp_path):
    """Why the file carries .alpha: without it diffusers uses scale 1 instead of alpha/r = 3."""
    model = tuned_model()
    save_adapter(model, "default", str(tmp_path / "lora"))
    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    sd = load_file(path)
    assert sum(k.endswith(".alpha") for k in sd) == CFG.num_layers * 10
    assert all(float(v) == ALPHA for k, v in sd.items() if k.endswith(".alpha"))
    assert all(k.startswith("diffusion_model.blocks.") for k in sd)  # the original-Wan layout
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    save_file({k: v for k, v in sd.items() if not k.endswith(".alpha")}, stripped / path.name)
    tr, n_lora = load_into_diffusers(model, stripped)
    assert n_lora == CFG.num_layers * 10  # every layer loads ...
    set_adapter(model, "default")
    x, t, ctx = inputs(False)
    assert (ours(model, x, t, ctx) - theirs(tr, x, t, ctx)).abs().max().item() > 1e-2  # ... at the wrong scale


def test_the_peft_files_alone_load_nothing_in_diffusers(tmp_path):
    """Why the folder holds a second file: diffusers reads no PEFT-layout keys for Wan (one logged
    warning, 0 layers: one would silently sample the base model)."""
    model = tuned_model()
    save_adapter(model, "default", str(tmp_path / "lora"))
    os.remove(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    _, n_lora = load_into_diffusers(model, tmp_path / "lora")
    assert n_lora == 0


def test_our_loaders_and_lora_init_read_the_diffusers_file(tmp_path):
    model = tuned_model()
    save_adapter(model, "default", str(tmp_path / "lora"))
    alone = tmp_path / "alone"  # the file without its PEFT siblings, as a ComfyUI user has it
    alone.mkdir()
    shutil.copy(tmp_path / "lora" / "pytorch_lora_weights.safetensors", alone)
    set_adapter(model, "default")
    x, t, ctx = inputs(True)
    want = model(x, t, ctx)
    for path in [alone, alone / "pytorch_lora_weights.safetensors"]:
        fresh = tuned_model()  # the same base (seed), its own adapter replaced by the file's
        load_adapter_file(fresh, "x", str(path))
        set_adapter(fresh, "x")
        assert torch.equal(fresh(x, t, ctx), want)  # alpha 12 / rank 4 came from the file
    # a file whose layers carry different alphas (other trainers write one per layer) is read per layer
    sd = load_file(alone / "pytorch_lora_weights.safetensors")
    sd["diffusion_model.blocks.1.ffn.2.alpha"] = torch.tensor(6.0)
    save_file(sd, tmp_path / "mixed.safetensors")
    fresh = tuned_model()
    load_adapter_file(fresh, "x", str(tmp_path / "mixed.safetensors"))
    assert fresh.blocks[1].ffn[2].scale["x"] == 6.0 / RANK and fresh.blocks[0].ffn[2].scale["x"] == ALPHA / RANK
    # --lora-init: the file's rank and alpha are the run's, or one line says which flag to give
    flags = ["--lora-init", str(alone), "--lora-rank", str(RANK)]
    assert checks.lora_init_errors(train.parse_args(flags + ["--lora-alpha", str(ALPHA)])) == []
    errors = checks.lora_init_errors(train.parse_args(flags + ["--lora-alpha", "4"]))
    assert len(errors) == 1 and "give --lora-alpha 12.0" in errors[0], errors
    errors = checks.lora_init_errors(train.parse_args(["--lora-init", str(alone), "--lora-alpha", str(ALPHA)]))
    assert len(errors) == 1 and "give --lora-rank 4" in errors[0], errors


def fake_run_checkpoint(tmp_path, model):
    """A train.py run checkpoint of `model` (adapters default and a different ema), trained on the
    base written to base.safetensors."""
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if ".lora." not in k}, base)
    add_adapter(model, "ema", rank=RANK, alpha=ALPHA)
    with torch.no_grad():
        for p in adapter_params(model, "ema"):
            p.normal_(0, 0.1)
    args = dataclasses.replace(train.Args(), ckpt=str(base), lora_rank=RANK, lora_alpha=ALPHA)
    opt = torch.optim.AdamW(adapter_params(model, "default"))
    state = {"step": 3, "args": dataclasses.asdict(args), "lineage": {"id": "x", "ancestry": []},
             "files": {"ckpt": fingerprint(str(base))}}
    write_run(str(tmp_path / "ckpt_000003"), model, opt, state, export="ema")
    return tmp_path / "ckpt_000003", base


def test_merged_generator_round_trip(tmp_path):
    model = tuned_model()
    ck, base = fake_run_checkpoint(tmp_path, model)
    x, t, ctx = inputs(True)
    for adapter in ["ema", "default"]:  # ema by default: the exported policy
        out = tmp_path / f"{adapter}.safetensors"
        argv = [str(ck), "--out", str(out)] + ([] if adapter == "ema" else ["--adapter", "default"])
        merge_lora.main(merge_lora.tyro.cli(merge_lora.Args, args=argv))
        merged = load_file(out)
        assert sorted(merged) == sorted(load_file(base))  # the base's keys: no adapter keys
        fresh = load_checkpoint(CausalWanModel(CFG).eval(), str(out))  # what --ckpt does
        set_adapter(model, adapter)
        with torch.no_grad():  # block-causal, as our sampler and training run it
            err = (fresh(x, t, ctx) - model(x, t, ctx)).abs().max().item()
        assert err <= 1e-5, (adapter, err)
    # Self-Forcing's container (.pt): the wrapper's "model." keys under generator_ema and generator,
    # tensors only; our loader (as theirs) takes it as a generator
    pt = tmp_path / "tuned.pt"
    merge_lora.main(merge_lora.tyro.cli(merge_lora.Args, args=[str(ck), "--out", str(pt)]))
    container = torch.load(pt, weights_only=True)
    assert sorted(container["generator_ema"]) == sorted(f"model.{k}" for k in load_file(base))
    set_adapter(model, "ema")
    for ema in [True, False]:
        from_pt = load_checkpoint(CausalWanModel(CFG).eval(), str(pt), ema=ema)
        with torch.no_grad():
            assert (from_pt(x, t, ctx) - model(x, t, ctx)).abs().max().item() <= 1e-5
    # diffusers' single-file converter takes the merged file as a Wan2.1 DiT: the tuned outputs
    tr = diffusers_transformer(fresh)
    set_adapter(model, "default")
    a, b = ours(model, x, t, ctx), theirs(tr, x, t, ctx)
    assert (a - b).abs().max().item() <= 1e-4
    # another base than the one trained on is refused, in one line
    other = tmp_path / "other.safetensors"
    save_file({k: v + 1 for k, v in load_file(base).items()}, other)
    with pytest.raises(merge_lora.UsageError, match="not the file"):
        merge_lora.main(merge_lora.tyro.cli(merge_lora.Args, args=[str(ck), "--ckpt", str(other)]))
