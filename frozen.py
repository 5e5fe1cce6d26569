"""
The frozen Wan2.1 parts, through libraries: the video VAE (diffusers `AutoencoderKLWan`) and the
umT5-XXL text encoder (transformers `UMT5EncoderModel`). Nothing here is trained: the RL loop
encodes prompts once, rolls out in latent space, and decodes latents to pixels for the rewards.
docs/rewards.md#wan-vae-and-umt5 documents both routes and the original Wan code they follow.

Files (the table in docs/rewards.md#wan-vae-and-umt5). The original layout, as Self-Forcing / LongLive / Causal Forcing expect it
(`wan_models/Wan2.1-T2V-1.3B/`, from HF `Wan-AI/Wan2.1-T2V-1.3B`; Krea 14B uses the same two):
    Wan2.1_VAE.pth                     ~0.51 GB  fp32 VAE, 194 tensors
    models_t5_umt5-xxl-enc-bf16.pth    ~11.4 GB  bf16 umT5-XXL encoder, 5.68 B parameters
    google/umt5-xxl/                   tokenizer (tokenizer.json, spiece.model, ...)
or the Diffusers layout (`Wan-AI/Wan2.1-T2V-1.3B-Diffusers`): vae/, text_encoder/, tokenizer/.

    vae = WanVAE.load("wan_models/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth", device="cuda")
    text = TextEncoder.load("wan_models/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth", device="cuda")
    ctx = text(["a fox in the snow"])              # [1, 512, 4096]
    video = vae.decode(latents)                    # [B, 21, 16, 60, 104] -> [B, 81, 3, 480, 832]

FrozenParts is what train.py uses: embed(prompts) and decode(latents) for any model size, the tiny
shapes world's toy text encoder and pixel space included.

diffusers / transformers are imported inside functions, so `import frozen` is cheap and
`python train.py --help` never loads them.
Test: python -m pytest tests/test_frozen.py -q      (tiny random models, CPU, no downloads)

Shape legend: B batch, Fp pixel frames (Fp = 1 + 4k), F latent frames (F = 1 + k), C latent
channels (16), H, W pixel size, h, w latent size (H/8, W/8), Lt text tokens (512), Dt text width;
a StreamingDecoder.push of n latent frames gives t pixel frames.
"""
import html
import json
import os
import re

import torch

import tiny_world
from checkpoints import check_keys, read_tensors
from common import UsageError, use_bf16
from model import CONFIGS

VAE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "wan_vae")
# ^ holds vae/config.json = `AutoencoderKLWan().save_config(...)` (the Wan2.1 VAE). Shipped so that
#   loading Wan2.1_VAE.pth never asks the hub for a config (offline that is an OSError).
WAN_VAE_FILE = "Wan2.1_VAE.pth"
WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_VAE_KEY = "decoder.middle.0.residual.0.gamma"           # how diffusers recognises Wan's VAE file
DIFFUSERS_VAE_KEY = "decoder.mid_block.resnets.0.norm1.gamma"


# ----------------------------------------------------------------------------------------------
# ---- Reading checkpoint files (one clear error for every way a path can be wrong)

def _read_state_dict(path, expected):
    """A .pth / .pt / .safetensors file -> flat {name: tensor}; ValueError naming the file otherwise."""
    sd = read_tensors(path, expected)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        keys = list(sd)[:6] if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"{path} is not a flat state dict (it holds {keys}: a DiT training "
                         f"checkpoint?); expected {expected}")
    return sd


def _looks_like(sd):
    """A guess at what a state dict holds, for the error message when it is the wrong file."""
    if "token_embedding.weight" in sd or "shared.weight" in sd:
        return "the umT5 text encoder"
    if WAN_VAE_KEY in sd or DIFFUSERS_VAE_KEY in sd:
        return "the Wan VAE"
    if any("patch_embedding" in k for k in sd):
        return "a Wan DiT checkpoint"
    return f"something else (first keys {list(sd)[:3]})"


def _load_strict(model, sd, path, what):
    """load_state_dict(strict=True, assign=True) with every key problem listed in one ValueError.

    assign=True: the model is built on the meta device, so the file's tensors become the
    parameters (no random init of 5.7 B parameters, no second copy in memory).
    """
    check_keys(model, sd, path, what)
    model.load_state_dict(sd, strict=True, assign=True)


