"""
What a run shows people, and nothing of the algorithm: the metrics log (RunLog: metrics.jsonl, the
progress bar, Weights & Biases), the fixed-prompt eval videos and their rows (evaluate), and the
end-of-run before/after figure and reward curve (save_before_after). train.py calls these from its
bookkeeping lines; nothing here changes the weights. Keys of metrics.jsonl: docs/metrics.md.

Test:  python -m pytest tests/test_train.py tests/test_worst_day.py -q

Shape legend: E eval videos, F latent frames, Fp decoded frames, Hp, Wp pixels.
"""
import dataclasses
import json
import math
import os

import torch
import torch.distributed as dist
from tqdm import tqdm

import runs
from common import log, save_curve, save_strip, save_video, seed_of, use_bf16, write_atomic
from lora import use_adapter
from streaming import rollout


class RunLog:
    """Rank 0's record of a run: one metrics.jsonl row per step and per eval, each naming the run's
    lineage (strict JSON; Weights & Biases too with --track), the tqdm bar and one print line per
    step. Other ranks keep quiet. A run first keeps only the rows of its own lineage up to the step
    it starts from (runs.metrics_rows): what a crash left after the checkpoint, a branch abandoned
    after it, or an interrupted run that never reached a checkpoint goes, said in one line."""

    def __init__(self, args, rank, world, device, start, mem_start, lineage):
        self.args, self.master, self.mem_start, self.lineage = args, rank == 0, mem_start, lineage["id"]
        self.path = os.path.join(args.out_dir, "metrics.jsonl")  # one JSON object per line
        # steps in a row with most prompt groups flat / the reference term over half the loss
        self.streaks = {"flat": 0, "ref": 0}
        if self.master and os.path.exists(self.path):
            kept, dropped = runs.metrics_rows(self.path, start, lineage)
            write_atomic(self.path, lambda tmp: _write_lines(tmp, kept))
            if dropped:
                log(f"warning: {self.path}: dropped {dropped} row(s) after step {start}, of another run or branch, "
                    f"or damaged; this run's rows replace them")
        self.wandb = start_tracking(args) if args.track and self.master else None  # --track only
        # the bar counts RL steps; a resumed run starts it where the checkpoint left off
        self.bar = tqdm(total=args.steps, initial=start, disable=not (self.master and args.progress),
                        dynamic_ncols=True, desc="RL")
        # what runs where: ranks, device, dtype, the batch layout, the memory levers
        N = args.prompts_per_step * args.group_size
        dtype = torch.bfloat16 if use_bf16(args, device) else torch.float32
        log(f"{world} rank(s) on {device} ({dtype}); global batch {args.prompts_per_step} prompts x "
            f"{args.group_size} videos = {N} per step, micro-batch {args.micro_batch} per rank; rewards {args.rewards}")
        cache = "global" if args.local_attn < 0 else args.local_attn
        log(f"memory levers: bf16 {use_bf16(args, device)}, grad checkpointing {args.grad_checkpointing}, window "
            f"{args.window or args.num_frames} of {args.num_frames} frames, cache {cache} (sink {args.sink}), "
            f"decode batch {args.decode_batch}")

    def write(self, row):
        """One row of metrics.jsonl (rank 0). Non-finite numbers become null: strict JSON has no NaN."""
        if not self.master:
            return
        # NaN / inf -> null (a skipped step's grad_norm is NaN); the lineage right after the step
        row = {"step": row["step"], "lineage": self.lineage, **row}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as f:  # appended: a crash loses at most the row being written
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        if self.wandb:
            self.wandb.log(row, step=row["step"])

    def warn_if_stuck(self, row):
        """One warning when a run cannot learn for a stated reason, once it has held 3 steps in a row
        (README, "When the reward does not rise")."""
        n = row["step"]
        self.streaks["flat"] = self.streaks["flat"] + 1 if row["diag/flat_groups"] >= 0.5 else 0
        self.streaks["ref"] = self.streaks["ref"] + 1 if row["diag/ref_share"] >= 0.5 else 0
        if self.streaks["flat"] == 3:
            log(f"warning: steps {n - 2}-{n}: in most prompt groups every video got the same reward "
                f"({self.args.group_size} per prompt), so r = 1/2 and no gradient: a reward that cannot tell these "
                f"videos apart? (more --group-size, another reward; diag/flat_groups in metrics.jsonl)")
        if self.streaks["ref"] == 3:
            log(f"warning: steps {n - 2}-{n}: the reference term is over half the loss, so the step mostly pulls "
                f"back to the reference (lower --kl-weight; diag/ref_share in metrics.jsonl)")

    def step(self, n, multi, scores, r, kl_mask, stats, grad_norm, opt, s, clock, skipped):
        """The row of step n (1-based), the bar and the print line."""
        # the raw total R = Σ_j w_j R_j (with --reward-norm per-reward the advantage used normalised terms)
        total = multi.total(scores)  # (N,)
        row = {"step": n, "reward_mean": total.mean().item(), "reward_std": total.std().item()}
        for name in multi.names:
            row[f"rewards/{name}/mean"] = scores[name].mean().item()
        row.update({"window_start": s, "r_mean": r.mean().item(), "loss": stats["loss"], "kl": stats["kl"],
                    "kl_all": stats["kl_all"], "mask_frac": kl_mask.float().mean().item(), "grad_norm": grad_norm,
                    "lr": opt.param_groups[0]["lr"], "skipped": skipped})
        row.update(diagnostics(total, r, self.args.group_size, stats, self.args.kl_weight))  # diag/*
        row.update(clock.row(self.mem_start))  # time/*_s and mem/*_mb
        self.write(row)
        if self.master:
            self.warn_if_stuck(row)
        self.bar.update(1)
        if not self.master:
            return
        self.bar.set_postfix(reward=f"{row['reward_mean']:.4f}", loss=f"{row['loss']:.4f}", kl=f"{row['kl']:.2e}")
        msg = (f"step {n}/{self.args.steps} | reward {row['reward_mean']:.4f} | loss {row['loss']:.5f} | kl "
               f"{row['kl']:.2e} | |r-1/2| {row['diag/r_dev']:.3f} | grad {grad_norm:.2e} | {row['time/step_s']:.1f}s")
        if row["diag/flat_groups"] > 0:  # only when some groups taught nothing
            msg += f" | flat groups {row['diag/flat_groups']:.0%}"
        if self.args.progress:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self):
        """The end of the run: the bar, the out-dir's lock (rank 0), the process group (torchrun)."""
        self.bar.close()
        if self.master:
            runs.release_lock(self.args.out_dir)
        if dist.is_initialized():  # torchrun, any number of processes
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Diagnostics: the signals that explain a reward curve that does not rise (docs/metrics.md)

