"""
Rolling KV cache for block-causal (autoregressive) video diffusion.

A distilled AR video model (Self-Forcing, Causal Forcing, LongLive, Krea) denoises a video
one *block* of latent frames at a time. Every self-attention layer keeps the keys and values
of the frames generated so far, so a new block only computes its own tokens and attends to
what the cache holds plus itself. Two flavours, as in the released code
(franklinz233/Astrolabe `wan/modules/causal_model.py`; docs/wan_architecture.md#kv-cache):

  global  (local = -1): every frame ever written stays; capacity = the whole video.
  rolling (local = L) : the first `sink` frames stay forever ("attention sink"), the rest is a
                        window of the most recent frames; capacity = L frames, so memory is
                        bounded however long the video gets (LongLive: L = 12, sink = 3).

Keys are stored *after* RoPE at their absolute frame positions; nothing is re-indexed after an
eviction (a query at frame 60 still sees sink keys rotated for frames 0-2).

The one visibility rule used everywhere (cache, training masks, tests) is `visible()`:
a query block that ends (exclusive) at frame e may attend to the frames
    [0, min(S, e))  U  [max(S, e - (L - S)), e)          S = sink, L = local window
With S = 0 this is the reference's local-window *training* mask; with L = -1 it is plain
block-causal attention; with S > 0 it is what the rolling cache holds after eviction.
attention_plan() turns the rule into the token ranges each query block of a training forward
attends to (model.py runs it; memory.py counts with it); with teacher forcing it
leaves out the clean copy of the last block, which nothing reads (clean_context_frames()).

Deliberate difference from LongLive/Astrolabe (docs/wan_architecture.md#quirks-of-the-released-cache,
quirks 1 and 2): when the sink
is larger than a block, the reference attends to zero-filled slots and keeps stale (t=1000)
keys in the sink. Here only written slots are ever attended, and a repeated call on a block
always overwrites that block's own slots, so the cache is exactly "sink U recent frames"
(Self-Forcing's semantics). For sink <= frames-per-block (every released config) both agree.

Test: python -m pytest tests/test_kvcache.py -q

Shape legend: Ly layers, B batch, Nc cache capacity in tokens, Nt new tokens, Hd heads,
D head dim, Lt text tokens, P tokens per frame (tpf); S sink frames, L window frames (local).
"""
import torch


def visible(f: int, end: int, sink: int = 0, local: int = -1) -> bool:
    """True if frame f may be attended by a query block that ends (exclusive) at frame `end`."""
    if f >= end:
        return False  # causal: never look ahead of the query's block
    if local < 0:
        return True  # global attention
    # [0, min(S, e)) U [max(S, e - (L - S)), e)
    return f < sink or f >= max(sink, end - (local - sink))


def check_window(frames_per_block: int, sink: int, local: int) -> None:
    """One clear error for cache settings that cannot work."""
    # a rolling cache holds the sink and at least the block being written (else it evicts itself)
    if sink < 0 or (local >= 0 and local < sink + frames_per_block):
        raise ValueError(
            f"rolling cache with local={local}, sink={sink} cannot hold the sink plus one block of "
            f"{frames_per_block} frames; use local >= sink + frames_per_block (LongLive: local=12, "
            f"sink=3) or local=-1 for a global cache")