def _exists(path, what):
    """path as a str, or FileNotFoundError naming it and what was expected there."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


# ----------------------------------------------------------------------------------------------
# ---- Wan2.1 VAE: 4x temporal, 8x spatial compression, 16 latent channels, causal in time

class WanVAE:
    """diffusers AutoencoderKLWan + Wan's latent normalisation; layout [B, F, C, H, W] (frames before
    channels, like our model). diffusers' own layout is [B, C, F, H, W]; we transpose at the edge."""

    def __init__(self, vae):
        if vae.config.patch_size is not None:  # Wan2.2's VAE (48 channels, patchified) is another model
            raise ValueError("this AutoencoderKLWan has patch_size set (Wan2.2 VAE); the Wan2.1 "
                             "models need the Wan2.1 VAE (patch_size None, z_dim 16)")
        self.vae = vae.eval().requires_grad_(False)
        p = next(vae.parameters())
        self.device, self.dtype = p.device, p.dtype
        # Wan hard-codes these 16 numbers (diffusers keeps them in the config) and passes
        # scale = [mean, 1/std]; we keep the same two tensors so the arithmetic is Wan's, bit for bit.
        self.mean = torch.tensor(vae.config.latents_mean).view(1, 1, -1, 1, 1).to(p)       # [1, 1, C, 1, 1]
        self.inv_std = (1.0 / torch.tensor(vae.config.latents_std)).view(1, 1, -1, 1, 1).to(p)

    @classmethod
    def load(cls, path, device="cpu", dtype=torch.float32, config=VAE_CONFIG):
        """Wan2.1_VAE.pth (original layout), a Diffusers repo root (with vae/) or its vae/ folder.

        config: folder holding vae/config.json, used only for a single .pth / .safetensors file
        (default: the shipped Wan2.1 config; tests pass a tiny one). Keep the VAE in fp32, as the
        diffusers docs advise: it is small (127 M parameters) and decodes every reward's pixels.
        """
        from diffusers import AutoencoderKLWan
        path = _exists(path, f"Wan VAE (expected {WAN_VAE_FILE} or a Diffusers folder with vae/)")
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, WAN_VAE_FILE)):
            path = os.path.join(path, WAN_VAE_FILE)  # the Wan2.1-T2V-1.3B folder itself
        if os.path.isdir(path):
            sub = next((s for s in ("vae", "") if os.path.isfile(os.path.join(path, s, "config.json"))), None)
            cfg = json.load(open(os.path.join(path, sub, "config.json"))) if sub is not None else {}
            if cfg.get("_class_name") != "AutoencoderKLWan":
                raise ValueError(f"{path} is not a Diffusers Wan VAE folder: expected vae/config.json or "
                                 f"config.json with _class_name AutoencoderKLWan, or {WAN_VAE_FILE}")
            vae = AutoencoderKLWan.from_pretrained(os.path.join(path, sub), torch_dtype=dtype)
            return cls(vae.to(device))
        sd = _read_state_dict(path, f"the Wan2.1 VAE ({WAN_VAE_FILE})")
        if WAN_VAE_KEY in sd:  # original Wan key names -> diffusers' (the strict load below checks every key)
            from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
            sd = convert_wan_vae_to_diffusers(sd)
        elif DIFFUSERS_VAE_KEY not in sd:
            raise ValueError(f"{path} is not a Wan VAE state dict: it looks like {_looks_like(sd)}; "
                             f"expected keys like {WAN_VAE_KEY!r} ({WAN_VAE_FILE}) or "
                             f"{DIFFUSERS_VAE_KEY!r} (diffusers layout)")
        cfg_file = os.path.join(config, "vae", "config.json")
        with torch.device("meta"):
            vae = AutoencoderKLWan.from_config(json.load(open(_exists(cfg_file, "VAE config"))))
        _load_strict(vae, sd, path, f"the VAE of {cfg_file}")
        vae = vae.to(device)  # dtype only if it changes: diffusers warns on every .to(dtype=...)
        return cls(vae if next(vae.parameters()).dtype == dtype else vae.to(dtype))

    @torch.no_grad()
    def encode(self, video):
        """video [B, Fp, 3, H, W] in [-1, 1], Fp = 1 + 4k -> normalised posterior mean
        [B, 1 + k, C, H/8, W/8]."""
        B, Fp, _, H, W = video.shape
        if (Fp - 1) % 4 or H % 8 or W % 8:  # diffusers would silently drop the frames past 1 + 4k
            raise ValueError(f"WanVAE.encode: got {Fp} frames of {H}x{W}; need 1 + 4k frames "
                             f"and H, W multiples of 8")
        x = video.to(self.device, self.dtype).transpose(1, 2)        # [B, 3, Fp, H, W]
        # the causal encoder sees frame 0 alone, then chunks of 4 -> F = 1 + (Fp - 1) / 4 latents.
        # Wan and Self-Forcing take the posterior *mean* (no sampling), then z = (mu - mean) / std
        mu = self.vae.encode(x).latent_dist.mode().transpose(1, 2)   # [B, F, C, h, w]
        return ((mu - self.mean) * self.inv_std).contiguous()

    @torch.no_grad()
    def decode(self, latents):
        """normalised latents [B, F, C, h, w] -> video [B, 1 + 4(F - 1), 3, 8h, 8w] in [-1, 1]."""
        z = latents.to(self.device, self.dtype) / self.inv_std + self.mean  # z * std + mean, as Wan
        x = self.vae.decode(z.transpose(1, 2)).sample                        # [B, 3, Fp, H, W], clamped
        return x.transpose(1, 2).contiguous()                                # [B, Fp, 3, H, W]

    def tile(self, size):
        """decode() from now on in tiles of size x size pixels (a multiple of 32) every 3/4 tile, the
        overlaps blended (diffusers' tiled decode, its default 256 / 192 scaled): the working set of
        one tile instead of whole frames (memory.vae_decode_bytes)."""
        stride = size * 3 // 4
        self.vae.enable_tiling(tile_sample_min_height=size, tile_sample_min_width=size,
                               tile_sample_stride_height=stride, tile_sample_stride_width=stride)

    def stream(self):
        """A fresh block-by-block decoder for one video (its own cache; this VAE is left untouched)."""
        return StreamingDecoder(self)


