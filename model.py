"""
The causal Wan2.1 DiT used by Self-Forcing, Causal Forcing, LongLive and Krea Realtime: the
released `wan/modules/causal_model.py` of franklinz233/Astrolabe (LongLive's, derived from
guandeh17/Self-Forcing's), rule by rule in docs/wan_architecture.md. Every block linear is a
LoRALinear (lora.py); released weights load through checkpoints.py.

A video latent [B, F, C, H, W] is cut into 1x2x2 patches (h*w tokens per latent frame), every
latent frame gets its own diffusion timestep, and the transformer runs *block-causally*: frames
are grouped into blocks of 3 and a block attends to itself and earlier blocks only. This is
what lets the model generate a video block by block against a KV cache (kvcache.py, sample.py).

Three forward paths, one attention code path (`SelfAttention` + `_attend`):
  1. model(x_block, t, ctx, cache=cache, start_frame=s)     one block against a KV cache
  2. model(x, t, ctx)                                        block-causal training forward
     (+ local=, sink= for a windowed mask, history= for a detached cache prefix)
  3. model(x, t, ctx, clean_x=x0)                            teacher forcing (clean context)
Path 2 loops over query blocks; each attends to exactly the K/V the cache would hold at that
block (kvcache.visible), so it equals path 1 run block by block (tests/test_model.py).
The parameter names are the checkpoints' own, so released weights load with strict=True.
Test:  python -m pytest tests/test_parity.py tests/test_model.py -q

Shape legend: B batch, F latent frames (teacher forcing: nc < F clean ones before them), C latent
channels, H, W latent height/width, h, w token grid (H/2, W/2 for Wan's 1x2x2 patches), P tokens
per frame (h*w), N tokens of one call (F*P), N' the tokens a block keeps, Dm model dim, Hd heads,
D head dim, Lt text tokens, Dt text dim.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F_
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
    qk_norm: bool = True  # on in every Wan2.1 T2V checkpoint, so always built (not a switch)
    cross_attn_norm: bool = True  # likewise: norm3 before cross-attention
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
    complex64 cos + i sin, (N, 1, D/2), in the order [frame | h | w]. Only the requested
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
    ang = ang.reshape(frames * h * w, 1, head_dim // 2)  # (N, 1, D/2) float64
    # cos and sin in float64, rounded to float32 once
    return torch.complex(ang.cos().float(), ang.sin().float())  # (N, 1, D/2) complex64


def apply_rope(x: torch.Tensor, freqs) -> torch.Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) by the angles: one complex multiply per pair.

    The reference multiplies in complex128; complex64 here differs by ~1 ulp (fixtures: <= 2e-6)
    at a fraction of the time and no float64 activations kept for backward.
    """
    B, N, Hd, D = x.shape
    # pairs as complex numbers: x[2j] + i x[2j+1]
    xc = torch.view_as_complex(x.float().reshape(B, N, Hd, D // 2, 2))  # (B, N, Hd, D/2)
    # (xe + i xo) (cos + i sin) = (xe cos - xo sin) + i (xe sin + xo cos)
    return torch.view_as_real(xc * freqs).flatten(3).to(x.dtype)  # (B, N, Hd, D)


# ----------------------------------------------------------------------------------------------
# Layers

class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back, times a learned weight."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        # mean(x^2) = ||x||^2 / Dm: one read of x and no (..., Dm) temporary (on a CPU F.rms_norm
        # runs pow, mean, mul: 25% slower here); the same to float rounding
        inv_rms = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / x.shape[-1] + self.eps)
        # x * rsqrt(mean(x^2) + eps) in float32, cast back; then the weight in x's dtype
        return (xf * inv_rms).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (Wan's WanLayerNorm)."""
    def forward(self, x):
        # the affine weights too in float32: a bf16 base holds them in bf16, and layer_norm takes
        # no float input with bf16 weights outside CUDA autocast (which upcasts both, as here)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F_.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


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
    # SDPA takes (B, Hd, N, D); its default scale 1/sqrt(D) is Wan's; no mask inside the runs
    o = F_.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2)  # (B, Nq, Hd, D)


class SelfAttention(nn.Module):
    """q, k, v, o projections with RMSNorm on q and k (over the full dim, before the head split)."""
    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (LoRALinear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, freqs, plan, layer, q_from=0):
        """Self-attention output for the tokens from `q_from` on (every token's K and V are still
        computed: later queries attend to them); None when no query is kept (q_from = N)."""
        B, N, _ = x.shape
        k = apply_rope(self.norm_k(self.k(x)).view(B, N, self.num_heads, -1), freqs)  # (B, N, Hd, D)
        v = self.v(x).view(B, N, self.num_heads, -1)  # (B, N, Hd, D), no norm, no RoPE
        K, V = plan.keys_values(layer, k, v)  # cache write or [history ; this clip]
        if q_from == N:  # a cache-update pass needs nothing more from the last layer
            return None
        xq = x[:, q_from:]  # the frames before q_from only give K/V: their outputs are never read
        q = apply_rope(self.norm_q(self.q(xq)).view(B, N - q_from, self.num_heads, -1), freqs[q_from:])
        # each query block attends to its own key runs; blocks before q_from are not computed
        out = [_attend(q[:, lo - q_from:hi - q_from], K, V, ranges) for (lo, hi), ranges in plan.blocks
               if lo >= q_from]
        out = out[0] if len(out) == 1 else torch.cat(out, dim=1)
        return self.o(out.flatten(2))  # (B, N - q_from, Dm)


class CrossAttention(SelfAttention):
    """Text cross-attention: no RoPE, no mask; text K/V can be cached once per prompt."""
    def forward(self, x, ctx, cache=None, layer=0):
        B, N, _ = x.shape
        q = self.norm_q(self.q(x)).view(B, N, self.num_heads, -1)  # (B, N, Hd, D)
        if cache is not None and cache.cross[layer] is not None:
            k, v = cache.cross[layer]  # this prompt's text K/V, from the first call on it
        else:
            k = self.norm_k(self.k(ctx)).view(B, ctx.shape[1], self.num_heads, -1)
            v = self.v(ctx).view(B, ctx.shape[1], self.num_heads, -1)
            if cache is not None:
                cache.cross[layer] = (k, v)
        return self.o(_attend(q, k, v, [(0, k.shape[1])]).flatten(2))  # (B, N, Dm)


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

    def forward(self, x, e0, ctx, freqs, plan, layer, keep_from=0):
        """The block on tokens x (B, N, Dm); returns the outputs of frames keep_from.. only (None if
        none), while every frame still gives its K and V (the last block: only what the head reads)."""
        B, N, Dm = x.shape
        P = N // e0.shape[1]  # tokens per frame
        # M = modulation + e0 -> shift/scale/gate for attention and FFN, one set per frame
        sh_a, sc_a, g_a, sh_f, sc_f, g_f = (self.modulation.unsqueeze(1) + e0).chunk(6, dim=2)  # (B, F, 1, Dm)
        # x = x + gate * SelfAttn(norm1(x) * (1 + scale) + shift)
        h = torch.addcmul(sh_a, self.norm1(x).view(B, -1, P, Dm), 1 + sc_a).flatten(1, 2)
        y = self.self_attn(h, freqs, plan, layer, keep_from * P)
        if y is None:
            return None
        # from here on, only the kept frames
        x, g_a, sh_f, sc_f, g_f = x[:, keep_from * P:], g_a[:, keep_from:], sh_f[:, keep_from:], sc_f[:, keep_from:], \
            g_f[:, keep_from:]
        x = torch.addcmul(x.view(B, -1, P, Dm), y.view(B, -1, P, Dm), g_a).flatten(1, 2)
        # x = x + CrossAttn(norm3(x), text)      (no modulation, no gate)
        x = x + self.cross_attn(self.norm3(x), ctx, plan.cache, layer)
        # x = x + gate * FFN(norm2(x) * (1 + scale) + shift)
        y = _ffn(self.ffn, torch.addcmul(sh_f, self.norm2(x).view(B, -1, P, Dm), 1 + sc_f).flatten(1, 2))
        return torch.addcmul(x.view(B, -1, P, Dm), y.view(B, -1, P, Dm), g_f).flatten(1, 2)  # (B, N', Dm)


FFN_ROWS = 1024  # tokens per FFN chunk without a gradient on a CPU: a (1024, ffn_dim) hidden stays in cache


def _gelu_tanh_(h):
    """Wan's tanh GELU in place, as h sigmoid(2u): 0.5 (1 + tanh u) = sigmoid(2u), and a CPU
    computes a sigmoid ~4x faster than a tanh. Equal to nn.GELU("tanh") to float32 rounding."""
    # 2u = 2 sqrt(2/pi) (h + 0.044715 h^3)
    u = torch.addcmul(h, h * h, h, value=0.044715).mul_(2 * math.sqrt(2 / math.pi))
    return u.sigmoid_().mul_(h)


def _ffn(ffn, x):
    """FFN(x) = W2 GELU(W1 x + b1) + b2 per token, (B, N', Dm) -> (B, N', Dm). Without a gradient on
    a CPU (sampling, the old and reference predictions) FFN_ROWS tokens at a time, so the 4x wider
    hidden stays in the CPU's cache instead of going to main memory and back (each token's numbers
    as in one piece); with a gradient autograd keeps the whole hidden anyway: nn.Sequential as is."""
    # float32 only: the sigmoid GELU matches to float32 rounding, not to bf16's
    fast = x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    if torch.is_grad_enabled() or not fast:
        return ffn(x)
    lin1, _, lin2 = ffn  # Linear, GELU(tanh), Linear
    rows = x.flatten(0, 1)  # (B * N', Dm): the FFN treats every token on its own
    out = torch.empty_like(rows)
    for i in range(0, len(rows), FFN_ROWS):
        out[i:i + FFN_ROWS] = lin2(_gelu_tanh_(lin1(rows[i:i + FFN_ROWS])))
    return out.view_as(x)


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

    blocks: list of ((q_lo, q_hi), [(k_lo, k_hi), ...]) in token units of this call's
    queries and of the K/V sequence returned by keys_values().
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
        # recompute each block in backward instead of storing its activations (training paths
        # only): one more forward of the blocks per backward, for keeping one (B, N, Dm) input
        # per block and one block's activations at a time instead of every block's
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

    def forward(self, x, t, context, *, cache: KVCache = None, start_frame=0, clean_x=None,
                history: KVCache = None, local=None, sink=None, mask_block=None, kv_only=False):
        """Flow (velocity) prediction v for noisy latents x at per-frame timesteps t.

        x: (B, F, C, H, W) noisy latents, frame 0 is absolute frame `start_frame`
        t: (B, F) float32 timesteps in [0, 1000]; context: (B, Lt' <= Lt, Dt) text embeddings
        cache:   inference. x is one block, attending to the cache + itself; K/V are written.
        history: training on a window: a (read-only) cache prefix every block may attend to.
        clean_x: teacher forcing. Each noisy block sees the clean frames of earlier blocks.
        local, sink: the attention window of the training mask (see kvcache.visible); default:
                 the history's own, else global (-1, 0); with a cache they are the cache's own.
        mask_block: frames per block of the training mask (default cfg.frames_per_block; 1 is
                 frame-causal, what the released trainer trains with: docs/method.md#training-attention-mask).
        kv_only: with a cache, only write K/V (the sampler's t = 0 pass): skips the last
                 layer's attention output, cross-attention, FFN and the head; returns None.
        returns: (B, F, C, H, W) flow prediction
        """
        cfg = self.cfg
        B, Fr, C, H, W = x.shape
        ph, pw = cfg.patch_size[1:]
        h, w = H // ph, W // pw
        tpf = h * w  # P: tokens per frame
        nfpb = mask_block or cfg.frames_per_block  # frames per block of the training mask
        # teacher forcing: the clean frames [0, nc) some noisy block reads (the last block's clean
        # copy is read by none: left out, same outputs), at t = 0 ("aug_t"), before the noisy ones
        nc = 0 if clean_x is None else clean_context_frames(Fr, nfpb)
        xs = x if clean_x is None else torch.cat([clean_x[:, :nc], x], dim=1)
        ts = t if clean_x is None else torch.cat([torch.zeros_like(t[:, :nc]), t], dim=1)
        nf = xs.shape[1]  # frames in the sequence: F, or nc + F with teacher forcing

        # patchify: Conv3d with kernel = stride = patch, tokens ordered (f, h, w)
        # contiguous: the conv gives (B, Dm, N); left transposed, every op downstream inherits
        # that layout (each LayerNorm copies, each linear reads strided); one copy here instead
        tok = self.patch_embedding(xs.transpose(1, 2)).flatten(2).transpose(1, 2).contiguous()  # (B, N, Dm)
        # time: e = MLP(sinusoid(t)) per frame; e0 = 6 modulation vectors per frame
        e = self.time_embedding(sinusoid(ts.flatten(), cfg.freq_dim).to(tok.dtype))  # (B*F, Dm)
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim)).unflatten(0, (B, nf))  # (B, F, 6, Dm)
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} text tokens; the model takes at most "
                             f"text_len={cfg.text_len} (truncate the prompt embeddings)")
        # text: zero-pad to text_len rows, then the MLP (no key mask: pad rows are attended);
        # skipped when the cache already holds this prompt's cross-attention K/V
        ctx = None if cache is not None and all(c is not None for c in cache.cross) else \
            self.text_embedding(F_.pad(context, (0, 0, 0, cfg.text_len - context.shape[1])))

        # RoPE: absolute frame positions; a clean frame and its noisy copy share them
        freqs = rope_freqs(cfg.dim // cfg.num_heads, start_frame, Fr, h, w, x.device)
        if clean_x is not None:
            freqs = torch.cat([freqs[:nc * tpf], freqs], dim=0)

        # who attends to what
        if cache is not None:
            lo, _ = cache.begin(start_frame, Fr)  # this block's slots (a rolling cache evicts first)
            # one query block over every filled slot: sink, window and itself, in slot order
            plan = _Plan([((0, nf * tpf), [(0, cache.length)])], cache=cache, slot=lo)
        else:
            # the window rule: as given, else the history cache's own (a window continuing a
            # rollout), else global attention
            if local is None:
                local = history.local if history is not None else -1
            if sink is None:
                sink = history.sink if history is not None else 0
            past = [] if history is None else history.frames  # absolute frames of the history
            blocks = attention_plan(Fr, tpf, nfpb, start_frame, local, sink, past, clean_x is not None)
            plan = _Plan(blocks, history=history)

        ckpt = self.grad_checkpointing and cache is None and torch.is_grad_enabled()
        # the last block computes only what the head reads: nothing for a cache pass (kv_only),
        # the noisy frames with teacher forcing (the clean frames' outputs would be thrown away)
        last_keep = nf if kv_only else nc
        for i, block in enumerate(self.blocks):
            keep = last_keep if i == len(self.blocks) - 1 else 0
            if ckpt:  # use_reentrant=False: grads reach the inputs' and params' graph directly
                # (no RNG state to restore: nothing inside a block is random)
                tok = checkpoint(_run_block, block, block.self_attn.q.active, tok, e0, ctx, freqs,
                                 plan, i, keep, use_reentrant=False, preserve_rng_state=False)
            else:
                tok = block(tok, e0, ctx, freqs, plan, i, keep)
        if kv_only:
            return None

        if clean_x is not None:  # the head's modulation for the noisy frames
            e = e.unflatten(0, (B, nf))[:, nc:].flatten(0, 1)
        out = self.head(tok, e.unflatten(0, (B, Fr)))  # (B, F, P, ph*pw*C)
        # unpatchify: features ordered (pt, ph, pw, c); -> (B, F, C, H, W)
        out = out.view(B, Fr, h, w, ph, pw, cfg.out_dim)
        return out.permute(0, 1, 6, 2, 4, 3, 5).reshape(B, Fr, cfg.out_dim, H, W)


class Head(nn.Module):
    """Output head: out = Linear(norm(x) * (1 + scale) + shift), modulated by e per frame."""
    def __init__(self, cfg):
        super().__init__()
        d = cfg.dim
        self.norm = LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(d, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.empty(1, 2, d))
        _draw_modulation(self.modulation)

    def forward(self, x, e):  # x (B, N, Dm), e (B, F, Dm)
        B, Fr = e.shape[:2]
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)  # (B, F, 1, Dm)
        x = self.norm(x).view(B, Fr, -1, x.shape[-1])  # (B, F, P, Dm)
        return self.head(x * (1 + scale) + shift)  # (B, F, P, ph*pw*C)


@torch.no_grad()
def randomize_head(model, std=0.02):
    """Wan's init zeroes the output head (v = 0: one flat video), so draw the head's weight instead.
    For random-weight runs only (demos, benchmarks, tests); a checkpoint loads over it."""
    nn.init.normal_(model.head.head.weight, std=std)