# a group is flat when its rewards' std is at most this: a tenth of the advantage's eps (1e-4 in
# nft_loss.group_advantages), so its advantages are at most a tenth of a real group's
FLAT_STD = 1e-5


def diagnostics(total, r, K, stats, kl_weight):
    """diag/* of one step. total (N,) the rewards R, r (N,) optimality probabilities, K the group size,
    stats all_reduce_step's means. Sample j is candidate j % K of prompt j // K."""
    groups = total.double().view(-1, K)  # (G, K): one row per prompt
    # flat: std_k R <= FLAT_STD; such a group gives r = 1/2 to all its videos, hence no gradient
    flat = groups.std(dim=1, correction=0) <= FLAT_STD  # (G,)
    loss = stats["loss"]
    return {"diag/flat_groups": flat.float().mean().item(),
            # mean |r - 1/2|: 0 = the step pushes towards and away from nothing; 1/2 = all at the clip
            "diag/r_dev": (r.double() - 0.5).abs().mean().item(),
            # mean ||x̂_θ - x̂_old||²: 0 while θ_old = θ, when NFT's step is a plain signed,
            # advantage-weighted regression (its trust region acts only once θ has moved from θ_old)
            "diag/theta_old_mse": stats["theta_old"],
            # λ · reference term / loss: how much of the loss pulls back towards the reference
            "diag/ref_share": kl_weight * stats["kl"] / loss if loss > 0 else 0.0}


def pick_eval_prompts(prompts, n):
    """n of the training prompts that between them use as many different words as possible: each
    next one brings the most words not yet used (the earliest on ties), so the eval (and the
    before/after figure) spans colours, shapes and directions rather than one corner of the set.
    >>> pick_eval_prompts(["a red circle", "a blue circle", "a red square", "a blue square"], 2)
    ['a red circle', 'a blue square']
    """
    chosen, seen = [], set()
    for _ in range(min(n, len(prompts))):
        left = [p for p in prompts if p not in chosen]
        best = max(left, key=lambda p: len(set(p.lower().split()) - seen))  # max keeps the first on ties
        chosen.append(best)
        seen |= set(best.lower().split())
    return chosen