class StreamingDecoder:
    """Decode a latent stream block by block; the concatenated output equals WanVAE.decode() of
    the whole sequence (exactly: it is the same computation, only split across calls).

    Why this works (CACHE_T rule): every causal 3D conv of the decoder has a temporal kernel of
    at most 3, so it needs the last CACHE_T = 2 frames of its own input from before the current
    chunk. diffusers' _decode already runs the decoder one latent frame at a time with a per-conv
    cache of those frames (`feat_cache`), clearing it only at the start and end of a call. We keep
    that cache between push() calls instead of clearing it. The first latent frame decodes to 1
    pixel frame (the temporal upsamplers skip it), every later one to 4.
    """

    def __init__(self, wan_vae):
        self.w = wan_vae
        # one slot per causal conv (every Conv3d in the decoder is a WanCausalConv3d); our own list,
        # not vae._feat_map, so decode() calls in between (they clear that one) cannot disturb us
        self.cache = [None] * sum(isinstance(m, torch.nn.Conv3d) for m in wan_vae.vae.decoder.modules())
        self.first = True

    @torch.no_grad()
    def push(self, latents):
        """next latent frames [B, n, C, h, w] -> their pixels [B, t, 3, 8h, 8w]
        (t = 1 + 4(n - 1) on the first call, 4n after)."""
        w, vae = self.w, self.w.vae
        z = latents.to(w.device, w.dtype) / w.inv_std + w.mean
        x = vae.post_quant_conv(z.transpose(1, 2))   # 1x1x1 conv: per frame, so per block is exact
        out = []
        for i in range(x.shape[2]):                  # [B, C, 1, h, w] at a time, like _decode
            out.append(vae.decoder(x[:, :, i:i + 1], feat_cache=self.cache, feat_idx=[0],
                                   first_chunk=self.first))
            self.first = False
        return torch.cat(out, 2).clamp(-1, 1).transpose(1, 2).contiguous()  # [B, t, 3, H, W]


# ----------------------------------------------------------------------------------------------
# ---- umT5-XXL text encoder

# google/umt5-xxl's encoder = Wan's `umt5_xxl(encoder_only=True)`. Both use tanh-GELU gating, RMS
# norm (eps 1e-6), no 1/sqrt(d) attention scale and one relative-position table per block.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)

