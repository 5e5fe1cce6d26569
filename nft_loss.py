"""
The RL maths of Astrolabe: negative-aware fine-tuning (NFT, from DiffusionNFT) on x0
predictions, plus the bookkeeping around it. Pure functions of tensors; nothing here knows
about models, adapters or rollouts (train.py wires them together; docs/method.md walks the step).

  rewards -> group_advantages -> optimality_prob                r in [0, 1] per sample
  (group_normalize: DanceGRPO-style per-reward normalisation before the weighted sum)
  x̂_θ, x̂_old, x0, r -> nft_policy_loss                         the NFT loss: DiffusionNFT's objective L(θ)
                                                                (arXiv 2509.16117), on x0 as released
  x̂_θ, x̂_ref, mask -> ref_loss                                  the "KL" (an L2 in x0 space)
  scores -> ranks -> uncertainty -> RiskCompensator -> selective_mask  GARDO's selective KL
  (selective_kl_mask: the whole chain, as train.py calls it)
  DynamicReference                                              when to reset ref <- θ
  old_decay, ema_decay                                          the parameter averages

Every rule was checked against the released code (Astrolabe scripts/train_nft_wan.py, GARDO
scripts/train_sd3_nft_gardo.py, flow_grpo stat_tracking/ema). Two reference quirks are kept
only behind keywords (and train.py flags): the released sign of u (`uncertainty(sign=
"released")`, --released.uncertainty-sign) and the threshold cap of the reference reset
(`DynamicReference(thres_max=0.05)`, --released.ref-thres-cap). docs/method.md cites the upstream lines.

Test: python -m pytest tests/test_nft_loss.py -q   (naive loop versions: tests/naive_nft.py)

Shape legend: N samples of the whole RL step (all prompts), B samples of a micro-batch,
... any non-batch dims of a latent (F frames, C channels, H, W).
"""
import math

import torch


# ----------------------------------------------------------------------------------------
# Rewards -> advantages -> optimality probability

def _groups(group_ids, device):
    """Group index of every sample (groups numbered by first appearance) and group sizes."""
    ids = group_ids.tolist() if torch.is_tensor(group_ids) else list(group_ids)
    first = {}
    g = torch.tensor([first.setdefault(i, len(first)) for i in ids], device=device)  # (N,)
    return g, torch.bincount(g, minlength=len(first)).double()  # (N,), (G,)


def _group_sum(v, g, count):
    """Σ of v over each group: (N,) -> (G,)."""
    return torch.zeros(len(count), dtype=v.dtype, device=v.device).index_add_(0, g, v)


def group_advantages(rewards, group_ids, global_std=False, eps=1e-4):
    """A = (R - mean_group(R)) / (std + eps), computed in float64 (as the numpy reference).

    group_ids: one hashable per sample (prompt strings, or an int tensor). global_std=False (the
    default here and in train.py) divides by each group's own std; True (Astrolabe/DiffusionNFT
    `sample.global_std`, train.py --global-std) by the std of ALL N samples. Both are *population*
    stds (ddof=0): the reference PerPromptStatTracker uses np.std. A group of one sample gets A = 0
    with per-group std.
    """
    R = torch.as_tensor(rewards, dtype=torch.float64).flatten()  # (N,)
    g, count = _groups(group_ids, R.device)
    # mean_group = Σ_{i in group} R_i / |group|
    centered = R - (_group_sum(R, g, count) / count)[g]  # (N,)
    if global_std:
        # std = sqrt(mean_i (R_i - mean(R))²) over all N samples
        std = R.std(correction=0)
    else:
        # std_group = sqrt(Σ_{i in group} (R_i - mean_group)² / |group|)
        std = (_group_sum(centered ** 2, g, count) / count).sqrt()[g]  # (N,)
    return centered / (std + eps)  # (N,)