def _write_lines(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in rows)


def start_tracking(args):
    """A Weights & Biases run for --track (wandb is imported only then: it is optional)."""
    import wandb
    wandb.init(project="astrolabe", config=dataclasses.asdict(args), dir=args.out_dir)
    return wandb


@torch.no_grad()
def eval_videos(model, frozen, prompts, args, adapter):
    """The whole video for fixed prompts and seeds with `adapter` (None = base): (E, Fp, 3, Hp, Wp),
    --rollout-batch videos per rollout (one KV cache for the whole video each)."""
    # eval seeds from their own stream: the same videos at every eval, none a training rollout's
    seeds = [seed_of(args.seed, "eval", i) for i in range(len(prompts))]
    videos, m = [], args.rollout_batch or args.micro_batch
    for i in range(0, len(prompts), m):
        ctx = frozen.embed(prompts[i:i + m])
        with use_adapter(model, adapter):
            lat = rollout(model, ctx, seeds[i:i + m], args.num_frames, args)
        videos.append(frozen.decode(lat))
    return torch.cat(videos)


def evaluate(model, frozen, multi, prompts, args, adapter, n, runlog):
    """The policy `adapter` on the eval prompts (rank 0): an mp4 and an eval row. Returns the videos."""
    if not runlog.master:  # rank 0 evaluates; the others go on to the next step's rollout
        return None
    videos = eval_videos(model, frozen, prompts, args, adapter)
    scores = multi.score(videos, prompts)  # {name: (E,)}
    total = multi.total(scores)  # R = Σ_j w_j R_j
    save_video(os.path.join(args.out_dir, "eval", f"step_{n:06d}.mp4"),
               torch.cat(list(videos), dim=-1))  # the eval prompts side by side
    row = {"step": n, "eval/reward_mean": total.mean().item()}
    for name, value in scores.items():
        row[f"eval/rewards/{name}/mean"] = value.mean().item()
    runlog.write(row)
    log(f"eval step {n}: reward {row['eval/reward_mean']:.4f}")
    return videos


def save_before_after(model, frozen, prompts, args, policy, after, runlog, n_train_prompts):
    """What RL changed, for people (rank 0): before/after videos and labelled frames, and the reward
    curve (per-epoch means of the training reward, and the eval reward)."""
    if not runlog.master:
        return
    before = eval_videos(model, frozen, prompts, args, None)  # None = adapters off = the base
    if after is None:
        after = eval_videos(model, frozen, prompts, args, policy)
    out = args.out_dir
    # top half: before, bottom half: after; the prompts side by side
    grid = torch.cat([torch.cat(list(before), -1), torch.cat(list(after), -1)], -2)
    save_video(os.path.join(out, "before_after.mp4"), grid)
    pairs, labels = [], []
    for prompt, b, a in zip(prompts, before, after):  # base_0, after_0, base_1, after_1, ...
        pairs += [b, a]
        labels += [f"base: {prompt}", f"after RL: {prompt}"]
    save_strip(os.path.join(out, "before_after.png"), pairs, labels=labels)
    with open(runlog.path) as f:
        rows = [json.loads(line) for line in f]
    series = {}
    # an epoch = the steps that draw every training prompt once (--released.prompt-draw epoch-walk),
    # so its mean reward compares across epochs; a single step's mean mostly says which prompts came
    by_epoch = {}
    for r in rows:
        if "reward_mean" in r and r["reward_mean"] is not None:
            epoch = (r["step"] - 1) * args.prompts_per_step // n_train_prompts
            by_epoch.setdefault(epoch, []).append((r["step"], r["reward_mean"]))
    if by_epoch:
        ends = [max(s for s, _ in v) for v in by_epoch.values()]  # plotted at each epoch's last step
        means = [sum(x for _, x in v) / len(v) for v in by_epoch.values()]
        series["train reward, epoch mean"] = (ends, means)
    evals = [r for r in rows if r.get("eval/reward_mean") is not None]
    if evals:
        series["eval reward (fixed prompts)"] = ([r["step"] for r in evals], [r["eval/reward_mean"] for r in evals])
    if series:
        save_curve(os.path.join(out, "reward_curve.png"), series, title=f"reward: {' + '.join(args.rewards)}")
    log(f"wrote {out}/before_after.mp4, before_after.png, reward_curve.png")
