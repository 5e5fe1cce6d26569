"""
What the real sizes would pay for: no KV cache lives longer than the step that needs it, the
`ref` adapter exists only in selective mode, --adv-clip reaches the loss, and bf16 runs on a CPU.

Run:  python -m pytest tests/test_scale.py -q
"""
import dataclasses
import gc

import pytest
import torch
from safetensors.torch import load_file, save_file

import memory
import train
from kvcache import KVCache, attention_plan, clean_context_frames
from lora import adapter_params, add_adapter, copy_adapter, use_adapter
from model import CONFIGS, CausalWanModel, ModelConfig, randomize_head
from test_train import SMALL, rows, run


def live_caches():
    """KV caches alive right now, and their bytes (what a GPU would hold for them)."""
    gc.collect()
    caches = [o for o in gc.get_objects() if type(o) is KVCache]  # type(): no proxy objects
    return len(caches), sum(c.nbytes() for c in caches)


@pytest.mark.parametrize("frames,window,mode,expect", [
    ("6", "6", "shared-prefix", 0),   # s = 0: no history, no cache during the update
    ("6", "3", "shared-prefix", 2),   # s = 3: one history per prompt (2 prompts) ...
    ("6", "3", "independent", 4),     # ... or per sample (4)
])
def test_no_idle_caches(tmp_path, monkeypatch, frames, window, mode, expect):
    """The bytes of the live caches inside every micro-batch of the update (less its history
    argument, a stacked copy) are `expect` histories' worth; none is left over when the next
    step's rollout begins."""
    seen = {"update": [], "rollout": []}
    nft_microbatch, rollout_histories = train.nft_microbatch, train.rollout_histories

    def counting_update(*a, **kw):
        extra = 0 if kw["history"] is None else kw["history"].nbytes()  # the micro-batch's copy
        seen["update"].append(live_caches()[1] - extra)
        return nft_microbatch(*a, **kw)

    def counting_rollout(*a, **kw):
        seen["rollout"].append(live_caches()[0])
        return rollout_histories(*a, **kw)
    monkeypatch.setattr(train, "nft_microbatch", counting_update)
    monkeypatch.setattr(train, "rollout_histories", counting_rollout)
    args = train.parse_args(SMALL + ["--steps", "2", "--eval-every", "0", "--num-frames", frames, "--window",
                                     window, "--window-select", "last", "--group-mode", mode,
                                     "--out-dir", str(tmp_path)])
    train.main(args)
    # one video's history: a global cache of 6 frames, 16 tokens each, every layer, K and V
    cfg = CONFIGS["tiny"]
    one = 2 * cfg.num_layers * 6 * 16 * cfg.dim * 4
    assert seen["update"] == [expect * one] * 4  # 2 steps x 2 micro-batches
    assert seen["rollout"] == [0, 0]


def test_ref_adapter_only_with_selective_and_old_checkpoints_resume(tmp_path):
    plain, sel = tmp_path / "plain", tmp_path / "sel"
    run(["--steps", "1", "--eval-every", "0"], plain)
    run(["--steps", "1", "--eval-every", "0", "--selective", "--rewards", "colorfulness=1", "sharpness=1"], sel)
    names = {p: {k.split("/")[0] for k in load_file(p / "ckpt_000001" / "adapters.safetensors")}
             for p in (plain, sel)}
    assert names[plain] == {"default", "old", "ema"} and names[sel] == {"default", "old", "ref", "ema"}
    # a checkpoint written before `ref` was optional (it always held one) still resumes
    old = tmp_path / "old"
    run(["--steps", "1", "--eval-every", "0", "--ckpt-every", "1"], old)
    f = old / "ckpt_000001" / "adapters.safetensors"
    ad = load_file(f)
    ad.update({k.replace("default/", "ref/"): v.clone() for k, v in ad.items() if k.startswith("default/")})
    save_file(ad, f)
    run(["--steps", "2", "--eval-every", "0", "--resume", "latest"], old)
    assert [r["step"] for r in rows(old)] == [1, 2]