class KVCache:
    """Preallocated per-layer self-attention K/V plus per-prompt cross-attention K/V.

    Usage, once per model call on a block of n frames starting at absolute frame s:
        lo, hi = cache.begin(s, n)        # decide the slots (evicting if needed)
        for each layer i: cache.write(i, lo, k, v); K, V = cache.layer(i)   # attend to [0, end)
    A repeated call on the same block (the 4 denoising steps and the t=0 cache-update pass)
    overwrites the same slots, so the cache ends up holding the block's clean K/V.
    """

    def __init__(self, num_layers, batch, frames, tokens_per_frame, num_heads, head_dim,
                 sink=0, local=-1, dtype=torch.float32, device="cpu"):
        # frames: capacity in frames for a global cache (the whole video); ignored when rolling,
        # where the capacity is the window `local`.
        self.tpf, self.sink, self.local = tokens_per_frame, sink, local
        cap_frames = local if local >= 0 else frames
        # zero-filled like the released buffers, but an unwritten slot is never attended here
        shape = (num_layers, batch, cap_frames * tokens_per_frame, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (Ly, B, Nc, Hd, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (Ly, B, Nc, Hd, D)
        self.frames = []  # absolute frame index of every written frame, in slot order
        self.end_frame = 0  # one past the last frame ever written ("global_end")
        self.last_block = None  # (start, n) of the latest call, to recognise repeats
        self.cross = [None] * num_layers  # per layer (k, v) of the text: (B, Lt, Hd, D) each

    @classmethod
    def for_model(cls, cfg, batch, frames, frame_hw, sink=0, local=-1, dtype=torch.float32,
                  device="cpu"):
        """Build a cache sized for a model config and a latent frame size (H, W)."""
        check_window(cfg.frames_per_block, sink, local)
        tpf = (frame_hw[0] // cfg.patch_size[1]) * (frame_hw[1] // cfg.patch_size[2])  # P = h * w
        return cls(cfg.num_layers, batch, frames, tpf, cfg.num_heads, cfg.dim // cfg.num_heads,
                   sink, local, dtype, device)

    # ---------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Capacity in frames."""
        return self.k.shape[2] // self.tpf

    @property
    def length(self) -> int:
        """Number of valid tokens ("local_end" in the reference)."""
        return len(self.frames) * self.tpf

    def begin(self, start: int, n: int):
        """Reserve slots for frames [start, start + n) and return their token range (lo, hi)."""
        if self.last_block == (start, n):  # a repeat call on the same block: overwrite it
            hi = self.length
            return hi - n * self.tpf, hi
        if start < self.end_frame:  # older blocks are final (or evicted): no rewriting them
            raise ValueError(f"cache holds frames up to {self.end_frame - 1}; a call at frame "
                             f"{start} is neither the latest block nor a new one (reset the cache)")
        cap = self.capacity
        if len(self.frames) + n > cap:  # no room for n more frames
            if self.local < 0:
                raise ValueError(f"global KV cache is full ({cap} frames); build it with more "
                                 f"frames or use a rolling cache (local > 0)")
            # eviction: keep the sink slots, drop the oldest non-sink frames, slide the rest left
            evict = len(self.frames) + n - cap  # just enough of the oldest non-sink frames
            S, keep = self.sink, len(self.frames) - evict - self.sink  # keep: the recent frames left
            t = self.tpf
            src = slice((S + evict) * t, (S + evict + keep) * t)
            dst = slice(S * t, (S + keep) * t)
            self.k[:, :, dst] = self.k[:, :, src].clone()  # clone: the ranges overlap
            self.v[:, :, dst] = self.v[:, :, src].clone()
            del self.frames[S:S + evict]  # the slot -> frame list moves with the buffers
        lo = self.length  # the new frames go right after the filled slots
        self.frames += list(range(start, start + n))
        self.end_frame, self.last_block = start + n, (start, n)  # the next repeat call overwrites these
        return lo, self.length

    def write(self, layer: int, lo: int, k: torch.Tensor, v: torch.Tensor):
        """Store one layer's new (roped) keys and values at token slot lo onwards."""
        self.k[layer, :, lo:lo + k.shape[1]] = k  # (B, Nt, Hd, D)
        self.v[layer, :, lo:lo + v.shape[1]] = v  # (B, Nt, Hd, D)

    def layer(self, layer: int):
        """The valid K and V of one layer: (B, length, Hd, D) views, no copy."""
        return self.k[layer, :, :self.length], self.v[layer, :, :self.length]

    # ---------------------------------------------------------------------------------------
    def reset(self):
        """Forget all frames (and the text K/V): start a new video."""
        self.frames, self.end_frame, self.last_block = [], 0, None
        self.reset_cross()

    def reset_cross(self):
        """Forget the cached text K/V (a new prompt)."""
        self.cross = [None] * len(self.cross)

    def select(self, rows) -> "KVCache":
        """A new cache holding copies of batch rows `rows` (repeats allowed: [0, 0, 1] gives the
        first video twice): the group rollout branches K candidates from one prompt's history.
        The copy shares no memory with this cache. Only the filled slots are copied: the slots
        past `length` are left unset in the copy, and nothing reads a slot before it is written."""
        idx = torch.as_tensor(list(rows), device=self.k.device)
        new = KVCache.__new__(KVCache)
        new.__dict__.update(self.__dict__)  # every field, then its own copies of what it mutates
        n = self.length  # a history at frame s fills s of the capacity's frames: copy those only
        new.k = self.k.new_empty(self.k.shape[:1] + (len(idx),) + self.k.shape[2:])  # (Ly, len(rows), Nc, Hd, D)
        new.v = self.v.new_empty(new.k.shape)
        torch.index_select(self.k[:, :, :n], 1, idx, out=new.k[:, :, :n])
        torch.index_select(self.v[:, :, :n], 1, idx, out=new.v[:, :, :n])
        new.frames = list(self.frames)  # evicting in the copy must not touch this cache's list
        new.cross = [None if c is None else tuple(x.index_select(0, idx) for x in c) for c in self.cross]
        return new

    def nbytes(self) -> int:
        """Memory held by the self-attention K/V buffers (bytes)."""
        return self.k.numel() * self.k.element_size() * 2  # K and V


def clean_context_frames(frames, nfpb):
    """Teacher forcing: the clean frames a training forward needs, [0, c) of the clip.

    Noisy block [a, b) reads the clean copies of the frames before a only, so the clean copy of
    the last block is read by no noisy query (and no clean block attends forward in time): the
    forward leaves it out. The outputs are the same; one block fewer goes through every layer
    (for a 2-block window, a quarter of the tokens). One block: c = 0, plain attention."""
    return (frames - 1) // nfpb * nfpb


def attention_plan(frames, tpf, nfpb, start_frame=0, local=-1, sink=0, history=(),
                   teacher_forcing=False):
    """Block-causal attention as a list of ((q_lo, q_hi), [(k_lo, k_hi), ...]) token ranges.

    The K/V sequence is [history frames ; this clip] (teacher forcing: [history ; clean frames
    [0, c) of the clip ; noisy clip], c = clean_context_frames). Query block [a, b) of the clip,
    ending at absolute frame e, sees
      plain:            every frame f with visible(f, e), its own block included
      teacher forcing:  clean blocks: as plain;  noisy block: clean/history frames f < start of
                        the block with visible(f, e), plus its own noisy block (not its clean copy)
    """
    c = clean_context_frames(frames, nfpb) if teacher_forcing else frames  # clip frames in the K/V
    ctx = list(history) + list(range(start_frame, start_frame + c))  # K/V frames, absolute
    plan = []
    for a in range(0, frames, nfpb):
        b = min(a + nfpb, frames)
        e = start_frame + b  # the query block ends (exclusive) at this absolute frame
        causal = [visible(f, e, sink, local) for f in ctx]  # the cache's window rule at e
        if not teacher_forcing:
            plan.append(((a * tpf, b * tpf), _runs(causal, tpf)))
            continue
        if a < c:  # a clean block (c is a whole number of blocks)
            plan.append(((a * tpf, b * tpf), _runs(causal + [False] * frames, tpf)))
        # noisy block (queries after the clean frames): history / clean frames before its start + itself
        noisy = [f < start_frame + a and v for f, v in zip(ctx, causal)] + [a <= i < b for i in range(frames)]
        plan.append((((c + a) * tpf, (c + b) * tpf), _runs(noisy, tpf)))
    return sorted(plan)  # query order: the clean blocks, then the noisy ones


def _runs(mask, tpf):
    """Contiguous True runs of a per-frame mask, as token ranges."""
    runs, lo = [], None
    for i, m in enumerate(list(mask) + [False]):  # the extra False closes a run at the end
        if m and lo is None:
            lo = i
        if not m and lo is not None:
            runs.append((lo * tpf, i * tpf))
            lo = None
    return runs
