"""
Slow, obviously-correct loop versions of nft_loss.py (llm.c style reference): plain Python
floats and loops, one sample and one element at a time. Only the tests import this.
"""
import math


def advantages(rewards, groups, global_std=False, eps=1e-4):
    """A_i = (R_i - mean of R over i's group) / (population std + eps)."""
    n = len(rewards)
    mu_all = sum(rewards) / n
    std_all = math.sqrt(sum((x - mu_all) ** 2 for x in rewards) / n)
    out = []
    for i in range(n):
        members = [rewards[j] for j in range(n) if groups[j] == groups[i]]
        mu = sum(members) / len(members)
        std = std_all if global_std else math.sqrt(sum((x - mu) ** 2 for x in members) / len(members))
        out.append((rewards[i] - mu) / (std + eps))
    return out


def optimality_prob(a, adv_clip=5.0):
    a = max(-adv_clip, min(adv_clip, a))
    return max(0.0, min(1.0, 0.5 + a / (2 * adv_clip)))


def policy_loss(x_theta, x_old, x0, r, beta, adaptive=False, adv_clip=5.0):
    """Per-sample NFT loss; x_* are lists (one per sample) of flat lists of floats."""
    out = []
    for xt, xo, y, rb in zip(x_theta, x_old, x0, r):
        n = len(y)
        pos = [beta * t + (1 - beta) * o for t, o in zip(xt, xo)]
        neg = [(1 + beta) * o - beta * t for t, o in zip(xt, xo)]
        e_pos = sum((p - v) ** 2 for p, v in zip(pos, y)) / n
        e_neg = sum((q - v) ** 2 for q, v in zip(neg, y)) / n
        if adaptive:
            w_pos = max(sum(abs(p - v) for p, v in zip(pos, y)) / n, 1e-5)
            w_neg = max(sum(abs(q - v) for q, v in zip(neg, y)) / n, 1e-5)
            out.append(adv_clip * (rb * e_pos / w_pos / beta + (1 - rb) * e_neg / w_neg / beta))
        else:
            out.append(rb * e_pos + (1 - rb) * e_neg)
    return out


def ranks(scores, ties="average"):
    """rank 1 = highest; ties share the average rank, or (ordinal) the earlier sample wins."""
    out = []
    for i, s in enumerate(scores):
        greater = sum(1 for t in scores if t > s)
        equal = sum(1 for t in scores if t == s)
        if ties == "average":
            out.append(greater + (equal + 1) / 2)
        else:
            out.append(greater + 1 + sum(1 for j in range(i) if scores[j] == s))
    return out


def uncertainty(main, auxes, sign="paper"):
    rm = ranks(main)
    ra = [sum(ranks(a)[i] for a in auxes) / len(auxes) for i in range(len(main))]
    if sign == "released":
        return [m - a for m, a in zip(rm, ra)]
    return [a - m for m, a in zip(rm, ra)]


def percentile(values, p):
    """Linear interpolation between closest ranks (numpy's default method)."""
    v = sorted(values)
    pos = p / 100 * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])
