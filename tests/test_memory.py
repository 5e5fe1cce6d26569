"""
The two levers for the real model sizes: per-block activation checkpointing (model.py) must not
change a number, and the analytic FLOP count behind bench.py's MFU must match torch's own count.

  checkpointed forward + backward   == plain, outputs and every gradient (window, history,
                                       teacher forcing), with far fewer saved activations
  the adapter is switched before backward (train.py leaves `use_adapter(model, "default")` first)
                                    == plain; an unpinned recompute crashes or silently differs
  memory.train_flops                == FlopCounterMode on the tiny model, forward and backward
  tools/bench.py gpu --device cpu --size tiny   reports the FLOPs torch counts for its update

Test:  python -m pytest tests/test_memory.py -q
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import CheckpointError
from torch.utils.flop_counter import FlopCounterMode

import bench
import lora
import memory
import model as model_py
from kvcache import KVCache
from model import CONFIGS, CausalWanModel, ModelConfig
from lora import adapter_params, add_adapter, set_adapter, use_adapter

CFG = ModelConfig(dim=48, ffn_dim=96, num_heads=2, num_layers=2, text_dim=16, text_len=8)
HW = (4, 6)  # latent H, W -> 2 x 3 = 6 tokens per frame


def make(cfg=CFG, seed=0):
    """Random base and adapter weights, all trainable; "old" differs from "default"."""
    torch.manual_seed(seed)
    m = CausalWanModel(cfg)
    add_adapter(m, "default", rank=4)
    add_adapter(m, "old", rank=4)
    for p in m.parameters():  # random everywhere (the init zeroes the head and every LoRA B)
        torch.nn.init.normal_(p, std=0.1)
    return m


def inputs(F, B=1, cfg=CFG, hw=HW, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, F, cfg.in_dim, *hw, generator=g)
    return x, torch.rand(B, F, generator=g) * 1000, torch.randn(B, 5, cfg.text_dim, generator=g)


def history_cache(m, ctx, frames, hw, local, sink, cfg=CFG):
    """A cache snapshot after `frames` clean frames (the detached history of a streaming window)."""
    g = torch.Generator().manual_seed(2)
    cache = KVCache.for_model(cfg, ctx.shape[0], frames, hw, sink, local)
    with torch.no_grad():
        for a in range(0, frames, 3):
            m.forward_cached(torch.randn(ctx.shape[0], 3, cfg.in_dim, *hw, generator=g), torch.zeros(ctx.shape[0], 3),
                             ctx, cache, a)
    return cache


def forward_backward(m, ckpt, backward_adapter=None, **kw):
    """x_theta under adapter "default", then backward under `backward_adapter` (as train.py: the
    `with use_adapter(model, ...)` block is left before backward). Returns (output, grads, saved
    activation elements outside checkpointed regions)."""
    m.grad_checkpointing = ckpt
    m.zero_grad(set_to_none=True)
    x, t, ctx = inputs(kw.pop("F", 6))
    if kw.pop("history", False):
        kw.update(history=history_cache(m, ctx, 6, HW, kw["local"], kw["sink"]), start_frame=6)
    if kw.pop("clean", False):
        kw["clean_x"] = inputs(x.shape[1], seed=3)[0]
    saved = [0]

    def pack(a):
        saved[0] += a.numel()
        return a
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda a: a):
        with use_adapter(m, "default"):
            y = m(x, t, ctx, **kw)
    with use_adapter(m, backward_adapter):
        y.pow(2).mean().backward()
    m.grad_checkpointing = False
    return y, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, saved[0]


@pytest.mark.parametrize("kw", [dict(), dict(F=12, local=9, sink=3),
                                dict(F=9, local=9, sink=3, history=True), dict(clean=True)],
                         ids=["global", "window", "history", "teacher-forcing"])
def test_checkpointing_changes_no_number(kw):
    """Same output and the same gradients of every parameter (base and LoRA): the recompute
    runs the same ops on the same inputs; and only a fraction of the activations is kept."""
    m = make()
    y0, g0, saved0 = forward_backward(m, False, **dict(kw))
    y1, g1, saved1 = forward_backward(m, True, **dict(kw))
    assert torch.equal(y0, y1)
    assert g0.keys() == g1.keys()
    assert len(g0) == sum(".lora.old." not in n for n, _ in m.named_parameters())
    assert all(torch.allclose(g0[n], g1[n], rtol=1e-6, atol=1e-7) for n in g0), \
        max((g0[n] - g1[n]).abs().max().item() for n in g0)
    assert any(g1[n].abs().sum() > 0 for n in g1 if ".lora.default." in n)
    assert saved1 < saved0 / 4, (saved1, saved0)  # the blocks' activations are not kept


@pytest.mark.parametrize("backward_adapter", [None, "old"])
@pytest.mark.parametrize("trained", ["lora", "all"])
def test_recompute_uses_the_forward_adapter(backward_adapter, trained, monkeypatch):
    """train.py computes x_theta inside `use_adapter(model, "default")` and calls backward after
    leaving it. The recompute must still use "default": model._run_block pins it. An unpinned
    recompute runs under the adapter active at backward: under none, or under a frozen "old",
    it saves other tensors and checkpoint raises; under an "old" whose weights also require grad
    (trained="all") it runs and gives silently wrong gradients. This test sees every case."""
    m = make()
    if trained == "lora":  # train.py: a frozen base, only the "default" adapter is trained
        m.requires_grad_(False)
        for p in adapter_params(m, "default"):
            p.requires_grad_(True)
    _, g0, _ = forward_backward(m, False, backward_adapter)
    _, g1, _ = forward_backward(m, True, backward_adapter)
    assert trained == "all" or len(g0) == 2 * 10 * CFG.num_layers
    assert all(torch.allclose(g0[n], g1[n], rtol=1e-6, atol=1e-7) for n in g0)
    # the same test without the pin fails: it would catch a regression
    monkeypatch.setattr(model_py, "_run_block", lambda block, adapter, *a: block(*a))
    if trained == "all" and backward_adapter == "old":
        _, g2, _ = forward_backward(m, True, backward_adapter)
        assert max((g0[n] - g2[n]).abs().max().item() for n in g0) > 1e-3
    else:
        with pytest.raises(CheckpointError):
            forward_backward(m, True, backward_adapter)


def test_checkpointing_only_in_training_forward(monkeypatch):
    """No checkpoint without grad, nor on the cache path (inference), even with grad on."""
    calls = []
    real = model_py.checkpoint
    monkeypatch.setattr(model_py, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = make()
    m.grad_checkpointing = True
    x, t, ctx = inputs(6)
    with torch.no_grad():
        m(x, t, ctx)
    cache = KVCache.for_model(CFG, 1, 6, HW)
    m.forward_cached(x[:, :3], t[:, :3], ctx, cache, 0)
    assert calls == []
    m(x, t, ctx)
    assert len(calls) == CFG.num_layers


# ----------------------------------------------------------------------------------------------
# FLOPs. FlopCounterMode counts matmul-like aten ops only: mm, addmm, bmm, baddbmm, convolution
# (+ their backward ops) and the fused SDPA kernels (flash / efficient / cuDNN); elementwise ops,
# norms and softmax are not counted. CPU's fused SDPA kernel is not in its table, so attention runs
# on the math backend here, where q k^T and p v are bmm's and get counted.

@pytest.mark.parametrize("lora,base_grad,kw", [
    (8, False, dict()),                                  # the NFT update: frozen base, LoRA
    (8, False, dict(F=12, local=9, sink=3)),             # window mask
    (8, False, dict(F=6, local=9, sink=3, history=True)),  # streaming window over a history
    (8, False, dict(clean=True)),                        # teacher forcing
    (0, True, dict()),                                   # full fine-tuning, no LoRA
    (8, True, dict()),
    (8, False, dict(autocast=True)),  # bf16 autocast (the GPU path)
])
def test_train_flops_match_flop_counter(lora, base_grad, kw):
    cfg, hw, B, F = CONFIGS["tiny"], (16, 16), 2, kw.get("F", 6)
    torch.manual_seed(0)
    m = CausalWanModel(cfg)
    m.requires_grad_(base_grad)
    if lora:
        add_adapter(m, "default", rank=lora)
        set_adapter(m, "default")
        for p in adapter_params(m, "default"):
            p.requires_grad_(True)
    x, t, ctx = inputs(F, B, cfg, hw)
    args = dict(local=kw.get("local", -1), sink=kw.get("sink", 0))
    if kw.get("history"):
        h = history_cache(m, ctx, 6, hw, args["local"], args["sink"], cfg)
        args.update(history=h, start_frame=6)
    clean = torch.randn_like(x) if kw.get("clean") else None
    autocast = kw.get("autocast", False)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fc, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(x, t, ctx, clean_x=clean, **args)
        fwd = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            y.float().pow(2).mean().backward()
        bwd = fc.get_total_flops()
    if "history" in args:
        args["history"] = args["history"].frames
    ef, eb = memory.train_flops(cfg, F, hw, B, lora, base_grad, teacher_forcing=clean is not None, **args)
    # exact at torch 2.14; a few % of slack for a torch that counts some op differently
    assert abs(fwd / ef - 1) < 0.02 and abs(bwd / eb - 1) < 0.02, (fwd, ef, bwd, eb)


def test_gpu_bench_on_cpu_counts_what_torch_counts(monkeypatch):
    """`tools/bench.py gpu --device cpu --size tiny`, the GPU bench's code path small and on a CPU:
    the update's FLOPs it reports (3 forwards + 1 backward, from memory.train_flops) are those torch
    counts when the same update runs, and its rates follow from its own timings."""
    a = bench.Args(what="gpu", device="cpu", size="tiny", frames=6, lora_rank=8)
    out = bench.gpu_bench(a)
    assert out["latent_fps"] == pytest.approx(a.frames / out["rollout_s"])
    for key in ("ckpt", "no_ckpt"):
        assert out[key]["mfu"] == pytest.approx(out["update_tflop"] / out[key]["seconds"] / a.peak_tflops)
    # the same update under torch's FLOP counter; the LoRA as three matmuls, as on a GPU (bf16), not
    # lora.py's float32 no-grad merge; attention on SDPA's math backend, whose matmuls are counted
    monkeypatch.setattr(lora, "merge_applies", lambda layer, x: False)
    torch.manual_seed(0)
    m = bench.random_model(bench.SIZES["tiny"], "cpu", torch.float32)
    ctx = torch.randn(1, m.cfg.text_len, m.cfg.text_dim)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        bench.update_step(m, "nft", a.frames, bench.GPU_HW["tiny"], ctx, "cpu", rank=a.lora_rank, B=a.batch, ref="ref")
    assert fc.get_total_flops() == pytest.approx(out["update_tflop"] * 1e12, rel=0.02)