def test_adv_clip_reaches_the_adaptive_loss():
    """With --adaptive-weight the loss is scaled by A_max / beta: A_max must be --adv-clip."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=3, out_dim=3, text_dim=16, text_len=8)
    m = CausalWanModel(cfg)
    randomize_head(m)
    args = train.Args(height=8, width=8, num_frames=3, window=0, adaptive_weight=True, micro_batch=2)
    add_adapter(m, "default", 2)
    copy_adapter(m, "default", "old")
    x0 = torch.randn(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(2))
    losses = {}
    for clip in (2.0, 5.0):
        a = dataclasses.replace(args, adv_clip=clip)
        losses[clip], *_ = train.nft_microbatch(m, a, x0=x0, ctx=ctx, r=torch.tensor([0.2, 0.9]),
                                                  kl_mask=torch.ones(2, dtype=torch.bool), history=None, step=0,
                                                  first_sample=0, start=0, autocast=torch.autocast("cpu", enabled=False))
    assert losses[2.0].item() == pytest.approx(losses[5.0].item() * 2 / 5, rel=1e-5)


def test_bf16_on_cpu(tmp_path):
    """--bf16 on: a bf16 base with autocast on the CPU; two steps, finite, and the first step's loss
    within 20% of float32 (its rollout is in bf16 too, so the videos differ a little)."""
    loss = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        r = run(["--steps", "2", "--eval-every", "0", "--num-frames", "6", "--window", "3", "--bf16", mode], out)
        assert f"bf16 {mode == 'on'}" in r.stdout and ("bfloat16" in r.stdout) == (mode == "on")
        rs = rows(out)
        assert len(rs) == 2 and all(torch.isfinite(torch.tensor([x["loss"], x["grad_norm"]])).all() for x in rs)
        loss[mode] = rs[0]["loss"]
    assert loss["on"] == pytest.approx(loss["off"], rel=0.2)


# ---- the memory model (memory.py)

def saved_bytes(m, x, t, ctx, clean, autocast, **kw):
    """Bytes autograd keeps for backward in one LoRA forward (parameters excluded)."""
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), use_adapter(m, "default"):
            m(x, t, ctx, clean_x=clean, **kw)
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    return sum(v for k, v in seen.items() if k not in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context", ["noisy", "clean", "history"])
def test_saved_activations_match_autograd(dtype, context):
    """memory.saved_activations (counted op by op) against torch's own saved-tensor hooks, at a
    Wan-like shape (Df = 4 D, r = D / 8); history: a window after a rolling cache (sink 3 +
    window 6), whose attention reads the sink and the window as two runs."""
    cfg = ModelConfig(dim=192, ffn_dim=768, num_heads=3, num_layers=2, in_dim=16, out_dim=16, text_dim=64,
                      text_len=32)
    torch.manual_seed(0)
    m = CausalWanModel(cfg).to(dtype).requires_grad_(False)
    add_adapter(m, "default", 24)
    for p in adapter_params(m, "default"):
        p.requires_grad_(True)
    F, hw, P = 6, (8, 16), 4 * 8
    x = torch.randn(1, F, 16, *hw, dtype=dtype)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, dtype=dtype)
    kw, past = {}, []
    if context == "history":  # 6 frames generated before the window into a rolling cache
        cache = KVCache.for_model(cfg, 1, 12, hw, sink=3, local=6, dtype=dtype)
        with torch.no_grad():
            for a in (0, 3):
                m.forward_cached(x[:, :3], torch.zeros(1, 3), ctx, cache, a)
        kw, past = dict(history=cache, start_frame=6), list(cache.frames)
        x = x[:, :3]
    clean = x.clone() if context == "clean" else None
    T = x.shape[1]
    got = saved_bytes(m, x, torch.full((1, T), 500.0), ctx, clean, dtype == torch.bfloat16, **kw)
    start = 6 if past else 0
    plan = attention_plan(T, P, cfg.frames_per_block, start, 6 if past else -1, 3 if past else 0, past,
                          clean is not None)
    # teacher forcing: [clean frames some noisy block reads ; noisy frames]
    nc = clean_context_frames(T, cfg.frames_per_block) if clean is not None else 0
    tokens = (nc + T) * P
    q_last = nc * P  # the last block computes only the noisy frames
    layers = [(tokens, tokens, memory.kept_keys(plan, 0, tokens, len(past) * P)),
              (tokens, tokens - q_last, memory.kept_keys(plan, q_last, tokens, len(past) * P))]
    want = memory.saved_activations(cfg, 24, dtype, layers, cfg.text_len)
    assert want == pytest.approx(got, rel=0.06)  # measured: within 1% (5% float32 with a history)


def test_predict_terms_follow_the_flags():
    cfg = CONFIGS["wan-1.3b"]
    a = train.PRESETS["self-forcing"]
    base = memory.predict(a, cfg)
    sel = memory.predict(dataclasses.replace(a, selective=True), cfg)
    n_base, n_lora = memory.parameter_counts(cfg, a.lora_rank)
    assert base["weights"] == n_base * 4 and sel["adapters"] - base["adapters"] == n_lora * 4  # + ref
    assert memory.predict(a, cfg, bf16=True)["weights"] == n_base * 2
    no_ckpt = memory.predict(dataclasses.replace(a, grad_checkpointing=False), cfg)
    assert no_ckpt["update"] > 3 * base["update"]  # checkpointing keeps one block's activations
    streaming = dataclasses.replace(a, num_frames=42, window=21, local_attn=12, sink=3)
    s0, s21 = memory.predict(streaming, cfg, start=0), memory.predict(streaming, cfg, start=21)
    assert s21["rollout"] > s0["rollout"] and s0["histories"] == 0  # histories only for s > 0
    # one KV cache of the rolling window: 30 layers x 12 frames x 1560 tokens x 1536 x K, V x 4 bytes
    cache = 2 * 30 * (12 * 1560 + 512) * 1536 * 4
    assert s21["histories"] == a.prompts_per_step * cache  # one per prompt (shared-prefix)


def test_train_prints_the_prediction(tmp_path):
    r = run(["--steps", "1", "--eval-every", "0"], tmp_path / "run")
    assert "memory model: predicted peak" in r.stdout and "memory levers" in r.stdout
    assert rows(tmp_path / "run")[0]["mem/total_mb"] > 0
