"""
The frozen parts (frozen.py) on tiny random models: both file layouts of the Wan VAE and of the
umT5 encoder load to the same numbers, the latent normalisation, streaming decode == full
decode, prompt embeddings (EOS, exact zero padding, cache), and the errors for wrong files.

Test:  OMP_NUM_THREADS=1 python -m pytest tests/test_frozen.py -q      (CPU, no downloads, ~15 s)

The original Wan layouts are written here by hand (Wan's module names, from wan/modules/vae.py
and t5.py), then checked against diffusers' own converter, so a test never trusts frozen.py's
renames to build the files that test them.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import frozen
from frozen import TextEncoder, WanVAE, wan_t5_to_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# diffusers' converter hard-codes the Wan2.1 block indices (2 res blocks, dim_mult of length 4),
# so the tiny VAE shrinks only the width
TINY_VAE = dict(base_dim=8, num_res_blocks=2)
TINY_T5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)
WORDS = "a red blue green circle square moving left right up down fast slow".split()


def randomise(model, seed):
    """Perturb every parameter: norm gains start at 1, so a swapped pair of norms would go unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


# ----------------------------------------------------------------------------------------------
# ---- Wan VAE

def wan_vae_keys(cfg):
    """Key names of Wan's original WanVAE_ (wan/modules/vae.py) for a config, written by hand."""
    dim, mult, nres = cfg["base_dim"], cfg["dim_mult"], cfg["num_res_blocks"]
    down = cfg["temperal_downsample"]

    def conv(p):  # CausalConv3d / Conv2d
        return [f"{p}.weight", f"{p}.bias"]

    def res(p, i, o):  # ResidualBlock: residual = (RMS_norm, SiLU, conv, RMS_norm, SiLU, Dropout, conv)
        return ([f"{p}.residual.0.gamma", *conv(f"{p}.residual.2"), f"{p}.residual.3.gamma",
                 *conv(f"{p}.residual.6")] + (conv(f"{p}.shortcut") if i != o else []))

    def attn(p):  # AttentionBlock
        return [f"{p}.norm.gamma", *conv(f"{p}.to_qkv"), *conv(f"{p}.proj")]

    def resample(p, temporal):  # Resample: (ZeroPad2d | Upsample, Conv2d) [+ time_conv]
        return conv(f"{p}.resample.1") + (conv(f"{p}.time_conv") if temporal else [])

    keys, dims, j = conv("encoder.conv1"), [dim * u for u in [1] + mult], 0
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):  # Encoder3d.downsamples: flat Sequential
        for _ in range(nres):
            keys, a, j = keys + res(f"encoder.downsamples.{j}", a, b), b, j + 1
        if i != len(mult) - 1:
            keys, j = keys + resample(f"encoder.downsamples.{j}", down[i]), j + 1
    c = dims[-1]
    keys += res("encoder.middle.0", c, c) + attn("encoder.middle.1") + res("encoder.middle.2", c, c)
    keys += ["encoder.head.0.gamma", *conv("encoder.head.2"), *conv("conv1"), *conv("conv2")]
    dims, up, j = [dim * u for u in [mult[-1]] + mult[::-1]], down[::-1], 0
    c = dims[0]
    keys += conv("decoder.conv1") + res("decoder.middle.0", c, c) + attn("decoder.middle.1")
    keys += res("decoder.middle.2", c, c)
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):  # Decoder3d.upsamples
        a = a // 2 if i in (1, 2, 3) else a  # the upsampler before halved the channels
        for _ in range(nres + 1):
            keys, a, j = keys + res(f"decoder.upsamples.{j}", a, b), b, j + 1
        if i != len(mult) - 1:
            keys, j = keys + resample(f"decoder.upsamples.{j}", up[i]), j + 1
    return keys + ["decoder.head.0.gamma", *conv("decoder.head.2")]


