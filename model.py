"""
The causal Wan2.1 DiT used by Self-Forcing, Causal Forcing, LongLive and Krea Realtime: the
released `wan/modules/causal_model.py` of franklinz233/Astrolabe (LongLive's, derived from
guandeh17/Self-Forcing's), rule by rule in docs/wan_architecture.md. Every block linear is a
LoRALinear (lora.py); released weights load through checkpoints.py.

A video latent (B, F, C, H, W) is cut into 1x2x2 patches (P = h*w tokens per latent frame), every
latent frame gets its own diffusion timestep, and the transformer runs *block-causally*: frames
are grouped into blocks of 3 and a block attends to itself and earlier blocks only. This is what
lets the model generate a video block by block against a KV cache (kvcache.py, sample.py).

Two forwards, one attention code path (SelfAttention + _attend):
  model.forward_cached(x_block, t, ctx, cache, s)   the sampler: one block against the KV cache
  model(x, t, ctx, ...)                              training: a clip (or the window after a
                                                     detached `history` cache), block-causal,
                                                     optionally on clean context (teacher forcing)
The training forward loops over query blocks, each attending to exactly the K/V the cache would
hold at that block (kvcache.attention_plan), so it equals the cached path run block by block
(tests/test_model.py). Parameter names are the checkpoints' own: released weights load strictly.

Test:  python -m pytest tests/test_parity.py tests/test_model.py -q

Shape legend: B batch, F latent frames (teacher forcing: nc clean ones go first), C latent
channels, H, W latent height/width, h, w token grid (H/2, W/2 for Wan's 1x2x2 patches), P tokens
per frame (h*w), Nt tokens of one call (F*P), Dm model dim, Hd heads, D head dim, Lt text tokens,
Dt text dim.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as Fn
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from kvcache import KVCache, attention_plan, clean_context_frames
from lora import LoRALinear, lora_layers


@dataclass
class ModelConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple = (1, 2, 2)  # (frame, h, w): a token never spans two latent frames
    freq_dim: int = 256  # sinusoidal features of t: freq_dim/2 cosines, freq_dim/2 sines
    text_dim: int = 4096
    text_len: int = 512  # umT5 rows; shorter contexts are zero-padded to it (no key mask)
    eps: float = 1e-6
    frames_per_block: int = 3  # "num_frame_per_block": 3 for every chunkwise checkpoint


CONFIGS = {
    # CPU tests and the demo (pixel-space shapes world, see tiny_world.py)
    "tiny": ModelConfig(dim=128, ffn_dim=512, num_heads=4, num_layers=4, in_dim=3, out_dim=3,
                        patch_size=(1, 4, 4), text_dim=64, text_len=16),
    # Wan2.1-T2V-1.3B: Self-Forcing, Causal Forcing, LongLive
    "wan-1.3b": ModelConfig(),
    # Wan2.1-T2V-14B: Krea Realtime Video
    "wan-14b": ModelConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


# ----------------------------------------------------------------------------------------------
# Embeddings: sinusoidal timestep features and 3D RoPE

def sinusoid(t: torch.Tensor, freq_dim: int) -> torch.Tensor:
    """[cos(t w_j) | sin(t w_j)], w_j = 10000^(-j/half), computed in float64 (as the reference)."""
    half = freq_dim // 2
    t = t.to(torch.float64)  # as released: t w_j reaches 1000 rad, where float32 is off by ~6e-5
    # w_j = 10000^(-j/half), j < half
    w = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    arg = torch.outer(t, w)  # (B*F, half)
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)  # (B*F, freq_dim) float64


def rope_dims(head_dim: int):
    """Real dims per axis (frame, height, width): d - 4*floor(d/6), 2*floor(d/6), 2*floor(d/6)."""
    s = 2 * (head_dim // 6)  # even, so every axis has whole (cos, sin) pairs: 42 for D = 128
    return head_dim - 2 * s, s, s  # the frame axis takes the rest: 44 / 42 / 42 for D = 128


def rope_freqs(head_dim, start_frame, frames, h, w, device="cpu"):
    """The 3D RoPE rotations e^(i angle) for a (frames, h, w) grid starting at `start_frame`:
    complex64 cos + i sin, (Nt, 1, D/2), in the order [frame | h | w]. Only the requested
    positions are computed, so there is no 1024-frame limit (the released table has one)."""
    def axis(pos0, n, dim):
        # theta_j = 10000^(-2j/D_axis), j < D_axis/2, in float64 like the released table
        inv = 1.0 / torch.pow(10000, torch.arange(0, dim, 2, dtype=torch.float64, device=device).div(dim))
        # angle = position * theta_j: (n, D_axis/2)
        return torch.outer(torch.arange(pos0, pos0 + n, dtype=torch.float64, device=device), inv)
    dt, dh, dw = rope_dims(head_dim)
    # absolute frame positions; rows and columns always start at 0
    at, ah, aw = axis(start_frame, frames, dt), axis(0, h, dh), axis(0, w, dw)
    # each token (f, y, x) gets [frame angles of f | row angles of y | column angles of x]
    ang = torch.cat([at[:, None, None].expand(frames, h, w, -1),
                     ah[None, :, None].expand(frames, h, w, -1),
                     aw[None, None, :].expand(frames, h, w, -1)], dim=-1)
    ang = ang.reshape(frames * h * w, 1, head_dim // 2)  # (Nt, 1, D/2) float64
    # cos and sin in float64, rounded to float32 once
    return torch.complex(ang.cos().float(), ang.sin().float())  # (Nt, 1, D/2) complex64


def apply_rope(x: torch.Tensor, freqs) -> torch.Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) by the angles: one complex multiply per pair.

    The reference multiplies in complex128; complex64 here differs by ~1 ulp (fixtures: <= 2e-6)
    and keeps no float64 activations for backward.
    """
    B, Nt, Hd, D = x.shape
    # pairs as complex numbers: x[2j] + i x[2j+1]
    xc = torch.view_as_complex(x.float().reshape(B, Nt, Hd, D // 2, 2))  # (B, Nt, Hd, D/2)
    # (xe + i xo) (cos + i sin) = (xe cos - xo sin) + i (xe sin + xo cos)
    return torch.view_as_real(xc * freqs).flatten(3).to(x.dtype)  # (B, Nt, Hd, D)


# ----------------------------------------------------------------------------------------------
# Layers

class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back, times a learned weight."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        # x * rsqrt(mean(x^2) + eps) in float32, cast back; then the weight in x's dtype
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (Wan's WanLayerNorm)."""
    def forward(self, x):
        # the affine weights too in float32: a bf16 base holds them in bf16, and layer_norm takes
        # no float input with bf16 weights outside CUDA autocast (which upcasts both, as here)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return Fn.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def _attend(q, k, v, ranges):
    """softmax(q k^T / sqrt(D)) v of the query tokens against the K/V token `ranges`.

    q: (B, Nq, Hd, D); k, v: (B, Nk, Hd, D); ranges: list of (lo, hi) runs of k to attend.
    """
    if len(ranges) == 1:  # one contiguous run: a view, no copy
        (lo, hi), = ranges
        k, v = k[:, lo:hi], v[:, lo:hi]
    else:  # sink U window, or clean prefix U own block: one concatenated copy of the runs
        k = torch.cat([k[:, lo:hi] for lo, hi in ranges], dim=1)
        v = torch.cat([v[:, lo:hi] for lo, hi in ranges], dim=1)
    # SDPA takes (B, Hd, Nt, D); its default scale 1/sqrt(D) is Wan's; no mask inside the runs
    o = Fn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2)  # (B, Nq, Hd, D)


class SelfAttention(nn.Module):
    """q, k, v, o projections with RMSNorm on q and k (over the full dim, before the head split)."""
    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (LoRALinear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, freqs, plan, layer, q_from=0):
        """x (B, F, P, Dm). Every frame's K and V are computed (later queries attend to them); the
        outputs are those of frames q_from.. : (B, F - q_from, P, Dm)."""
        B, F, P, Dm = x.shape
        x = x.flatten(1, 2)  # (B, Nt, Dm), tokens in (frame, row, column) order
        k = apply_rope(self.norm_k(self.k(x)).unflatten(2, (self.num_heads, -1)), freqs)  # (B, Nt, Hd, D)
        v = self.v(x).unflatten(2, (self.num_heads, -1))  # (B, Nt, Hd, D): no norm, no RoPE
        K, V = plan.keys_values(layer, k, v)  # cache write, or [history ; this clip]
        q0 = q_from * P  # the first query token
        q = apply_rope(self.norm_q(self.q(x[:, q0:])).unflatten(2, (self.num_heads, -1)), freqs[q0:])
        # each query block attends to its own key runs (blocks before q_from: not computed)
        out = [_attend(q[:, lo - q0:hi - q0], K, V, ranges) for (lo, hi), ranges in plan.blocks if lo >= q0]
        out = torch.cat(out, dim=1)  # (B, Nt - q0, Hd, D)
        return self.o(out.flatten(2)).unflatten(1, (F - q_from, P))  # (B, F - q_from, P, Dm)


class CrossAttention(SelfAttention):
    """Text cross-attention: no RoPE, no mask; text K/V can be cached once per prompt."""
    def forward(self, x, ctx, cache=None, layer=0):
        """x (B, F, P, Dm) attending to the text ctx (B, Lt, Dm) -> (B, F, P, Dm)."""
        B, F, P, Dm = x.shape
        q = self.norm_q(self.q(x.flatten(1, 2))).unflatten(2, (self.num_heads, -1))  # (B, Nt, Hd, D)
        if cache is not None and cache.cross[layer] is not None:
            k, v = cache.cross[layer]  # this prompt's text K/V, from the first call on it
        else:
            k = self.norm_k(self.k(ctx)).unflatten(2, (self.num_heads, -1))  # (B, Lt, Hd, D)
            v = self.v(ctx).unflatten(2, (self.num_heads, -1))
            if cache is not None:
                cache.cross[layer] = (k, v)
        return self.o(_attend(q, k, v, [(0, k.shape[1])]).flatten(2)).unflatten(1, (F, P))


@torch.no_grad()
def _draw_modulation(p):
    """Wan's modulation init, randn / sqrt(Dm), in place; nothing on the meta device."""
    if not p.is_meta:
        p.normal_().div_(p.shape[-1] ** 0.5)


class Block(nn.Module):
    """adaLN transformer block: self-attn (modulated, gated), cross-attn, FFN (modulated, gated)."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        # (1, 6, Dm), added to e0: shift, scale, gate of self-attention, then of the FFN
        self.modulation = nn.Parameter(torch.empty(1, 6, d))
        _draw_modulation(self.modulation)
        self.norm1 = LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(d, cfg.eps, elementwise_affine=True)  # the one affine LayerNorm
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(LoRALinear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 LoRALinear(cfg.ffn_dim, d))

    def forward(self, x, e0, ctx, freqs, plan, layer, q_from=0):
        """Tokens x (B, Nt, Dm) -> the new tokens of frames q_from.. (B, Nt - q_from P, Dm): every
        frame still gives its K and V (the last layer: only the frames the head reads go on)."""
        x = x.unflatten(1, (e0.shape[1], -1))  # (B, F, P, Dm): the modulation is per frame
        # shift, scale, gate of the attention and of the FFN: modulation + e0, (B, F, 1, Dm) each
        sh_a, sc_a, g_a, sh_f, sc_f, g_f = (self.modulation.unsqueeze(1) + e0).chunk(6, dim=2)
        # x = x + gate * SelfAttn(norm1(x) * (1 + scale) + shift)
        y = self.self_attn(self.norm1(x) * (1 + sc_a) + sh_a, freqs, plan, layer, q_from)  # (B, F', P, Dm)
        x = x[:, q_from:] + g_a[:, q_from:] * y  # from here on, the frames q_from..
        # x = x + CrossAttn(norm3(x), text)      (no modulation, no gate)
        x = x + self.cross_attn(self.norm3(x), ctx, plan.cache, layer)
        # x = x + gate * FFN(norm2(x) * (1 + scale) + shift)
        x = x + g_f[:, q_from:] * self.ffn(self.norm2(x) * (1 + sc_f[:, q_from:]) + sh_f[:, q_from:])
        return x.flatten(1, 2)  # (B, Nt - q_from P, Dm)


def _run_block(block, adapter, *args):
    """block(*args) with LoRA adapter `adapter` active in it, the previous selection restored
    (tests/test_memory.py switches adapters before backward)."""
    layers = [m for _, m in lora_layers(block)]
    # checkpointing recomputes a block in backward under the adapter active *then*: train.py leaves
    # use_adapter(model, "default") first, so unpinned it would crash or use another adapter's weights
    prev = [m.active for m in layers]
    for m in layers:
        m.active = adapter  # pinned: the forward and its recompute use the same weights
    try:
        return block(*args)
    finally:
        for m, a in zip(layers, prev):
            m.active = a


class _Plan:
    """Who attends to what in one forward call, shared by all layers.

    blocks: list of ((q_lo, q_hi), [(k_lo, k_hi), ...]) in token units of this call's queries and
    of the K/V sequence keys_values() returns: the cache's valid part (its K/V written first), or
    [history ; this call], or this call's own.
    """
    def __init__(self, blocks, cache=None, slot=None, history=None):
        self.blocks, self.cache, self.slot, self.history = blocks, cache, slot, history

    def keys_values(self, i, k, v):
        if self.slot is not None:  # inference: write into the cache, attend to its valid part
            self.cache.write(i, self.slot, k, v)
            return self.cache.layer(i)
        if self.history is not None:  # streaming: a detached cache prefix, then this clip
            hk, hv = self.history.layer(i)
            return torch.cat([hk, k], dim=1), torch.cat([hv, v], dim=1)
        return k, v


# ----------------------------------------------------------------------------------------------
# The model

class CausalWanModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        assert cfg.patch_size[0] == 1, "causal blocks need one latent frame per token (patch_t = 1)"
        assert d % cfg.num_heads == 0 and (d // cfg.num_heads) % 2 == 0
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                            nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))  # e -> e0: 6 per frame
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        # recompute each block in backward instead of storing its activations (the training
        # forward only): one more forward of the blocks per backward, for keeping one (B, Nt, Dm)
        # input per block and one block's activations at a time instead of every block's
        self.grad_checkpointing = False
        # built on the meta device, a checkpoint fills every tensor: nothing to draw (and drawing
        # there costs a second: torch's meta kernels for random ops load its compiler stack)
        if not self.head.head.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Wan's initialisation (matters only when training from scratch, e.g. tools/pretrain_tiny.py)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))  # the conv as a linear
        for m in [*self.text_embedding, *self.time_embedding]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)  # Wan's embeddings: N(0, 0.02^2), not xavier
        nn.init.zeros_(self.head.head.weight)  # the model starts by predicting v = 0

    def _embed(self, x, t, context, cache=None):
        """Tokens (B, Nt, Dm), time features e (B, F, Dm) and e0 (B, F, 6, Dm), text (B, Lt, Dm)
        (None when the cache already holds this prompt's cross-attention K/V)."""
        B, F = x.shape[:2]
        # patchify: Conv3d with kernel = stride = patch, tokens in (frame, row, column) order;
        # contiguous, so every op downstream reads the residual stream in order (one copy here)
        tok = rearrange(self.patch_embedding(x.transpose(1, 2)), "b d f h w -> b (f h w) d").contiguous()
        # time: e = MLP(sinusoid(t)) per frame; e0 = 6 modulation vectors per frame
        e = self.time_embedding(sinusoid(t.flatten(), self.cfg.freq_dim).to(tok.dtype))  # (B*F, Dm)
        e0 = self.time_projection(e).unflatten(1, (6, self.cfg.dim)).unflatten(0, (B, F))  # (B, F, 6, Dm)
        if context.shape[1] > self.cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} text tokens; the model takes at most "
                             f"text_len={self.cfg.text_len} (truncate the prompt embeddings)")
        ctx = None
        if cache is None or any(c is None for c in cache.cross):
            # text: zero-pad to text_len rows, then the MLP (no key mask: pad rows are attended)
            ctx = self.text_embedding(Fn.pad(context, (0, 0, 0, self.cfg.text_len - context.shape[1])))
        return tok, e.unflatten(0, (B, F)), e0, ctx

    def _unpatchify(self, out, H, W):
        """Head output (B, F, P, ph*pw*C), features ordered (ph, pw, c) -> (B, F, C, H, W)."""
        ph, pw = self.cfg.patch_size[1:]
        return rearrange(out, "b f (h w) (ph pw c) -> b f c (h ph) (w pw)", h=H // ph, ph=ph, pw=pw)

    def forward_cached(self, x, t, context, cache: KVCache, start_frame):
        """The sampler's forward: flow v of one block of noisy latents x (B, F, C, H, W) at
        timesteps t (B, F), frame 0 being absolute frame `start_frame`. The block attends to what
        the cache holds and to itself, and its K/V are written into the cache (a repeated call on
        the same block overwrites them: the sampler's 4 steps, then its clean t = 0 pass).
        Returns (B, F, C, H, W)."""
        B, F, C, H, W = x.shape
        ph, pw = self.cfg.patch_size[1:]
        tok, e, e0, ctx = self._embed(x, t, context, cache)
        # RoPE at the absolute frame positions
        freqs = rope_freqs(self.cfg.dim // self.cfg.num_heads, start_frame, F, H // ph, W // pw, x.device)
        lo, _ = cache.begin(start_frame, F)  # this block's slots (a rolling cache evicts first)
        # one query block over every filled slot: sink, window and itself, in slot order
        plan = _Plan([((0, tok.shape[1]), [(0, cache.length)])], cache=cache, slot=lo)
        for i, block in enumerate(self.blocks):
            tok = block(tok, e0, ctx, freqs, plan, i)
        return self._unpatchify(self.head(tok, e), H, W)

    def forward(self, x, t, context, *, start_frame=0, history: KVCache = None, clean_x=None,
                local=None, sink=None, mask_block=None):
        """The training forward: flow v of a clip of noisy latents x (B, F, C, H, W) at per-frame
        timesteps t (B, F) in [0, 1000], frame 0 being absolute frame `start_frame`; text context
        (B, Lt' <= Lt, Dt). Block-causal: a block attends to itself and to earlier blocks.

        history: a (read-only) KV cache of the frames before the clip, every block may attend to it
                 (streaming: the detached rollout cache at the window's start).
        clean_x: teacher forcing: each noisy block attends to the clean frames of the earlier
                 blocks (as the sampler's cache holds them), not to their noisy copies.
        local, sink: the attention window (kvcache.visible); default: the history's own, else
                 global (-1, 0).
        mask_block: frames per block of the mask (default cfg.frames_per_block; 1 is frame-causal,
                 what the released trainer trains with: docs/method.md#training-attention-mask).
        Returns (B, F, C, H, W).
        """
        B, F, C, H, W = x.shape
        ph, pw = self.cfg.patch_size[1:]
        P = (H // ph) * (W // pw)
        block = mask_block or self.cfg.frames_per_block
        # teacher forcing: the clean copies of the blocks before the last go first, at t = 0 (the
        # released "aug_t"); noisy block [a, b) reads the clean frames before a, and no query reads
        # the last block's clean copy, so it is left out (the same outputs, one block less)
        nc = 0 if clean_x is None else clean_context_frames(F, block)
        if nc:
            x = torch.cat([clean_x[:, :nc], x], dim=1)  # (B, nc + F, C, H, W)
            t = torch.cat([torch.zeros_like(t[:, :nc]), t], dim=1)  # (B, nc + F)
        tok, e, e0, ctx = self._embed(x, t, context)
        # RoPE at absolute frame positions; a clean frame and its noisy copy share theirs
        freqs = rope_freqs(self.cfg.dim // self.cfg.num_heads, start_frame, F, H // ph, W // pw, x.device)
        freqs = torch.cat([freqs[:nc * P], freqs])
        # who attends to what: the window rule as given, else the history cache's own, else global
        local = local if local is not None else (history.local if history is not None else -1)
        sink = sink if sink is not None else (history.sink if history is not None else 0)
        past = [] if history is None else history.frames  # the history's absolute frames
        plan = _Plan(attention_plan(F, P, block, start_frame, local, sink, past, clean_x is not None),
                     history=history)
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks):
            # the last layer computes only the noisy frames' outputs: the head reads nothing else
            q_from = nc if i == len(self.blocks) - 1 else 0
            if ckpt:  # recompute in backward; use_reentrant=False: grads reach the graph directly
                tok = checkpoint(_run_block, blk, blk.self_attn.q.active, tok, e0, ctx, freqs, plan, i, q_from,
                                 use_reentrant=False, preserve_rng_state=False)  # nothing in a block is random
            else:
                tok = blk(tok, e0, ctx, freqs, plan, i, q_from)
        return self._unpatchify(self.head(tok, e[:, nc:]), H, W)


class Head(nn.Module):
    """Output head: out = Linear(norm(x) * (1 + scale) + shift), modulated by e per frame."""
    def __init__(self, cfg):
        super().__init__()
        d = cfg.dim
        self.norm = LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(d, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.empty(1, 2, d))
        _draw_modulation(self.modulation)

    def forward(self, x, e):  # x (B, Nt, Dm), e (B, F, Dm)
        B, F = e.shape[:2]
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)  # (B, F, 1, Dm)
        x = self.norm(x).unflatten(1, (F, -1))  # (B, F, P, Dm)
        return self.head(x * (1 + scale) + shift)  # (B, F, P, ph*pw*C)


@torch.no_grad()
def randomize_head(model, std=0.02):
    """Wan's init zeroes the output head (v = 0: one flat video), so draw the head's weight instead.
    For random-weight runs only (demos, benchmarks, tests); a checkpoint loads over it."""
    nn.init.normal_(model.head.head.weight, std=std)