# Wan key -> transformers key under blocks.i / encoder.block.i (docs/rewards.md#wan-vae-and-umt5)
_T5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch of the gate
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",     # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def wan_t5_to_hf(sd):
    """Rename a Wan `models_t5_umt5-xxl-enc-bf16.pth` state dict to UMT5EncoderModel's names.

    Unknown keys pass through unchanged, so the strict load that follows names them.
    """
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
        if k == "token_embedding.weight":   # one table: transformers ties shared and embed_tokens
            out["shared.weight"] = out["encoder.embed_tokens.weight"] = v
        elif k == "norm.weight":             # the encoder's last RMSNorm
            out["encoder.final_layer_norm.weight"] = v
        elif m and m.group(2) in _T5_BLOCK:
            out[f"encoder.block.{m.group(1)}.{_T5_BLOCK[m.group(2)]}"] = v
        else:
            out[k] = v
    return out


def _t5_config(sd):
    """UMT5Config numbers read off the tensors' shapes (the real file gives exactly UMT5_XXL)."""
    vocab, d_model = sd["token_embedding.weight"].shape
    buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return {**UMT5_XXL, "vocab_size": vocab, "d_model": d_model, "num_heads": heads,
            "d_kv": sd["blocks.0.attn.q.weight"].shape[0] // heads, "num_layers": layers,
            "d_ff": sd["blocks.0.ffn.fc1.weight"].shape[0], "relative_attention_num_buckets": buckets}


def clean_prompt(text):
    """Wan's `clean="whitespace"` = diffusers' prompt_clean: ftfy (if installed), html-unescape
    twice, collapse whitespace. Without ftfy, mojibake in a prompt would tokenise differently."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


class TextEncoder:
    """umT5-XXL through transformers.UMT5EncoderModel; [B, 512, 4096] embeddings with exact zeros
    after each prompt's real length (Wan-Video/Wan2.1 `wan/modules/t5.py` keeps u[:n], the DiT
    zero-pads it back; docs/rewards.md#wan-vae-and-umt5); one forward per distinct prompt, cached."""

    def __init__(self, model, tokenizer, text_len=512, device="cpu"):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.text_len, self.device = tokenizer, text_len, torch.device(device)
        # prompt string -> [Lt, Dt] on the CPU: 4 MB each in bf16, so a large prompt set stays off the GPU
        self.cache = {}

    @classmethod
    def load(cls, path, tokenizer=None, device="cpu", dtype=torch.bfloat16, text_len=512):
        """models_t5_umt5-xxl-enc-bf16.pth (tokenizer: `tokenizer`, else google/umt5-xxl/ beside
        it), a Diffusers repo root (text_encoder/ + tokenizer/) or a transformers folder."""
        from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel
        path = _exists(path, f"umT5 text encoder (expected {WAN_T5_FILE} or a folder with "
                             f"text_encoder/ and tokenizer/)")
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, WAN_T5_FILE)):
            path = os.path.join(path, WAN_T5_FILE)  # the Wan2.1-T2V-1.3B folder itself
        if os.path.isdir(path):
            sub = "text_encoder" if os.path.isdir(os.path.join(path, "text_encoder")) else ""
            tok = tokenizer or (os.path.join(path, "tokenizer") if sub else path)
            cfg = os.path.join(path, sub, "config.json")
            if not os.path.isfile(cfg) or json.load(open(cfg)).get("model_type") != "umt5":
                raise ValueError(f"{path} is not a umT5 folder: expected text_encoder/config.json or "
                                 f"config.json with model_type umt5, or {WAN_T5_FILE}")
            model = UMT5EncoderModel.from_pretrained(os.path.join(path, sub), dtype=dtype)
        else:
            sd = _read_state_dict(path, f"the Wan umT5 encoder ({WAN_T5_FILE})")
            if "token_embedding.weight" not in sd or "blocks.0.attn.q.weight" not in sd:
                raise ValueError(f"{path} is not Wan's umT5 encoder state dict: it looks like "
                                 f"{_looks_like(sd)}; expected keys 'token_embedding.weight', "
                                 f"'blocks.0.attn.q.weight', ... ({WAN_T5_FILE})")
            with torch.device("meta"):
                model = UMT5EncoderModel(UMT5Config(**_t5_config(sd)))
            _load_strict(model, wan_t5_to_hf(sd), path, "UMT5EncoderModel (after the Wan rename)")
            model.tie_weights()  # assign= gave shared / embed_tokens separate Parameters: one table again
            tok = tokenizer or os.path.join(os.path.dirname(path), "google", "umt5-xxl")
        if not os.path.isdir(tok):
            raise FileNotFoundError(f"umT5 tokenizer folder not found: {tok}; pass tokenizer=<the "
                                    f"google/umt5-xxl folder of Wan-AI/Wan2.1-T2V-1.3B>")
        model = model.to(device=device, dtype=dtype)
        return cls(model, AutoTokenizer.from_pretrained(tok), text_len, device)

    def __call__(self, prompts):
        """prompts: list of B strings -> [B, Lt, Dt] on self.device (the model's dtype)."""
        for p in dict.fromkeys(p for p in prompts if p not in self.cache):  # distinct, in order
            self.cache[p] = self._encode(p)
        return torch.stack([self.cache[p] for p in prompts]).to(self.device)

    @torch.no_grad()
    def _encode(self, prompt):
        """One prompt per forward: its embedding then never depends on which prompts shared its
        batch (bf16 kernels can differ with the batch size), so a resumed run gets the same one."""
        # pad to Lt, truncate past Lt; the tokenizer appends EOS </s> (id 1), pads with id 0, and
        # the mask counts real tokens + EOS: n = mask.sum()
        tok = self.tokenizer([clean_prompt(prompt)], padding="max_length", max_length=self.text_len,
                             truncation=True, add_special_tokens=True, return_tensors="pt")
        dev = next(self.model.parameters()).device  # the GPU, or the CPU after offload()
        mask = tok.attention_mask.to(dev)                                          # [1, Lt]
        # the mask goes *into* the encoder: pad keys are ignored, so rows < n equal Wan's u[:n]
        u = self.model(input_ids=tok.input_ids.to(dev), attention_mask=mask).last_hidden_state
        # rows >= n: exact zeros (Wan trims to u[:n] and zero-pads back to Lt; the DiT then attends
        # to all Lt rows unmasked, so these zeros are part of the conditioning, not padding to skip)
        return u[0].masked_fill(mask[0, :, None] == 0, 0).cpu()                    # [Lt, Dt]


