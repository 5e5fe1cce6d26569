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

import train
from kvcache import KVCache
from lora import add_adapter, copy_adapter
from model import CausalWanModel, ModelConfig, randomize_head
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
    """Count live caches inside every micro-batch of the update (its history argument is one
    more, a stacked copy) and when the next step's rollout begins (none may be left over)."""
    seen = {"update": [], "rollout": []}
    nft_microbatch, rollout_histories = train.nft_microbatch, train.rollout_histories

    def counting_update(*a, **kw):
        extra = kw["history"] is not None  # the micro-batch's stacked copy of its histories
        seen["update"].append(live_caches()[0] - extra)
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
    assert seen["update"] == [expect] * 4  # 2 steps x 2 micro-batches
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
        losses[clip], _ = train.nft_microbatch(m, a, x0=x0, ctx=ctx, r=torch.tensor([0.2, 0.9]),
                                               kl_mask=torch.ones(2, dtype=torch.bool), step=0, j0=0, start=0,
                                               history=None, autocast=torch.autocast("cpu", enabled=False))
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