def group_normalize(scores, group_ids, eps=1e-8):
    """DanceGRPO's per-group z-score, for normalising each reward before the weighted sum
    (train.py --reward-norm per-reward): (x - mean_group) / (std_group + 1e-8),
    with torch's default *unbiased* std as in DanceGRPO. Groups of one sample give 0."""
    x = torch.as_tensor(scores, dtype=torch.float64).flatten()  # (N,)
    g, count = _groups(group_ids, x.device)
    centered = x - (_group_sum(x, g, count) / count)[g]  # (N,)
    # std_group = sqrt(Σ_{i in group} (x_i - mean_group)² / (|group| - 1))
    std = (_group_sum(centered ** 2, g, count) / (count - 1).clamp(min=1)).sqrt()[g]  # (N,)
    return centered / (std + eps)


def optimality_prob(adv, adv_clip=5.0):
    """r = clip(0.5 + clip(A, -A_max, A_max) / (2 A_max), 0, 1): A = 0 -> ½, |A| >= A_max -> 0|1."""
    a = torch.clamp(adv, -adv_clip, adv_clip)
    # same operation order as the reference: (A_c / A_max) / 2 + 0.5
    return torch.clamp(a / adv_clip / 2.0 + 0.5, 0.0, 1.0)


# ----------------------------------------------------------------------------------------
# The NFT policy loss and the reference ("KL") term

def sq_err(a, b):
    """‖a - b‖² as a mean over every non-batch element: (B, ...) -> (B,)."""
    return ((a - b) ** 2).reshape(a.shape[0], -1).mean(1)


def adaptive_weight(pred, x0, floor=1e-5):
    """DiffusionNFT's self-normalising weight w = sg(max(mean|x̂ - x0|, 1e-5)), in float64: (B,)."""
    with torch.no_grad():
        err = (pred.double() - x0.double()).abs().reshape(pred.shape[0], -1)  # (B, n)
        return err.mean(1).clamp(min=floor)


def nft_sample_losses(x0_theta, x0_old, x0, r, beta=0.1, adaptive=False, adv_clip=5.0, negative=True):
    """Negative-aware fine-tuning loss on x0 predictions, per sample: (B,).

    x0_theta (B, ...) trainable prediction; x0_old (B, ...) rollout policy's (detached here);
    x0 (B, ...) the generated clean sample; r (B,) optimality probability. Per sample
        ℓ = r ‖x̂⁺ - x0‖² + (1 - r) ‖x̂⁻ - x0‖²        (Astrolabe: plain means, no weighting)
    Its minimiser is x̂_θ* = x̂_old + (2r - 1)/β · (x0 - x̂_old) (set dℓ/dx̂_θ = 0): r > ½
    pulls towards the sample, r < ½ pushes away, r = ½ leaves x̂_old where it is.

    adaptive=True is DiffusionNFT's official loss (DiffusionNFT `train_nft_sd3.py`): each squared error is
    divided by its own weight w± = adaptive_weight(x̂±, x0), and the sum is scaled by A_max/β:
        ℓ = (A_max / β) · [ r ‖x̂⁺ - x0‖² / w⁺ + (1 - r) ‖x̂⁻ - x0‖² / w⁻ ]
    (the reference keeps the division in float64; here w is cast back to the error's dtype).

    negative=False is the ablation the paper argues against (train.py --objective positive-only):
    ℓ = r ‖x̂⁺ - x0‖², reward-weighted regression onto the samples, with no push away from the bad
    ones. Its minimiser is x̂_θ* = x̂_old + (x0 - x̂_old)/β for every r > 0: every sample attracts.
    """
    x0_old = x0_old.detach()  # sg(): the old policy is a fixed anchor
    # x̂⁺ = β x̂_θ + (1 - β) sg(x̂_old)      implicit positive policy
    pos = beta * x0_theta + (1 - beta) * x0_old  # (B, ...)
    # x̂⁻ = (1 + β) sg(x̂_old) - β x̂_θ      implicit negative policy (x̂⁺ mirrored about x̂_old)
    neg = (1 + beta) * x0_old - beta * x0_theta  # (B, ...)
    e_pos, e_neg = sq_err(pos, x0), sq_err(neg, x0)  # (B,), (B,)
    if adaptive:
        # e± <- e± / w±
        e_pos = e_pos / adaptive_weight(pos, x0).to(e_pos.dtype)
        e_neg = e_neg / adaptive_weight(neg, x0).to(e_neg.dtype)
    if negative:
        # ℓ_b = r_b e⁺_b + (1 - r_b) e⁻_b
        per_sample = r * e_pos + (1 - r) * e_neg  # (B,)
    else:
        # ℓ_b = r_b e⁺_b: the positive branch alone, weighted by r
        per_sample = r * e_pos  # (B,)
    if adaptive:
        # × A_max/β: undoes the β carried by ∂x̂±/∂x̂_θ and restores the advantage scale
        per_sample = per_sample * (adv_clip / beta)
    return per_sample


