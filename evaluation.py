"""
The frozen ends of the pipeline and what a run shows people: text embeddings and decoding
(FrozenParts), the rewards of a batch of latent videos (score_videos), the fixed-prompt eval
videos and their metrics rows, and the end-of-run before/after figure and reward curve.
train.py calls these; nothing here changes the weights.

Test:  python -m pytest tests/test_train.py tests/test_presets.py -q

Shape legend: B videos, F latent frames, Fp their decoded frames, C latent channels, h, w latent
height and width, Hp, Wp pixels, Lt, Dt text tokens and width, E eval videos.
"""
import dataclasses
import json
import math
import os

import torch

import tiny_world
from common import log, save_curve, save_strip, seed_of, use_bf16, write_atomic
from frozen import TextEncoder, WanVAE
from model import CONFIGS
from sample import save_video, to_pixels
from streaming import rollout


class FrozenParts:
    """The frozen ends of the pipeline: embed(prompts) -> (B, Lt, Dt) text embeddings and
    decode(latents) -> videos (B, Fp, 3, Hp, Wp) in [0, 1].

    tiny: the toy word embeddings, and latents are already pixels. Real models: umT5 embeds every
    training prompt once (on the GPU, then it is freed before the DiT loads; the embeddings wait
    on the CPU) and the Wan VAE decodes --decode-batch videos at a time.
    """
    def __init__(self, args, prompts, device):
        self.args, self.device, self.vae, self.table = args, device, None, {}
        if args.model == "tiny":
            return
        missing = [f"--{f.replace('_', '-')}" for f in ("vae", "text_encoder") if not getattr(args, f)]
        if missing:
            raise SystemExit(f"--model {args.model} needs {' and '.join(missing)} (README, Real models)")
        half = torch.bfloat16 if use_bf16(args, device) else torch.float32
        te = TextEncoder.load(args.text_encoder, args.tokenizer, device=device, dtype=half)
        for i in range(0, len(prompts), 8):  # rows are (512, 4096) each: keep them on the CPU
            self.table.update(zip(prompts[i:i + 8], te(prompts[i:i + 8]).to("cpu", half)))
        del te
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # umT5-XXL's 11 GB leave the GPU before the DiT arrives
        self.vae = WanVAE.load(args.vae, device=device)  # float32, as diffusers recommends for it

    def embed(self, prompts):
        if self.vae is None:  # tiny: fixed per-word vectors
            cfg = CONFIGS["tiny"]
            return tiny_world.toy_text_embed(prompts, cfg.text_len, cfg.text_dim).to(self.device)
        return torch.stack([self.table[p] for p in prompts]).to(self.device)

    def decode(self, lat):
        if self.vae is None:  # tiny: pixel space already
            return to_pixels(lat)
        b = self.args.decode_batch
        # (B, F, 16, h, w) -> (B, Fp = 1 + 4 (F - 1), 3, Hp = 8h, Wp = 8w), b videos per VAE call
        return torch.cat([to_pixels(self.vae.decode(lat[i:i + b].float())) for i in range(0, len(lat), b)])


@torch.no_grad()
def score_videos(frozen, multi, lat, prompts, chunk):
    """Rewards of latent videos (B, T, C, H, W), decoded `chunk` videos at a time, so that only one
    chunk is ever held in pixels (at 480x832 one 81-frame video is 0.4 GB in float32). Returns
    (total (B,), {name: (B,)}); each reward scores every video on its own, so chunks change no
    number."""
    totals, per = [], {}
    for i in range(0, len(lat), chunk):
        total, scores = multi(frozen.decode(lat[i:i + chunk]), prompts[i:i + chunk])  # pixels in [0, 1]
        totals.append(total)
        for name, value in scores.items():
            per.setdefault(name, []).append(value)
    return torch.cat(totals), {name: torch.cat(values) for name, values in per.items()}


@torch.no_grad()
def eval_videos(model, frozen, prompts, args, adapter):
    """The whole video for fixed prompts and seeds with `adapter` (None = base): (E, F, 3, Hp, Wp),
    --rollout-batch videos per rollout (one KV cache for the whole video each)."""
    seeds = [seed_of(args.seed, "eval", i) for i in range(len(prompts))]
    videos, m = [], args.rollout_batch or args.micro_batch
    for i in range(0, len(prompts), m):
        ctx = frozen.embed(prompts[i:i + m])
        lat = rollout(model, ctx, seeds[i:i + m], args.num_frames, args, adapter)
        videos.append(frozen.decode(lat))
    return torch.cat(videos)


def start_tracking(args):
    """A Weights & Biases run for --track (wandb is imported only then: it is optional)."""
    import wandb
    wandb.init(project="astrolabe", config=dataclasses.asdict(args), dir=args.out_dir)
    return wandb


def write_row(path, row, wandb=None):
    """One JSON line of metrics.jsonl (and wandb with --track). Non-finite numbers become null:
    strict JSON has no NaN or Infinity."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    with open(path, "a") as f:
        f.write(json.dumps(clean, allow_nan=False) + "\n")
    if wandb:
        wandb.log(row, step=row["step"])


def write_rows(path, rows):
    """metrics.jsonl with exactly these rows (written to a temporary file, then renamed)."""
    write_atomic(path, lambda tmp: _write_lines(tmp, rows))


def _write_lines(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in rows)


def evaluate(model, frozen, multi, prompts, args, adapter, n, metrics_path, wandb=None):
    """The EMA (or current) policy on the eval prompts: an mp4 and an eval row. Returns the videos."""
    videos = eval_videos(model, frozen, prompts, args, adapter)
    total, per = multi(videos, prompts)
    save_video(os.path.join(args.out_dir, "eval", f"step_{n:06d}.mp4"),
               torch.cat(list(videos), dim=-1))  # the eval prompts side by side
    row = {"step": n, "eval/reward_mean": total.mean().item()}
    for k, v in per.items():
        row[f"eval/rewards/{k}/mean"] = v.mean().item()
    write_row(metrics_path, row, wandb)
    log(f"eval step {n}: reward {row['eval/reward_mean']:.4f}")
    return videos


def save_before_after(model, frozen, prompts, args, policy, after, metrics_path, n_train_prompts):
    """What RL changed, for people: before/after videos and labelled frames, and the reward
    curve (per-epoch means of the training reward, and the eval reward)."""
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
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    series = {}
    # an epoch = the steps that draw every training prompt once (--prompt-draw epoch-walk), so
    # its mean reward compares across epochs; a single step's mean mostly says which prompts came
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