def to_wan_vae_layout(vae):
    """A diffusers AutoencoderKLWan state dict in Wan's original key names (inverse of diffusers'
    convert_wan_vae_to_diffusers, built by running the converter on the names themselves)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    wan = wan_vae_keys(dict(vae.config))
    renamed = convert_wan_vae_to_diffusers({k: k for k in wan})  # {diffusers name: wan name}
    sd = vae.state_dict()
    assert len(renamed) == len(wan) and set(renamed) == set(sd), "hand-written Wan names are off"
    return {renamed[k]: v.clone() for k, v in sd.items()}


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory):
    """(in-memory tiny VAE, Wan .pth, Diffusers repo root, tiny config dir)."""
    from diffusers import AutoencoderKLWan
    d = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    vae = randomise(AutoencoderKLWan(**TINY_VAE), 0)
    vae.save_pretrained(d / "diffusers" / "vae")
    vae.save_config(d / "cfg" / "vae")
    os.makedirs(d / "wan")
    torch.save(to_wan_vae_layout(vae), d / "wan" / "Wan2.1_VAE.pth")
    return vae, str(d / "wan" / "Wan2.1_VAE.pth"), str(d / "diffusers"), str(d / "cfg")


def test_full_size_key_names():
    """At the real sizes (built on the meta device: no memory, no time): the hand-written Wan VAE
    layout has the real file's 194 tensors and maps 1:1 onto diffusers' VAE; the Wan T5 layout
    renames onto UMT5EncoderModel exactly, and its shapes give back the umT5-XXL config."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel
    with torch.device("meta"):
        cfg = json.load(open(os.path.join(frozen.VAE_CONFIG, "vae", "config.json")))
        vae = AutoencoderKLWan.from_config(cfg)
        t5 = UMT5EncoderModel(UMT5Config(**frozen.UMT5_XXL))
    assert len(to_wan_vae_layout(vae)) == 194
    wan = hf_to_wan_t5(t5.state_dict())
    assert set(wan_t5_to_hf(wan)) == set(t5.state_dict())
    assert frozen._t5_config(wan) == frozen.UMT5_XXL
    assert round(sum(v.numel() for v in wan.values()) / 1e9, 2) == 5.68  # 11.4 GB in bf16


def test_vae_both_layouts_load_to_the_same_model(vae_files):
    vae, pth, root, cfg = vae_files
    ref = WanVAE(vae)
    video = torch.rand(1, 9, 3, 32, 32) * 2 - 1
    z_ref = ref.encode(video)
    x_ref = ref.decode(z_ref)
    assert z_ref.shape == (1, 3, 16, 4, 4) and x_ref.shape == (1, 9, 3, 32, 32)
    for path in (pth, os.path.dirname(pth), root, os.path.join(root, "vae")):
        w = WanVAE.load(path, config=cfg)
        assert (w.encode(video) - z_ref).abs().max() <= 1e-6, path
        assert (w.decode(z_ref) - x_ref).abs().max() <= 1e-6, path


def test_shipped_vae_config_is_the_wan21_vae():
    from diffusers import AutoencoderKLWan
    shipped = json.load(open(os.path.join(frozen.VAE_CONFIG, "vae", "config.json")))
    with torch.device("meta"):
        defaults = dict(AutoencoderKLWan().config)
    assert {k: v for k, v in shipped.items() if not k.startswith("_")} == \
           {k: v for k, v in defaults.items() if not k.startswith("_")}
    assert shipped["_class_name"] == "AutoencoderKLWan"
    # the numbers Wan's wan/modules/vae.py hard-codes
    assert (shipped["base_dim"], shipped["z_dim"], shipped["num_res_blocks"]) == (96, 16, 2)
    assert shipped["dim_mult"] == [1, 2, 4, 4] and shipped["attn_scales"] == []
    assert shipped["temperal_downsample"] == [False, True, True] and shipped["patch_size"] is None
    mean, std = shipped["latents_mean"], shipped["latents_std"]
    assert mean[:3] == [-0.7571, -0.7089, -0.9113] and mean[-1] == -0.2921
    assert std[:3] == [2.8184, 1.4541, 2.3275] and std[-1] == 1.9160
    assert len(mean) == len(std) == 16