def nft_policy_loss(x0_theta, x0_old, x0, r, beta=0.1, adaptive=False, adv_clip=5.0, negative=True):
    """The NFT loss of a micro-batch: nft_sample_losses(...) averaged over its B samples."""
    return nft_sample_losses(x0_theta, x0_old, x0, r, beta, adaptive, adv_clip, negative).mean()


def ref_loss(x0_theta, x0_ref, mask=None):
    """λ_KL's term: mean over samples of ‖x̂_θ - sg(x̂_ref)‖² (per-sample mean over elements).

    mask (B,) bool: average only over the selected samples (selective KL). An
    empty selection gives 0 that is still connected to x̂_θ's graph, so backward() works.
    """
    per = sq_err(x0_theta, x0_ref.detach())  # (B,)
    if mask is None:
        return per.mean()
    if not bool(mask.any()):
        return per.sum() * 0.0  # as the reference: no selected sample -> zero, differentiable
    return per[mask].mean()


# ----------------------------------------------------------------------------------------
# Uncertainty-aware selective regularization (GARDO; Astrolabe, arXiv 2603.17051)

def ranks(scores, ties="average"):
    """Descending ranks over all N samples, rank 1 = highest score: (N,) float64.

    ties="average": tied samples share the mean of their ranks ([3, 1, 3] -> [1.5, 3, 1.5]),
    so ranks do not depend on sample order. The reference instead takes ordinal ranks from
    torch.sort(descending=True), whose order among ties is unspecified; ties="ordinal" does
    the same with a stable sort (earlier sample wins). With no ties (continuous reward
    scores, the usual case) both equal the reference exactly.
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()  # (N,)
    if ties == "ordinal":
        order = torch.sort(s, descending=True, stable=True).indices  # (N,)
        out = torch.empty_like(s)
        out[order] = torch.arange(1, len(s) + 1, dtype=torch.float64, device=s.device)
        return out
    if ties != "average":
        raise ValueError(f"ties must be 'average' or 'ordinal', got {ties!r}")
    asc = torch.sort(s).values
    n_le = torch.searchsorted(asc, s, right=True)  # samples with score <= s_i
    n_lt = torch.searchsorted(asc, s, right=False)  # samples with score < s_i
    # rank_i = #{j: s_j > s_i} + (#{j: s_j = s_i} + 1) / 2
    return (len(s) - n_le) + (n_le - n_lt + 1) / 2.0


def uncertainty(main_scores, aux_scores_list, sign="paper", ties="average"):
    """Rank disagreement between the main (optimised) reward and the auxiliary ones: (N,).

    sign="paper": u = mean_k rank_aux_k - rank_main, > 0 when the main reward likes a sample more
    than the auxiliaries do ("main high, aux low", what reward hacking looks like).
    sign="released": the Astrolabe/GARDO code, u = rank_main - mean_k rank_aux_k, which selects
    the opposite disagreement (docs/method.md#selective-regularization; kept for replication).
    Σ_i u_i = 0 either way, so {u >= 0} is never empty.
    """
    if sign not in ("paper", "released"):
        raise ValueError(f"sign must be 'paper' or 'released', got {sign!r}")
    r_main = ranks(main_scores, ties)  # (N,)
    r_aux = torch.stack([ranks(a, ties) for a in aux_scores_list]).mean(0)  # (N,)
    if sign == "released":
        # u = rank_main - mean_k rank_aux_k
        return r_main - r_aux
    # u = mean_k rank_aux_k - rank_main
    return r_aux - r_main


def selective_threshold(u, rho):
    """τ = the (100 - 100ρ)-th percentile of {u : u >= 0}, or +inf when that set is empty.

    Linear interpolation (numpy's default = torch.quantile's) with the same float ops as the
    reference's np.percentile(., 100 - 100ρ). {u >= 0} is never empty for real ranks (see
    uncertainty); +inf makes an empty selection if it ever is.
    """
    nonneg = u[u >= 0].double()
    if nonneg.numel() == 0:
        return math.inf
    return torch.quantile(nonneg, (100 - rho * 100) / 100).item()


def selective_mask(u, rho):
    """Samples that get the reference term: mask = u > τ (N,) bool, τ = selective_threshold.

    Keeps roughly the top ρ of the non-negative u; ties at τ are left out (strict >, as the
    reference), so e.g. all-equal u >= 0 selects nothing.
    """
    return u > selective_threshold(u, rho)


def selective_kl_mask(scores, names, compensator, aux_rewards=0, sign="paper", ties="average"):
    """The samples under the reference term in selective mode: where the main reward (names[0]) and
    the auxiliary ones disagree most. scores: {name: (N,)}; compensator: the RiskCompensator whose
    rho is the selected fraction. Returns (N,) bool."""
    # the auxiliaries: every other reward, or the first aux_rewards of them (the release: 2)
    aux = names[1:] if aux_rewards == 0 else names[1:1 + aux_rewards]
    u = uncertainty(scores[names[0]], [scores[name] for name in aux], sign=sign, ties=ties)  # (N,)
    # rho adapts to this step's u before the mask is cut
    return selective_mask(u, compensator.update(u))


class RiskCompensator:
    """The adaptive fraction ρ of selected samples (reference class of the same name).

    Each RL step, m = mean of this step's u >= 0 is compared with the last `window` values:
      first call (empty buffer): ρ = base;  m > max(buffer): ρ <- 1.1ρ;  m < min(buffer): ρ <- 0.9ρ
    then ρ is clipped to [lo, hi] and m is appended (buffer keeps the last `window`).
    Call rho = update(u) once per step with the whole u (N,), *then* selective_mask(u, rho),
    as the reference does (its update takes the u >= 0 values; here the filter is inside).
    """

    def __init__(self, rho=0.1, lo=0.02, hi=0.2, rate=0.1, window=20):
        self.base, self.rho, self.lo, self.hi = rho, rho, lo, hi
        self.rate, self.window = rate, window
        self.buffer = []  # recent means of u >= 0, oldest first

    def update(self, u):
        nonneg = u[u >= 0].double()
        if nonneg.numel() == 0:
            return self.rho  # cannot happen for real ranks; the reference would append a NaN
        m = nonneg.mean().item()
        if not self.buffer:
            self.rho = self.base
        elif m > max(self.buffer):  # disagreement larger than anything recent: select more
            self.rho = self.rho * (1 + self.rate)
        elif m < min(self.buffer):  # smaller than anything recent: select less
            self.rho = self.rho * (1 - self.rate)
        self.rho = min(max(self.rho, self.lo), self.hi)
        self.buffer = (self.buffer + [m])[-self.window:]
        return self.rho

    def state_dict(self):
        return {"rho": float(self.rho), "buffer": [float(x) for x in self.buffer]}

    def load_state_dict(self, state):
        self.rho, self.buffer = float(state["rho"]), [float(x) for x in state["buffer"]]


# ----------------------------------------------------------------------------------------
# Dynamic reference (Astrolabe) and the parameter averages (old policy, EMA)

class DynamicReference:
    """Decides when to copy θ into the reference adapter (the reference's `old_ref` reset).

    Call step(kl) once after every RL step (= the reference's epoch: one optimizer step) with
    that step's KL (the reference: the *masked* ref_loss of each micro-batch, 0 where none is
    selected, averaged over the step's micro-batches and GPUs).
    It returns True when ref <- θ must happen now, before the next rollout, i.e. when
        kl > thres    or    gap = steps since the last reset > max_gap (15)
    and, on a reset, adapts the threshold (start 0.15):
        gap > max_gap: thres <- max(thres - 0.01, thres_min = 0.1)   (held too long: lower it)
        gap < min_gap: thres <- min(thres + 0.01, thres_max)         (too frequent: raise it)
    The released code writes min(thres + 0.01, 0.05), which forces thres <= 0.05 (more resets,
    the opposite of the intent); thres_max=0.05 reproduces that (train.py --released.ref-thres-cap). The
    default 0.5 is our reading of 5e-2 as a typo for 5e-1 (an inference: no source states the
    intended cap; docs/method.md#dynamic-reference).
    The reference is θ at step 0, so the first possible reset is after step 1.
    """

    def __init__(self, thres=0.15, max_gap=15, min_gap=5, delta=0.01, thres_min=0.1, thres_max=0.5):
        self.thres, self.max_gap, self.min_gap, self.delta = thres, max_gap, min_gap, delta
        self.thres_min, self.thres_max = thres_min, thres_max
        self.step_count = 0  # RL steps taken
        self.last_reset = 0  # step count at the last ref <- θ (0 = initialisation)

    def step(self, kl):
        self.step_count += 1
        gap = self.step_count - self.last_reset
        if not (kl > self.thres or gap > self.max_gap):
            return False
        if gap > self.max_gap:
            self.thres = max(self.thres - self.delta, self.thres_min)
        if gap < self.min_gap:  # thres <- min(thres + delta, thres_max)
            self.thres = min(self.thres + self.delta, self.thres_max)
        self.last_reset = self.step_count
        return True

    def state_dict(self):
        return {"thres": float(self.thres), "step_count": self.step_count,
                "last_reset": self.last_reset}

    def load_state_dict(self, state):
        self.thres = float(state["thres"])
        self.step_count, self.last_reset = int(state["step_count"]), int(state["last_reset"])


# (flat steps at d = 0, slope, cap) = the reference's return_decay(step, decay_type 0 / 1 / 2)
_OLD_DECAY = {"on-policy": (0, 0.0, 0.0), "linear": (0, 0.001, 0.5), "delayed": (75, 0.0075, 0.999)}


def old_decay(step, kind="linear"):
    """d in θ_old <- d·θ_old + (1 - d)·θ, applied after each RL step. step = optimizer steps done
    *including* this one (the reference passes global_step after incrementing it: 1, 2, ...).

    on-policy: d = 0 (copy); linear (Astrolabe, DiffusionNFT default): d = min(0.001·step, 0.5);
    delayed (DiffusionNFT OCR): d = 0 for step < 75, then min(0.0075·(step - 75), 0.999).
    """
    if kind not in _OLD_DECAY:
        raise ValueError(f"kind must be one of {list(_OLD_DECAY)}, got {kind!r}")
    flat, slope, cap = _OLD_DECAY[kind]
    # d = 0 if step < flat else min(slope·(step - flat), cap)
    return 0.0 if step < flat else min((step - flat) * slope, cap)


def ema_decay(step, decay=0.9):
    """Eval/export EMA of θ: d_n = min((1 + n)/(10 + n), 0.9), n = index of the optimizer step
    just taken (0 for the first; the reference calls ema.step before incrementing its counter)."""
    return min((1 + step) / (10 + step), decay)
