"""
Multi-adapter LoRA on a tiny model: switching, copying, EMA lerp, merge equivalence, gradients
and the PEFT key layout (docs/wan_architecture.md#checkpoint-files).

Test:  python -m pytest tests/test_lora.py -q
"""
import copy
import re

import torch

import lora
from model import CausalWanModel, ModelConfig
from lora import adapter_params, adapter_state_dict, add_adapter, copy_adapter, lerp_adapter, load_adapter_state, set_adapter, use_adapter, lora_layers

CFG = ModelConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4,
                  text_dim=16, text_len=8)


def randomize(params, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny(seed=0):
    """Random base weights (the default init zeroes the head, which would make every output 0)."""
    torch.manual_seed(seed)
    m = CausalWanModel(CFG).eval()
    randomize(m.parameters(), seed)
    return m


def run(m, grad=False):
    g = torch.Generator().manual_seed(1)
    F = 2 * CFG.frames_per_block
    x, t = torch.randn(2, F, CFG.in_dim, 4, 4, generator=g), torch.rand(2, F, generator=g) * 1000
    ctx = torch.randn(2, 5, CFG.text_dim, generator=g)
    with torch.set_grad_enabled(grad):
        return m(x, t, ctx)


def test_new_adapter_is_identity_and_none_is_base():
    m = tiny()
    base = run(m)
    add_adapter(m, "a", rank=4, alpha=4)
    set_adapter(m, "a")
    assert all(torch.count_nonzero(p) > 0 for p in adapter_params(m, "a")[::2])  # A is random
    assert torch.equal(run(m), base)  # ... but B = 0
    randomize(adapter_params(m, "a"), 2)
    set_adapter(m, None)
    assert torch.equal(run(m), base)


def test_switching():
    m = tiny()
    base = run(m)
    add_adapter(m, "a", rank=4, alpha=4)
    randomize(adapter_params(m, "a"), 2)
    set_adapter(m, "a")
    out_a = run(m)
    assert (out_a - base).abs().max() > 1e-3
    with use_adapter(m, None):
        assert torch.equal(run(m), base)
    assert torch.equal(run(m), out_a)  # the context manager restores the previous adapter


def test_copy_adapter():
    m = tiny()
    add_adapter(m, "a", rank=4, alpha=8)
    randomize(adapter_params(m, "a"), 2)
    copy_adapter(m, "a", "b")  # creates b with a's rank and scale
    with use_adapter(m, "a"):
        out_a = run(m)
    with use_adapter(m, "b"):
        assert torch.equal(run(m), out_a)
    randomize(adapter_params(m, "a"), 3)  # a real copy, not shared storage
    with use_adapter(m, "b"):
        assert torch.equal(run(m), out_a)


def test_lerp_adapter():
    m = tiny()
    add_adapter(m, "dst", rank=4, alpha=4)
    add_adapter(m, "src", rank=4, alpha=4)
    randomize(adapter_params(m, "dst"), 2)
    randomize(adapter_params(m, "src"), 3)
    dst0 = [p.clone() for p in adapter_params(m, "dst")]
    src0 = [p.clone() for p in adapter_params(m, "src")]
    lerp_adapter(m, "dst", "src", 0.9)
    for d, d0, s, s0 in zip(adapter_params(m, "dst"), dst0, adapter_params(m, "src"), src0, strict=True):
        torch.testing.assert_close(d, 0.9 * d0 + 0.1 * s0, rtol=0, atol=1e-6)
        assert torch.equal(s, s0)  # the source is untouched
    assert not torch.equal(adapter_params(m, "dst")[0], dst0[0])


def test_matches_merged_weights():
    """y = W x + b + (alpha/r) B A x  ==  (W + (alpha/r) B @ A) x + b."""
    m = tiny()
    add_adapter(m, "a", rank=4, alpha=12)  # scale 3, so a missing scale would show
    randomize(adapter_params(m, "a"), 2, std=0.1)
    set_adapter(m, "a")
    merged = tiny()
    with torch.no_grad():
        for (n, lin), (n2, lin2) in zip(lora_layers(m), lora_layers(merged), strict=True):
            assert n == n2
            ad = lin.lora["a"]
            lin2.weight.copy_(lin.weight + 3.0 * ad.B @ ad.A)
    torch.testing.assert_close(run(m), run(merged), rtol=1e-4, atol=1e-5)
    with use_adapter(m, None):
        assert (run(m) - run(merged)).abs().max() > 1e-3


def test_merged_forward_without_grad_equals_the_plain_path():
    """lora.py's fenced speed path (no gradient, float32: W + s B A merged first) against the plain
    W x + b + s B (A x) the same layers run with a gradient; and where each applies."""
    m = tiny()
    add_adapter(m, "a", rank=4, alpha=12)  # scale 3, so a missing scale would show
    randomize(adapter_params(m, "a"), 2, std=0.1)
    set_adapter(m, "a")
    layer, x = lora_layers(m)[0][1], torch.randn(3, CFG.dim)
    with torch.no_grad():
        assert lora.merge_applies(layer, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not lora.merge_applies(layer, x)  # bf16 would round s B A away
    assert not lora.merge_applies(layer, x)  # with a gradient: the plain path, what memory.py counts
    fast, plain = run(m), run(m, grad=True).detach()
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    with use_adapter(m, None):
        assert (run(m) - fast).abs().max() > 1e-3  # the adapter does change the output


def test_grads_only_reach_active_adapter():
    m = tiny()
    m.requires_grad_(False)  # frozen base, as in training
    add_adapter(m, "policy", rank=4, alpha=4)
    add_adapter(m, "old", rank=4, alpha=4)
    randomize(adapter_params(m, "policy"), 2)  # B != 0, so A gets a gradient too
    set_adapter(m, "policy")
    run(m, grad=True).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_params(m, "policy"))
    assert all(p.grad is None for p in adapter_params(m, "old"))
    assert all(p.grad is None for n, p in m.named_parameters() if ".lora." not in n)


def test_peft_key_layout():
    m = tiny()
    add_adapter(m, "a", rank=4, alpha=4)
    sd = adapter_state_dict(m, "a")
    pat = re.compile(r"base_model\.model\.blocks\.(\d+)\.((?:self_attn|cross_attn)\.[qkvo]|ffn\.[02])"
                     r"\.lora_([AB])\.weight")
    assert len(sd) == 2 * 10 * CFG.num_layers
    assert all(pat.fullmatch(k) for k in sd)
    layers = {(int(pat.fullmatch(k)[1]), pat.fullmatch(k)[2]) for k in sd}
    assert len(layers) == 10 * CFG.num_layers
    assert sd["base_model.model.blocks.1.ffn.0.lora_A.weight"].shape == (4, CFG.dim)  # A (r, in)
    assert sd["base_model.model.blocks.1.ffn.0.lora_B.weight"].shape == (CFG.ffn_dim, 4)  # B (out, r)
    assert sd["base_model.model.blocks.0.cross_attn.o.lora_B.weight"].shape == (CFG.dim, 4)
    # loading the dict back into a fresh model reproduces the adapter
    randomize(adapter_params(m, "a"), 2)
    set_adapter(m, "a")
    m2 = copy.deepcopy(m)
    load_adapter_state(m2, "b", adapter_state_dict(m, "a"), alpha=4)
    set_adapter(m2, "b")
    assert torch.equal(run(m2), run(m))