def test_vae_normalisation_against_raw_diffusers(vae_files):
    vae = vae_files[0]
    w = WanVAE(vae)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    video = torch.rand(2, 5, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        mu = vae.encode(video.transpose(1, 2)).latent_dist.mean            # [B, C, F, h, w]
        z = torch.randn(2, 3, 16, 2, 3)
        x = vae.decode(z.transpose(1, 2) * std + mean).sample             # [B, 3, T, H, W]
        x_wan = vae.decode(z.transpose(1, 2) / (1 / std) + mean).sample  # Wan's exact arithmetic
    assert torch.allclose(w.encode(video), ((mu - mean) / std).transpose(1, 2), atol=1e-6)
    out = w.decode(z)
    assert out.shape == (2, 9, 3, 16, 24) and out.abs().max() <= 1
    assert torch.equal(out, x_wan.transpose(1, 2))
    assert torch.allclose(out, x.transpose(1, 2), atol=1e-5)  # 1-ulp input differences, amplified
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        w.encode(torch.zeros(1, 8, 3, 16, 16))


def test_streaming_decode_equals_full_decode(vae_files):
    w = WanVAE(vae_files[0])
    torch.manual_seed(1)
    videos = [torch.randn(2, 6, 16, 4, 4) for _ in range(2)]
    for z in videos:  # two videos in a row: each stream() starts clean
        full = w.decode(z)                                               # [2, 21, 3, 32, 32]
        for n in (1, 3):
            s = w.stream()
            parts = []
            for i in range(0, 6, n):
                parts.append(s.push(z[:, i:i + n]))
                w.decode(videos[0][:, :2])  # a decode in between clears the VAE's own cache, not ours
            assert [p.shape[1] for p in parts[:2]] == ([1, 4] if n == 1 else [9, 12])
            assert (torch.cat(parts, 1) - full).abs().max() <= 1e-6, n


def test_tiled_decode_is_diffusers_tiles_and_costs_less(vae_files):
    """WanVAE.tile(32): tiles of 4 latents every 3 (24 pixels). The first tile is decoded alone and
    kept unblended up to the stride, so there the output equals a whole-frame decode of that crop;
    the rest is blended (a random VAE sees far: no closeness to the untiled decode is claimed), and
    the memory model's decode term shrinks with the tile."""
    import memory
    w = WanVAE(vae_files[0])
    z = torch.randn(1, 2, 16, 8, 12, generator=torch.Generator().manual_seed(3))  # 64 x 96 pixels
    whole, corner = w.decode(z), w.decode(z[..., :4, :4])
    w.tile(32)
    tiled = w.decode(z)
    w.vae.disable_tiling()  # the module's VAE is shared by the other tests
    assert tiled.shape == whole.shape and tiled.abs().max() <= 1
    assert torch.equal(tiled[..., :24, :24], corner[..., :24, :24])
    assert not torch.equal(tiled, whole)  # tiled at all
    # 480x832, 81 frames: a 160-pixel tile's working set and the decoded tiles, not whole frames
    full, tiles = memory.vae_decode_bytes(480, 832, 81), memory.vae_decode_bytes(480, 832, 81, tile=160)
    assert full - memory.VAE_WEIGHTS == memory.VAE_DECODE_FIXED + memory.VAE_BYTES_PER_PIXEL * 480 * 832
    assert tiles < full / 3 and memory.vae_decode_bytes(128, 128, 81, tile=160) == memory.vae_decode_bytes(128, 128, 81)


# ----------------------------------------------------------------------------------------------
# ---- umT5 text encoder

def hf_to_wan_t5(sd):
    """UMT5EncoderModel names -> Wan's T5Encoder names (wan/modules/t5.py), by hand."""
    rules = [(r"shared\.weight", "token_embedding.weight"),
             (r"encoder\.final_layer_norm\.weight", "norm.weight"),
             (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
             (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight",
              r"blocks.\1.attn.\2.weight"),
             (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
              r"blocks.\1.pos_embedding.embedding.weight"),
             (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
             (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight",
              r"blocks.\1.ffn.gate.0.weight"),
             (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
             (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight")]
    out = {}
    for k, v in sd.items():
        if k == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight; Wan stores the table once
        new = next(re.sub(p, r, k) for p, r in rules + [(".*", k)] if re.fullmatch(p, k))
        out[new] = v.clone()
    return out


def tiny_tokenizer(folder):
    """A word-level stand-in for google/umt5-xxl's tokenizer, saved and reloaded like the real one:
    pad <pad> = 0, EOS </s> = 1 appended by the post-processor ("$A </s>", as T5's), unk = 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


@pytest.fixture(scope="module")
def t5_files(tmp_path_factory):
    """(in-memory tiny encoder, Wan .pth with google/umt5-xxl/ beside it, Diffusers repo root)."""
    from transformers import UMT5Config, UMT5EncoderModel
    d = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    model = randomise(UMT5EncoderModel(UMT5Config(**TINY_T5)), 1)
    wan = hf_to_wan_t5(model.state_dict())
    assert len(wan) == 2 + 10 * TINY_T5["num_layers"] and not any(k.startswith("encoder.") for k in wan)
    os.makedirs(d / "wan")
    torch.save(wan, d / "wan" / "models_t5_umt5-xxl-enc-bf16.pth")
    tiny_tokenizer(d / "wan" / "google" / "umt5-xxl")
    model.save_pretrained(d / "diffusers" / "text_encoder")
    tiny_tokenizer(d / "diffusers" / "tokenizer")
    return model, str(d / "wan" / "models_t5_umt5-xxl-enc-bf16.pth"), str(d / "diffusers")


def test_wan_t5_rename_round_trips(t5_files):
    model = t5_files[0]
    sd = model.state_dict()
    back = wan_t5_to_hf(hf_to_wan_t5(sd))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_t5_both_layouts_give_the_same_embeddings(t5_files):
    model, pth, root = t5_files
    prompts = ["a red circle moving left", "blue  square &amp; up"]  # whitespace + html get cleaned
    a = TextEncoder.load(pth, dtype=torch.float32, text_len=16)
    b = TextEncoder.load(root, dtype=torch.float32, text_len=16)
    ea, eb = a(prompts), b(prompts)
    assert ea.shape == (2, 16, 32) and torch.equal(ea, eb)
    # against the raw model: the real rows are its output under the attention mask
    ids = torch.tensor([[3, 4, 7, 9, 10, 1]])                         # "a red circle moving left" </s>
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert torch.allclose(ea[0, :6], ref[0], atol=1e-5)
    assert TextEncoder.load(pth, text_len=16)(prompts[:1]).dtype == torch.bfloat16  # the default


def test_t5_padding_is_zero_and_irrelevant(t5_files):
    model, pth, _ = t5_files
    tok = TextEncoder.load(pth, dtype=torch.float32).tokenizer
    short, long = TextEncoder(model, tok, text_len=8), TextEncoder(model, tok, text_len=24)
    e8, e24 = short(["green square moving right"]), long(["green square moving right"])
    n = 5  # 4 words + EOS </s>: the real length includes EOS
    assert (e24[0, n:] == 0).all() and (e8[0, n:] == 0).all()
    assert (e24[0, :n].abs().sum(-1) > 0).all()                        # every real row is non-zero
    assert torch.allclose(e8[0, :n], e24[0, :n], atol=1e-5)           # pads are masked out inside
    words = " ".join(WORDS * 3)                                        # longer than text_len
    assert (short([words])[0].abs().sum(-1) > 0).all()                 # truncated: no zero rows left


def test_t5_cache_runs_each_prompt_once(t5_files):
    model, pth, _ = t5_files
    enc = TextEncoder.load(pth, dtype=torch.float32, text_len=16)
    calls = []
    hook = enc.model.register_forward_hook(lambda *a: calls.append(1))
    first = enc(["a red circle", "a blue square", "a red circle"])
    assert len(calls) == 2 and torch.equal(first[0], first[2])
    again = enc(["a blue square", "a red circle"])
    assert len(calls) == 2 and torch.equal(again, first[[1, 0]])
    enc(["a green circle"])                                            # a new prompt: one more run
    assert len(calls) == 3 and len(enc.cache) == 3
    hook.remove()


def test_clean_prompt():
    assert frozen.clean_prompt("  a\n\tred &amp;amp; blue  ") == "a red & blue"


# ----------------------------------------------------------------------------------------------
# ---- Wrong paths and wrong files: one clear error naming the file and what was expected

def test_bad_inputs(vae_files, t5_files, tmp_path):
    vae_pth, cfg = vae_files[1], vae_files[3]
    t5_pth = t5_files[1]
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        WanVAE.load(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        TextEncoder.load(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="umT5 text encoder.*decoder.middle.0.residual.0.gamma"):
        WanVAE.load(t5_pth, config=cfg)                                # the T5 file given as VAE
    with pytest.raises(ValueError, match="Wan VAE.*token_embedding.weight"):
        TextEncoder.load(vae_pth)                                      # the VAE file given as T5
    torch.save({"generator_ema": {"patch_embedding.weight": torch.zeros(1)}}, tmp_path / "dit.pt")
    with pytest.raises(ValueError, match="generator_ema.*DiT training checkpoint"):
        WanVAE.load(tmp_path / "dit.pt")
    torch.save({"patch_embedding.weight": torch.zeros(1)}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="Wan DiT checkpoint"):
        TextEncoder.load(tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="does not match.*mis-shaped"):
        WanVAE.load(vae_pth)                       # tiny file, shipped full-size config
    (tmp_path / "lonely").mkdir()
    torch.save(torch.load(t5_pth), tmp_path / "lonely" / "t5.pth")
    with pytest.raises(FileNotFoundError, match="tokenizer.*lonely"):
        TextEncoder.load(tmp_path / "lonely" / "t5.pth")
    with pytest.raises(ValueError, match="not a Diffusers Wan VAE folder"):
        WanVAE.load(tmp_path / "lonely")


def test_import_is_cheap():
    """`import frozen` must not pull in diffusers / transformers (train.py --help stays fast)."""
    code = "import sys, frozen; sys.exit(('diffusers' in sys.modules) + ('transformers' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