# ----------------------------------------------------------------------------------------------
# ---- The frozen ends of train.py's pipeline

class FrozenParts:
    """embed(prompts) -> (B, Lt, Dt) text embeddings and decode(latents) -> videos (B, Fp, 3, Hp, Wp)
    in [0, 1], for any --model.

    tiny: the shapes world's toy word embeddings, and its latents are already pixels. Real models:
    umT5 embeds every training prompt once (on the GPU, then it is freed before the DiT loads; the
    embeddings wait on the CPU) and the Wan VAE decodes --decode-batch videos at a time.
    A file that exists but holds the wrong thing is a UsageError: the user's to fix.
    """
    def __init__(self, args, prompts, device):
        self.args, self.device, self.vae, self.table = args, device, None, {}
        if args.model == "tiny":
            return
        missing = [f"--{f.replace('_', '-')}" for f in ("vae", "text_encoder") if not getattr(args, f)]
        if missing:
            raise UsageError(f"--model {args.model} needs {' and '.join(missing)} (README, Real models)")
        half = torch.bfloat16 if use_bf16(args, device) else torch.float32
        try:
            te = TextEncoder.load(args.text_encoder, args.tokenizer, device=device, dtype=half)
            for i in range(0, len(prompts), 8):  # rows are (512, 4096) each: keep them on the CPU
                self.table.update(zip(prompts[i:i + 8], te(prompts[i:i + 8]).to("cpu", half)))
            del te
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # umT5-XXL's 11 GB leave the GPU before the DiT arrives
            self.vae = WanVAE.load(args.vae, device=device)  # float32, as diffusers recommends for it
            if args.vae_tile:
                self.vae.tile(args.vae_tile)
        except (ValueError, OSError) as e:
            raise UsageError(str(e)) from None

    def embed(self, prompts):
        if self.vae is None:  # tiny: fixed per-word vectors
            cfg = CONFIGS["tiny"]
            return tiny_world.toy_text_embed(prompts, cfg.text_len, cfg.text_dim).to(self.device)
        return torch.stack([self.table[p] for p in prompts]).to(self.device)

    def decode(self, lat):
        if self.vae is None:  # tiny: pixel space already
            return to_pixels(lat)
        b = self.args.decode_batch
        # (B, F, 16, h, w) -> (B, Fp = 1 + 4 (F - 1), 3, Hp = 8h, Wp = 8w), b videos per VAE call
        return torch.cat([to_pixels(self.vae.decode(lat[i:i + b].float())) for i in range(0, len(lat), b)])


def to_pixels(x):
    """A decoder's (or the pixel-space tiny model's) output in [-1, 1] -> video in [0, 1], what the
    rewards and the video writers take."""
    return ((x.float() + 1) / 2).clamp(0, 1)
