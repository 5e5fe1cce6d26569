"""
nft_loss.py against hand-made values, loop versions (tests/naive_nft.py), numpy, and the
analytic facts of the NFT objective (its per-sample optimum and its gradient at θ = θ_old).

Run:  python -m pytest tests/test_nft_loss.py -q
"""
import json
import math

import numpy as np
import pytest
import torch

import naive_nft as naive
from nft_loss import (DynamicReference, nft_sample_losses, RiskCompensator, ema_decay, group_advantages,
                      group_normalize, nft_policy_loss, old_decay, optimality_prob, ranks,
                      ref_loss, selective_mask, selective_threshold, uncertainty)

F64 = torch.float64  # tests run in float64 for tight tolerances; the functions are dtype-agnostic


def T(x):
    return torch.tensor(x, dtype=F64)


def latents(B, seed, shape=(2, 3, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, *shape, generator=g, dtype=F64) for _ in range(3)]  # x̂_θ, x̂_old, x0


# ---------------------------------------------------------------- NFT loss: analytic facts

def test_optimum_reached_by_gradient_descent():
    # set dℓ/dx̂_θ = 0: per sample, argmin ℓ = x̂_old + (2r - 1)/β · (x0 - x̂_old)
    beta = 0.1
    r = T([0.0, 0.25, 0.5, 0.75, 1.0])
    _, x_old, x0 = latents(5, 0)
    x = x_old.clone().requires_grad_(True)  # a free tensor standing in for the network output
    n = x0[0].numel()
    # the loss is quadratic with Hessian (2β²/n)/B per element: this step halves the error
    opt = torch.optim.SGD([x], lr=0.5 * len(r) * n / (2 * beta ** 2))
    for _ in range(80):
        opt.zero_grad()
        nft_policy_loss(x, x_old, x0, r, beta).backward()
        opt.step()
    expect = x_old + ((2 * r - 1) / beta).view(-1, 1, 1, 1, 1) * (x0 - x_old)
    torch.testing.assert_close(x.detach(), expect, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.detach()[2], x_old[2])  # r = ½: x̂_old is already optimal


def test_loss_equals_expanded_quadratic():
    # ℓ = ‖a‖² + 2β(2r - 1)⟨a, Δ⟩ + β²‖Δ‖², a = x̂_old - x0, Δ = x̂_θ - x̂_old (element means)
    beta, r = 0.3, T([0.1, 0.6, 0.9])
    xt, xo, x0 = latents(3, 1)
    a, d = (xo - x0).flatten(1), (xt - xo).flatten(1)
    expect = (a * a).mean(1) + 2 * beta * (2 * r - 1) * (a * d).mean(1) + beta ** 2 * (d * d).mean(1)
    torch.testing.assert_close(nft_sample_losses(xt, xo, x0, r, beta), expect)


