"""
Every behaviour of the released trainer we differ from is a flag: each flag changes what it
names, and --exact-reference turns all of them on at once (README, "Differences").

Run:  python -m pytest tests/test_fidelity.py -q
"""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import checks
import nft_loss as nft
import reward_models
import rewards
import streaming
import train
from model import CausalWanModel, ModelConfig
from test_train import rows, run, strip_times

CFG = ModelConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=3, out_dim=3, text_dim=16, text_len=8)


def test_exact_reference_sets_every_released_behaviour():
    default, exact = train.Args(), checks.released_behaviour(train.Args(), train.RELEASED)
    released = train.RELEASED["released"]
    group = [f.name for f in dataclasses.fields(train.Released)]
    assert exact.released == released
    # every --released.* flag's default is ours, not the release's (ema_start: the release's already)
    ours = [name for name in group if getattr(default.released, name) != getattr(released, name)]
    assert set(group) - set(ours) == {"ema_start"}
    # outside the group --exact-reference changes the window context and the advantage std, and
    # pins the objective's options the release has (our defaults already)
    changed = {k for k, v in checks.flat_args(exact).items() if v != checks.flat_args(default)[k]}
    assert changed == {f"released.{name}" for name in ours} | {"window_context", "global_std"}
    assert set(train.RELEASED) - {"released"} == {"window_context", "global_std", "reward_norm",
                                                  "adaptive_weight", "old_decay"}


# every released behaviour spelled out flag by flag: what --exact-reference must amount to
SPELLED_OUT = ["--released.train-mask", "frame", "--released.no-train-sink", "--released.train-timesteps", "raw",
               "--released.uncertainty-sign", "released", "--released.aux-rewards", "2", "--released.rank-ties",
               "ordinal", "--released.ref-thres-cap", "0.05", "--released.ema-start", "sync",
               "--released.prompt-draw", "released", "--released.reward-frames", "0", "--window-context", "noisy",
               "--global-std", "--reward-norm", "none", "--no-adaptive-weight", "--old-decay", "linear"]


def test_exact_reference_run_is_every_released_flag(tmp_path):
    """A run with --exact-reference (selective mode: sign, auxiliaries, ties, threshold cap) is the
    run with every released flag given by hand, step for step, and not the default run: the
    released behaviours happened (each flag's own effect is tested below)."""
    common = ["--steps", "2", "--eval-every", "0", "--ckpt-every", "0", "--selective", "--num-frames", "6",
              "--rewards", "colorfulness=1", "sharpness=1", "flicker=1"]
    out, stdout = {}, {}
    for name, flags in [("exact", ["--exact-reference"]), ("spelled", SPELLED_OUT), ("default", [])]:
        stdout[name] = run(common + flags, tmp_path / name).stdout
        out[name] = [strip_times(row) for row in rows(tmp_path / name)]
        assert len(out[name]) == 2, name
    said = next(line for line in stdout["exact"].splitlines() if line.startswith("--exact-reference:"))
    assert "--released.train-mask frame" in said and "--window-context noisy" in said
    assert out["exact"] == out["spelled"]
    assert [row["loss"] for row in out["exact"]] != [row["loss"] for row in out["default"]]
    state = json.loads((tmp_path / "exact" / "ckpt_000002" / "state.json").read_text())
    assert state["args"]["released"]["uncertainty_sign"] == "released" and state["args"]["window_context"] == "noisy"


def test_objective_positive_only(tmp_path):
    """--objective positive-only changes the policy loss and nothing before it (same rollout, r)."""
    out = {}
    for objective in ("nft", "positive-only"):
        path = tmp_path / objective
        run(["--steps", "1", "--eval-every", "0", "--num-frames", "6", "--window", "0", "--objective", objective,
             "--rewards", "colorfulness=1"], path)
        out[objective] = rows(path)[0]
    assert out["nft"]["reward_mean"] == out["positive-only"]["reward_mean"]
    assert out["nft"]["r_mean"] == out["positive-only"]["r_mean"]
    assert out["nft"]["loss"] != out["positive-only"]["loss"]
    # r ≈ ½ on average: the positive branch alone is about half of the NFT loss at theta = old
    assert 0.3 < out["positive-only"]["loss"] / out["nft"]["loss"] < 0.7


def model_and_args(released=None, **kw):
    torch.manual_seed(0)
    m = CausalWanModel(CFG).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    base = dict(height=8, width=8, num_frames=12, window=0, window_context="noisy")
    return m, train.Args(**{**base, **kw}, released=train.Released(**(released or {})))


