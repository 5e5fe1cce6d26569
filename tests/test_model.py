"""
The model's two forwards agree with each other (llm.c style), and the block plan agrees with
a brute-force mask written straight from the rules (docs/wan_architecture.md#attention-masks,
#kv-cache).

  cached block-by-block (noisy K/V)       == block-causal training forward
  rolling cache with sink (any sink size) == training forward with the same window rule
  cached, clean K/V of earlier blocks     == teacher-forcing forward
  cache snapshot + window                 == the window inside a longer forward (streaming)

Run:  python -m pytest tests/test_model.py -q
"""

import pytest
import torch

from kvcache import KVCache, attention_plan, clean_context_frames
import model as model_module
from model import CONFIGS, CausalWanModel, ModelConfig
from lora import adapter_params, add_adapter, set_adapter

CFG = ModelConfig(dim=48, ffn_dim=96, num_heads=2, num_layers=2, text_dim=16, text_len=8)
HW = (4, 6)  # latent H, W -> 2 x 3 = 6 tokens per frame
TOL = 2e-5


def close(a, b):
    """max |a - b| relative to the scale of b (float32 re-orderings only)."""
    return (a - b).abs().max() <= TOL * max(1.0, b.abs().max().item())


def make(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    m = CausalWanModel(cfg).eval()
    for p in m.parameters():  # random weights everywhere (the default init zeros the head)
        torch.nn.init.normal_(p, std=0.1)
    return m


def inputs(B, F, seed=1, cfg=CFG):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, F, cfg.in_dim, *HW, generator=g)
    n = cfg.frames_per_block
    t = (torch.rand(B, (F + n - 1) // n, generator=g) * 1000).repeat_interleave(n, 1)[:, :F]
    ctx = torch.randn(B, 5, cfg.text_dim, generator=g)
    return x, t.contiguous(), ctx


def blocks(F, n):
    return [(a, min(a + n, F)) for a in range(0, F, n)]


def brute_mask(F, tpf, n, local, sink, teacher_forcing):
    """Dense mask from the token-level formulas (docs/wan_architecture.md) (the slow, obviously-correct path)."""
    L = F * tpf
    end = lambda q: (q // (n * tpf) + 1) * n * tpf if q // (n * tpf) + 1 <= (F + n - 1) // n else L  # noqa: E731
    end = lambda q, end=end: min(end(q), L)  # noqa: E731
    S, W = sink * tpf, local * tpf

    def vis(q, k):  # k < end(q) and (k < S or k >= end(q) - (W - S)) for a window
        return k < end(q) and (local < 0 or k < min(S, end(q)) or k >= max(S, end(q) - (W - S)))
    if not teacher_forcing:
        return torch.tensor([[vis(q, k) for k in range(L)] for q in range(L)])
    m = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(L):
        start_q = q // (n * tpf) * n * tpf
        for k in range(L):
            m[q, k] = vis(q, k)  # clean half: block-causal
            m[L + q, k] = k < start_q and vis(q, k)  # noisy -> clean blocks before its own
            m[L + q, L + k] = start_q <= k < end(q)  # noisy -> its own noisy block
    return m


def without_unread_clean(mask, F, tpf, n):
    """A dense [clean ; noisy] teacher-forcing mask (2 F tpf square) as attention_plan lays it
    out: after checking that no query but their own reads the clean frames [c, F), it drops them
    (c = clean_context_frames). Also used on the reference's mask (tests/test_parity.py)."""
    c, L = clean_context_frames(F, n) * tpf, F * tpf
    assert not mask[:c, c:L].any() and not mask[L:, c:L].any()  # no earlier clean query, no noisy one
    keep = torch.cat([torch.arange(c), torch.arange(L, 2 * L)])
    return mask[keep][:, keep]


@pytest.mark.parametrize("F,n,local,sink", [(9, 3, -1, 0), (10, 3, 6, 0), (12, 3, 9, 3), (12, 3, 8, 2),
                                            (12, 3, 10, 4), (7, 2, 5, 1), (6, 1, 3, 1)])
@pytest.mark.parametrize("tf", [False, True])
def test_plan_equals_brute_force_mask(F, n, local, sink, tf):
    tpf = 2
    plan = attention_plan(F, tpf, n, local=local, sink=sink, teacher_forcing=tf)
    want = brute_mask(F, tpf, n, local, sink, tf)
    if tf:  # the plan leaves out the clean frames nothing reads
        want = without_unread_clean(want, F, tpf, n)
    L = want.shape[0]
    m = torch.zeros(L, L, dtype=torch.bool)
    covered = torch.zeros(L, dtype=torch.int)
    for (qlo, qhi), runs in plan:
        covered[qlo:qhi] += 1
        for lo, hi in runs:
            m[qlo:qhi, lo:hi] = True
    assert torch.all(covered == 1), "every query token in exactly one block"
    assert torch.equal(m, want)


@pytest.mark.parametrize("local,sink", [(-1, 0), (6, 0), (9, 3), (8, 2), (10, 4)])
def test_cached_blocks_equal_training_forward(local, sink):
    """Block k through the cache (earlier blocks' K/V written at their own noisy t) equals the
    block-causal training forward with the same window rule, eviction included. The sink = 4 >
    block = 3 case is where the reference attends zero slots; we must not."""
    m = make()
    B, F = 2, 15
    x, t, ctx = inputs(B, F)
    with torch.no_grad():
        full = m(x, t, ctx, local=local, sink=sink)
        cache = KVCache.for_model(CFG, B, F, HW, sink=sink, local=local)
        for a, b in blocks(F, 3):
            out = m.forward_cached(x[:, a:b], t[:, a:b], ctx, cache, a)
            assert close(out, full[:, a:b]), (a, local, sink)
        assert len(cache.frames) == (F if local < 0 else local)


def test_teacher_forcing_equals_clean_cache():
    """Noisy block k with the clean K/V of blocks < k in the cache (what the sampler does)
    equals the teacher-forcing forward on [clean ; noisy]."""
    m = make()
    B, F = 2, 9
    x, t, ctx = inputs(B, F)
    clean = torch.randn_like(x)
    with torch.no_grad():
        tf = m(x, t, ctx, clean_x=clean)
        cache = KVCache.for_model(CFG, B, F, HW)
        for a, b in blocks(F, 3):
            out = m.forward_cached(x[:, a:b], t[:, a:b], ctx, cache, a)
            assert close(out, tf[:, a:b])
            m.forward_cached(clean[:, a:b], torch.zeros(B, b - a), ctx, cache, a)  # clean K/V


@pytest.mark.parametrize("local,sink", [(-1, 0), (9, 3)])
def test_window_over_snapshot_equals_longer_forward(local, sink):
    """Streaming: a window forward attending to a cache snapshot (history) equals the same
    frames inside the cached rollout of the whole sequence, noisy and clean context alike."""
    m = make()
    B, F, s = 1, 18, 9  # window = frames [9, 18), history = what the cache holds at frame 9
    x, t, ctx = inputs(B, F)
    clean = torch.randn_like(x)
    with torch.no_grad():
        cache = KVCache.for_model(CFG, B, F, HW, sink=sink, local=local)
        for a, b in blocks(s, 3):  # the prefix, clean
            m.forward_cached(clean[:, a:b], torch.zeros(B, b - a), ctx, cache, a)
        hist = cache.select([0])  # a copy: the history the window attends to
        noisy_ref, clean_ref = [], []
        c1, c2 = cache.select([0]), cache.select([0])
        for a, b in blocks(F, 3)[s // 3:]:
            noisy_ref.append(m.forward_cached(x[:, a:b], t[:, a:b], ctx, c1, a))  # noisy K/V kept
            clean_ref.append(m.forward_cached(x[:, a:b], t[:, a:b], ctx, c2, a))
            m.forward_cached(clean[:, a:b], torch.zeros(B, b - a), ctx, c2, a)  # clean K/V
        noisy = m(x[:, s:], t[:, s:], ctx, start_frame=s, history=hist)
        cln = m(x[:, s:], t[:, s:], ctx, start_frame=s, history=hist, clean_x=clean[:, s:])
    assert close(noisy, torch.cat(noisy_ref, 1))
    assert close(cln, torch.cat(clean_ref, 1))
    # ... and equals the window part of ONE block-causal forward over the whole video
    # [clean prefix at t = 0 ; noisy window] under the same window rule
    with torch.no_grad():
        whole = m(torch.cat([clean[:, :s], x[:, s:]], 1), torch.cat([torch.zeros(B, s), t[:, s:]], 1), ctx,
                  local=local, sink=sink)
    assert close(noisy, whole[:, s:])
    # the two context modes agree on the first window block (same history, no earlier window
    # block) and differ after it (noisy vs clean earlier blocks)
    assert close(noisy[:, :3], cln[:, :3])
    assert (noisy[:, 3:] - cln[:, 3:]).abs().max() > 1e-3
    assert hist.frames == (list(range(9)) if local < 0 else [0, 1, 2, 3, 4, 5, 6, 7, 8])


def test_training_forward_backward_and_lora_grads():
    """Gradients reach the active adapter (and only it) through the block loop."""
    m = make()
    add_adapter(m, "default", rank=4)
    add_adapter(m, "old", rank=4)
    m.requires_grad_(False)
    for p in adapter_params(m, "default"):
        p.requires_grad_(True)
    set_adapter(m, "default")
    x, t, ctx = inputs(2, 6)
    m(x, t, ctx).pow(2).mean().backward()
    assert all(p.grad is not None for p in adapter_params(m, "default"))
    assert any(p.grad.abs().sum() > 0 for p in adapter_params(m, "default"))
    assert all(p.grad is None for p in adapter_params(m, "old"))


def test_clear_errors():
    m = make()
    x, t, ctx = inputs(1, 3)
    with pytest.raises(ValueError, match="text_len"):
        m(x, t, torch.randn(1, CFG.text_len + 1, CFG.text_dim))
    with pytest.raises(ValueError, match="local >= sink"):
        KVCache.for_model(CFG, 1, 9, HW, sink=3, local=5)


def test_modulation_init_is_wans_and_skipped_on_meta():
    """The modulations are drawn as Wan draws them (randn / sqrt(Dm), same generator calls, so a
    seeded random model is unchanged); on the meta device nothing is drawn."""
    torch.manual_seed(0)
    p = torch.empty(1, 6, 128)
    model_module._draw_modulation(p)
    torch.manual_seed(0)
    assert torch.equal(p, torch.randn(1, 6, 128) / 128 ** 0.5)
    with torch.device("meta"):
        m = CausalWanModel(CONFIGS["tiny"])
    assert all(q.is_meta for q in m.parameters())


def test_rms_norm_equals_torchs_and_has_finite_grads_at_zero():
    """RMSNorm against torch's own F.rms_norm, and its gradient (a row of zeros included: the
    norm's derivative there is 0/0 unless handled) against autograd through torch's."""
    norm = model_module.RMSNorm(CFG.dim, 1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(4, 5, CFG.dim)
    x[0, 0] = 0.0
    x.requires_grad_(True)
    y = norm(x)
    want = torch.nn.functional.rms_norm(x, (CFG.dim,), norm.weight, 1e-6)
    assert close(y, want)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gw,) = torch.autograd.grad(want, x, g)
    assert torch.isfinite(gx).all() and close(gx, gw)