@pytest.mark.parametrize("r_val", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_gradient_at_old_policy(r_val):
    # at x̂_θ = x̂_old: ∂ℓ/∂x̂_θ = 2β(2r - 1)(x̂_old - x0)/n, zero for r = ½
    beta = 0.1
    _, xo, x0 = latents(2, 2)
    r = torch.full((2,), r_val, dtype=F64)
    x = xo.clone().requires_grad_(True)
    nft_sample_losses(x, xo, x0, r, beta).sum().backward()
    expect = 2 * beta * (2 * r_val - 1) * (xo - x0) / x0[0].numel()
    torch.testing.assert_close(x.grad, expect, rtol=1e-12, atol=1e-15)
    if r_val == 0.5:
        assert x.grad.abs().max() < 1e-17  # zero up to rounding of β·x + (1 - β)·x


@pytest.mark.parametrize("r_val", [0.0, 0.2, 0.8])
def test_positive_only_gradient_at_old_policy(r_val):
    # --objective positive-only, ℓ = r ‖x̂⁺ - x0‖²: at x̂_θ = x̂_old, ∂ℓ/∂x̂_θ = 2βr(x̂_old - x0)/n.
    # Every sample with r > 0 attracts (gradient descent moves towards x0); NFT pushes away for r < ½.
    beta = 0.1
    _, xo, x0 = latents(2, 3)
    r = torch.full((2,), r_val, dtype=F64)
    x = xo.clone().requires_grad_(True)
    nft_sample_losses(x, xo, x0, r, beta, negative=False).sum().backward()
    torch.testing.assert_close(x.grad, 2 * beta * r_val * (xo - x0) / x0[0].numel(), rtol=1e-12, atol=1e-15)
    x_nft = xo.clone().requires_grad_(True)
    nft_sample_losses(x_nft, xo, x0, r, beta).sum().backward()
    # the two objectives agree on the direction only for r > ½
    same_way = (x.grad * x_nft.grad).sum() > 0
    assert bool(same_way) == (r_val > 0.5)


def test_positive_only_is_the_positive_term():
    beta, r = 0.2, T([0.0, 0.3, 1.0])
    xt, xo, x0 = latents(3, 4)
    pos = beta * xt + (1 - beta) * xo
    expect = r * ((pos - x0) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(nft_sample_losses(xt, xo, x0, r, beta, negative=False), expect)
    assert nft_sample_losses(xt, xo, x0, r, beta, negative=False)[0] == 0  # r = 0: ignored, not pushed


def test_old_policy_gets_no_gradient():
    xt, xo, x0 = latents(2, 3)
    xt.requires_grad_(True)
    xo.requires_grad_(True)
    nft_policy_loss(xt, xo, x0, T([0.2, 0.9])).backward()
    assert xo.grad is None and xt.grad is not None


def test_policy_loss_matches_loop():
    xt, xo, x0 = latents(4, 4, shape=(3, 2))
    r = T([0.0, 0.3, 0.5, 1.0])
    flat = [t.flatten(1).tolist() for t in (xt, xo, x0)]
    for adaptive in (False, True):
        mean = nft_policy_loss(xt, xo, x0, r, 0.1, adaptive=adaptive)
        per = nft_sample_losses(xt, xo, x0, r, 0.1, adaptive=adaptive)
        expect = T(naive.policy_loss(*flat, r.tolist(), 0.1, adaptive=adaptive))
        torch.testing.assert_close(per, expect)
        torch.testing.assert_close(mean, expect.mean())


# ------------------------------------------------------- adaptive weighting (DiffusionNFT)

def test_adaptive_matches_diffusionnft_formula():
    # DiffusionNFT's code works on velocities: x0± = x_t - t·v±, w± = sg(max(mean|x0± - x0|,
    # 1e-5)) in float64, loss = mean_b(A_max · (r·mean((x0⁺-x0)²/w⁺)/β + (1-r)·mean((x0⁻-x0)²/w⁻)/β))
    beta, amax, t = 0.1, 5.0, 0.75
    g = torch.Generator().manual_seed(5)
    x0, eps, v_old = (torch.randn(3, 2, 4, 6, generator=g, dtype=F64) for _ in range(3))
    v_theta = (v_old + 0.3 * torch.randn(3, 2, 4, 6, generator=g, dtype=F64)).requires_grad_(True)
    r = T([0.05, 0.5, 0.93])
    xt = (1 - t) * x0 + t * eps
    dims = (1, 2, 3)
    v_pos = beta * v_theta + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v_theta
    x_pos, x_neg = xt - t * v_pos, xt - t * v_neg
    w_pos = (x_pos.detach() - x0).abs().mean(dims, keepdim=True).clip(min=1e-5)
    w_neg = (x_neg.detach() - x0).abs().mean(dims, keepdim=True).clip(min=1e-5)
    pos = ((x_pos - x0) ** 2 / w_pos).mean(dims)
    neg = ((x_neg - x0) ** 2 / w_neg).mean(dims)
    expect = ((r * pos / beta + (1 - r) * neg / beta) * amax).mean()
    (g_expect,) = torch.autograd.grad(expect, v_theta)
    # ours, fed with x0 predictions x̂ = x_t - t·v (mixing in x0 space is the same thing)
    got = nft_policy_loss(xt - t * v_theta, xt - t * v_old, x0, r, beta, adaptive=True, adv_clip=amax)
    (g_got,) = torch.autograd.grad(got, v_theta)
    torch.testing.assert_close(got, expect)
    torch.testing.assert_close(g_got, g_expect)


def test_adaptive_gradient_at_old_policy():
    # w⁺ = w⁻ = w = mean|x̂_old - x0| at x̂_θ = x̂_old, so ∂ℓ/∂x̂_θ = 2·A_c·(x̂_old - x0)/(w·n),
    # A_c = (2r - 1)·A_max the clipped advantage: the /β and ×A_max factors cancel β out
    _, xo, x0 = latents(3, 6)
    r = T([0.1, 0.5, 0.7])
    x = xo.clone().requires_grad_(True)
    nft_sample_losses(x, xo, x0, r, 0.1, adaptive=True).sum().backward()
    w = (xo - x0).abs().flatten(1).mean(1).view(-1, 1, 1, 1, 1)
    a_c = ((2 * r - 1) * 5.0).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(x.grad, 2 * a_c * (xo - x0) / (w * x0[0].numel()))


# ------------------------------------------------------------------------- ref ("KL") term

def test_ref_loss_all_masked_and_empty():
    xt, xr, _ = latents(4, 7)
    xt.requires_grad_(True)
    per = ((xt - xr) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(ref_loss(xt, xr), per.mean())
    mask = torch.tensor([True, False, False, True])
    torch.testing.assert_close(ref_loss(xt, xr, mask), (per[0] + per[3]) / 2)
    empty = ref_loss(xt, xr, torch.zeros(4, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert xt.grad is not None and xt.grad.abs().max() == 0


# ------------------------------------------------------------ advantages and probabilities

def test_advantages_match_loop():
    rewards = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 2.5]
    prompts = ["a", "b", "a", "c", "b", "a", "d"]  # unequal groups, two of size one
    for global_std in (True, False):
        got = group_advantages(T(rewards), prompts, global_std=global_std)
        torch.testing.assert_close(got, T(naive.advantages(rewards, prompts, global_std)))
    # the default is each group's own std, as train.py's (a copied file must not switch it silently)
    torch.testing.assert_close(group_advantages(T(rewards), prompts), T(naive.advantages(rewards, prompts, False)))
    # integer group ids give the same result as strings
    ids = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    torch.testing.assert_close(group_advantages(T(rewards), ids), group_advantages(rewards, prompts))


def test_advantages_use_population_std():
    # np.std (ddof=0), as flow_grpo/Astrolabe's PerPromptStatTracker; per-prompt mean
    rewards = np.array([0.3, 0.9, 0.1, 0.7])
    got = group_advantages(rewards, ["p", "p", "q", "q"], global_std=True)
    means = np.array([0.6, 0.6, 0.4, 0.4])
    np.testing.assert_allclose(got.numpy(), (rewards - means) / (np.std(rewards) + 1e-4), rtol=1e-12)
    assert not np.allclose(got.numpy(), (rewards - means) / (np.std(rewards, ddof=1) + 1e-4))


def test_group_normalize_matches_dancegrpo_loop():
    # DanceGRPO: per group (x - x.mean()) / (x.std() + 1e-8), torch's unbiased std
    x = T([1.0, 4.0, 2.0, 8.0, 3.0, 5.0])
    groups = ["a", "a", "b", "b", "a", "c"]  # "c" is a single sample -> 0
    expect = torch.zeros(6, dtype=F64)
    for grp in set(groups):
        idx = torch.tensor([i for i, k in enumerate(groups) if k == grp])
        if len(idx) > 1:
            expect[idx] = (x[idx] - x[idx].mean()) / (x[idx].std() + 1e-8)
    torch.testing.assert_close(group_normalize(x, groups), expect)


def test_optimality_prob_hand_values():
    a = T([-12.0, -5.0, -2.5, 0.0, 1.0, 4.9, 5.0, 7.0])
    expect = T([0.0, 0.0, 0.25, 0.5, 0.6, 0.99, 1.0, 1.0])
    torch.testing.assert_close(optimality_prob(a), expect)
    assert [naive.optimality_prob(x) for x in a.tolist()] == pytest.approx(expect.tolist())
    torch.testing.assert_close(optimality_prob(T([-1.0, 1.0]), adv_clip=2.0), T([0.25, 0.75]))


# ------------------------------------------------------------------- selective regularization

def test_ranks_with_ties():
    s = T([3.0, 1.0, 3.0, 2.0])
    assert ranks(s).tolist() == [1.5, 4.0, 1.5, 3.0]
    assert ranks(s, ties="ordinal").tolist() == [1.0, 4.0, 2.0, 3.0]
    t = [0.2, 0.2, 0.2, 0.9, -1.0, 0.9]
    for ties in ("average", "ordinal"):
        assert ranks(torch.tensor(t), ties).tolist() == naive.ranks(t, ties)


def test_ranks_equal_reference_without_ties():
    # the reference: indices of torch.sort(descending=True), ranks[indices] = 1..N
    s = torch.randn(50, dtype=F64, generator=torch.Generator().manual_seed(8))
    _, idx = torch.sort(s, descending=True)
    ref = torch.empty(50, dtype=torch.long)
    ref[idx] = torch.arange(1, 51)
    assert ranks(s).tolist() == ref.double().tolist() == ranks(s, "ordinal").tolist()


def test_uncertainty_hand_values():
    main = T([0.9, 0.1, 0.5, 0.3])  # ranks 1 4 2 3
    aux1 = T([0.1, 0.9, 0.5, 0.3])  # ranks 4 1 2 3
    aux2 = T([0.2, 0.8, 0.6, 0.4])  # ranks 4 1 2 3
    # sample 0: main loves it, auxiliaries don't -> u > 0 with the paper sign, < 0 released
    assert uncertainty(main, [aux1, aux2]).tolist() == [3.0, -3.0, 0.0, 0.0]
    assert uncertainty(main, [aux1, aux2], sign="released").tolist() == [-3.0, 3.0, 0.0, 0.0]
    g = torch.Generator().manual_seed(9)
    m, a, b = (torch.randn(30, generator=g, dtype=F64) for _ in range(3))
    for sign in ("paper", "released"):
        u = uncertainty(m, [a, b], sign=sign)
        assert u.tolist() == pytest.approx(naive.uncertainty(m.tolist(), [a.tolist(), b.tolist()], sign))
        assert abs(u.sum().item()) < 1e-9  # Σu = 0: {u >= 0} is never empty


def test_selective_mask_hand_value():
    u = T([-3.0, 0.0, 0.5, 1.0, 2.0, 2.0, 4.0, 7.0])
    # {u >= 0} = [0, .5, 1, 2, 2, 4, 7]; 80th pct: pos 0.8·6 = 4.8 -> 2 + 0.8·(4 - 2) = 3.6
    mask, tau = selective_mask(u, 0.2), selective_threshold(u, 0.2)
    assert tau == pytest.approx(3.6)
    assert mask.tolist() == [False] * 6 + [True, True]


def test_selective_mask_matches_numpy_percentile():
    g = torch.Generator().manual_seed(10)
    for trial in range(40):
        n = int(torch.randint(2, 60, (1,), generator=g))
        u = torch.randint(-20, 21, (n,), generator=g).double() / 2  # half-integers: many ties
        for rho in (0.02, 0.1, 0.1 * 1.1 ** 3, 0.2):
            mask, tau = selective_mask(u, rho), selective_threshold(u, rho)
            nonneg = u[u >= 0].numpy()
            if len(nonneg) == 0:
                assert tau == math.inf and not mask.any()
                continue
            ref_tau = np.percentile(nonneg, 100 - rho * 100)
            assert tau == pytest.approx(ref_tau, abs=1e-12)
            assert tau == pytest.approx(naive.percentile(nonneg.tolist(), 100 - rho * 100), abs=1e-12)
            assert mask.tolist() == (u.numpy() > ref_tau).tolist()


def test_selective_mask_edge_cases():
    u = T([-1.0, -2.0])  # no u >= 0: τ = +inf, nothing selected
    assert selective_threshold(u, 0.1) == math.inf and selective_mask(u, 0.1).tolist() == [False] * 2
    u = T([0.0, 0.0, -1.0])  # all ties at τ: strict > selects nothing
    assert selective_threshold(u, 0.1) == 0.0 and not selective_mask(u, 0.1).any()


def u_with_mean(m):
    """A u vector whose non-negative part has mean m (the negative entry must be ignored)."""
    return T([-100.0, 0.5 * m, 1.5 * m])  # m >= 0


def test_risk_compensator_hand_sequence():
    rc = RiskCompensator()
    means = [1.0, 2.0, 3.0, 0.5, 1.5, 0.4]
    # first: ρ = base; >max: ×1.1; >max: ×1.1; <min: ×0.9; inside: same; <min: ×0.9
    expect = [0.1, 0.11, 0.121, 0.1089, 0.1089, 0.09801]
    got = [rc.update(u_with_mean(m)) for m in means]
    assert got == pytest.approx(expect, rel=1e-12)
    # ρ is capped at 0.2: 0.09801·1.1^7 = 0.191, ·1.1^8 = 0.210 -> 0.2
    for k in range(1, 10):
        rho = rc.update(u_with_mean(10.0 + k))
        assert rho == pytest.approx(min(0.09801 * 1.1 ** k, 0.2), rel=1e-12)
    lo = RiskCompensator()
    for k in range(40):
        lo.update(u_with_mean(-k + 50.0))  # always a new minimum: floor at 0.02
    assert lo.rho == pytest.approx(0.02)


def test_risk_compensator_window_of_20():
    rc = RiskCompensator()
    seq = [rc.update(u_with_mean(m)) for m in [10.0] + [1.0] * 19 + [5.0, 6.0]]
    # call 2: 1 < min=10 -> 0.09; calls 3..21: inside [1, 10] -> 0.09; call 21 pushes the 10
    # out of the 20-value buffer, so call 22 sees max = 5 and 6 > 5 -> 0.099
    assert seq[0] == pytest.approx(0.1) and seq[1:21] == pytest.approx([0.09] * 20)
    assert seq[21] == pytest.approx(0.099)
    assert len(rc.buffer) == 20 and 10.0 not in rc.buffer


def test_risk_compensator_resume_is_exact():
    a = RiskCompensator()
    for m in [1.0, 3.0, 2.0, 0.5]:
        a.update(u_with_mean(m))
    b = RiskCompensator()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for m in [4.0, 0.1, 2.0, 9.0]:
        assert a.update(u_with_mean(m)) == b.update(u_with_mean(m))


# ------------------------------------------------------------------------ dynamic reference

def test_dynamic_reference_hand_sequence():
    d = DynamicReference()
    # step 1: KL 0.2 > 0.15 -> reset, gap 1 < 5 -> thres 0.16
    assert d.step(0.2) and d.thres == pytest.approx(0.16)
    assert not d.step(0.155)  # 0.155 < 0.16
    assert d.step(0.17) and d.thres == pytest.approx(0.17)  # step 3: gap 2 -> 0.17
    # steps 4..18: gaps 1..15, KL 0 -> nothing; step 19: gap 16 > 15 -> reset, thres 0.16
    assert [d.step(0.0) for _ in range(4, 19)] == [False] * 15
    assert d.step(0.0) and d.thres == pytest.approx(0.16) and d.last_reset == 19
    # a KL reset at a gap in [5, 15] leaves thres alone
    assert [d.step(0.0) for _ in range(6)] == [False] * 6
    assert d.step(0.5) and d.thres == pytest.approx(0.16) and d.last_reset == 26


def test_dynamic_reference_threshold_bounds():
    d = DynamicReference()
    for k in range(6):  # six timeouts: 0.15 -> 0.14 ... 0.10, then the floor
        assert [d.step(0.0) for _ in range(16)] == [False] * 15 + [True]
        assert d.thres == pytest.approx(max(0.15 - 0.01 * (k + 1), 0.1))
    for _ in range(60):  # a reset every step raises thres by 0.01 up to thres_max = 0.5
        d.step(10.0)
    assert d.thres == pytest.approx(0.5)


def test_dynamic_reference_gardo_clamp_quirk():
    d = DynamicReference(thres_max=0.05)  # the released cap
    assert d.step(0.2) and d.thres == pytest.approx(0.05)  # min(0.16, 0.05): the reference's clamp
    assert d.step(0.06) and d.thres == pytest.approx(0.05)  # now KL 0.06 already resets
    assert [d.step(0.0) for _ in range(16)] == [False] * 15 + [True]
    assert d.thres == pytest.approx(0.1)  # timeout: max(0.05 - 0.01, 0.1)


def test_dynamic_reference_resume_is_exact():
    a = DynamicReference()
    kls = [0.2, 0.0, 0.3, 0.0, 0.0, 0.16, 0.0] + [0.0] * 20 + [0.5, 0.12, 0.3]
    for kl in kls[:5]:
        a.step(kl)
    b = DynamicReference()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for kl in kls[5:]:
        assert a.step(kl) == b.step(kl) and a.thres == b.thres


# ----------------------------------------------------------------------------- schedules

def test_old_decay_schedules():
    assert [old_decay(s, "on-policy") for s in (0, 1, 100, 10_000)] == [0.0] * 4
    lin = [old_decay(s, "linear") for s in (0, 1, 250, 499, 500, 501, 5000)]
    assert lin == pytest.approx([0.0, 0.001, 0.25, 0.499, 0.5, 0.5, 0.5])
    delayed = [old_decay(s, "delayed") for s in (0, 74, 75, 76, 100, 208, 209, 1000)]
    assert delayed == pytest.approx([0.0, 0.0, 0.0, 0.0075, 0.1875, 0.9975, 0.999, 0.999])
    with pytest.raises(ValueError):
        old_decay(3, "cosine")


def test_ema_decay():
    got = [ema_decay(n) for n in (0, 1, 10, 80, 81, 1000)]
    assert got == pytest.approx([0.1, 2 / 11, 0.55, 0.9, 0.9, 0.9])
    assert ema_decay(81) == 0.9 and ema_decay(79) < 0.9