def predict(m, args, x):
    t = torch.full(x.shape[:2], 500.0)
    ctx = torch.randn(1, 4, CFG.text_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return train.predict_x0(m, None, x, t, torch.full((1,), 0.5), ctx, args, clean_x0=x, start=0, history=None)


@pytest.mark.parametrize("mask", ["block", "frame"])
def test_train_mask(mask):
    """frame: a frame never sees the later frames of its own block (released); block: it does."""
    m, args = model_and_args(released=dict(train_mask=mask))
    x = torch.randn(1, 12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 1] += 1.0  # change frame 1 (block 0)
    a, b = predict(m, args, x), predict(m, args, y)
    frame0_moved = not torch.allclose(a[:, 0], b[:, 0])
    assert frame0_moved == (mask == "block")
    assert not torch.allclose(a[:, 2], b[:, 2])  # later frames see frame 1 either way


@pytest.mark.parametrize("train_sink", [True, False])
def test_train_sink(train_sink):
    """Rolling window 6, sink 3: the last block sees frames 0-2 only through the sink."""
    m, args = model_and_args(local_attn=6, sink=3, released=dict(train_sink=train_sink))
    x = torch.randn(1, 12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 0] += 1.0  # a sink frame
    a, b = predict(m, args, x), predict(m, args, y)
    assert (not torch.allclose(a[:, 9:], b[:, 9:])) == train_sink
    assert not torch.allclose(a[:, 1], b[:, 1])  # inside its own window frame 0 is always seen


class Capture(nft.RiskCompensator):
    """A RiskCompensator that keeps the u it was given."""
    def update(self, u):
        self.u = u
        return super().update(u)


def test_selective_flags_choose_auxiliaries_sign_and_ties():
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.randn(24, generator=g) for n in ["main", "a", "b", "c"]}
    names = list(scores)

    def u_of(**kw):  # the u the mask is cut from, through the flags
        comp = Capture()
        rel = train.Released(**kw)
        nft.selective_kl_mask(scores, names, comp, rel.aux_rewards, rel.uncertainty_sign, rel.rank_ties)
        return comp.u
    paper = nft.uncertainty(scores["main"], [scores[n] for n in "abc"])
    assert torch.equal(u_of(), paper)  # default: every other reward, paper sign
    assert torch.equal(u_of(uncertainty_sign="released"), -paper)
    two = nft.uncertainty(scores["main"], [scores["a"], scores["b"]])
    assert torch.equal(u_of(aux_rewards=2), two)  # the released [:2]
    tied = {n: s.round() for n, s in scores.items()}  # integer scores: many ties
    scores.update(tied)
    assert not torch.equal(u_of(rank_ties="ordinal"), u_of(rank_ties="average"))


def test_ref_thres_cap():
    d_ours, d_released = nft.DynamicReference(thres_max=0.5), nft.DynamicReference(thres_max=0.05)
    for d in (d_ours, d_released):
        d.step(1.0)  # a reset right after the start: gap 1 < 5 raises the threshold
    assert d_ours.thres == pytest.approx(0.16) and d_released.thres == pytest.approx(0.05)


def test_prompt_draw():
    prompts = [f"p{i}" for i in range(10)]
    walk = [streaming.prompts_for_step(prompts, 5, s, 42) for s in range(2)]
    assert sorted(walk[0] + walk[1]) == sorted(prompts)  # an epoch: every prompt once
    for step in range(3):  # released: randperm seeded with seed + step, first n
        idx = torch.randperm(10, generator=torch.Generator().manual_seed(42 + step))[:5].tolist()
        assert streaming.prompts_for_step(prompts, 5, step, 42, "released") == [prompts[i] for i in idx]


def test_reward_frames():
    (name, fn, _), = rewards.parse_rewards(["hpsv2"], reward_models.REWARDS, frames=0)
    assert fn.keywords == {"frames": 0}  # every frame
    (_, fn, _), = rewards.parse_rewards(["hpsv2"], reward_models.REWARDS)
    assert fn is reward_models.hpsv2  # the default 8
    (_, fn, _), = rewards.parse_rewards(["flicker"], frames=0)
    assert fn is rewards.flicker  # video rewards take no frame count
    # on rewards that take no frame count the flag is inert, and the warning names those that do
    args = dataclasses.replace(train.Args(), released=train.Released(reward_frames=4))
    _, warnings = checks.check_args(args, 1, train.REGISTRY)
    assert "--released.reward-frames: used only by rewards with a `frames` keyword (aesthetic, clip_score, " \
        "hpsv2, hpsv3)" in " ".join(warnings)
    v = torch.rand(1, 81, 3, 4, 4)
    assert reward_models._subsample(v, 0).shape[1] == 81 and reward_models._subsample(v, 8).shape[1] == 8


@pytest.mark.parametrize("start", ["sync", "base"])
def test_ema_start(tmp_path, start):
    """sync (released): the EMA is theta after the first step; base: 0.1 theta_0 + 0.9 theta_1.
    The training itself is the same either way."""
    out = tmp_path / start
    run(["--steps", "1", "--eval-every", "0", "--num-frames", "3", "--released.ema-start", start], out)
    ad = load_file(out / "ckpt_000001" / "adapters.safetensors")
    key = next(k for k in ad if k.startswith("default/") and "lora_B" in k)  # theta_0's B is 0
    ema, theta = ad[key.replace("default/", "ema/")], ad[key]
    assert theta.abs().max() > 0
    if start == "sync":
        assert torch.equal(ema, theta)
    else:
        torch.testing.assert_close(ema, 0.9 * theta)
    other = tmp_path / "other"
    run(["--steps", "1", "--eval-every", "0", "--num-frames", "3",
         "--released.ema-start", "base" if start == "sync" else "sync"], other)
    strip = [strip_times(r) for r in rows(out) + rows(other)]
    assert strip[0] == strip[1]
