"""
Pre-training of the tiny model: CausalWanModel(CONFIGS["tiny"]) learns to be a 4-step AR sampler
of the shapes world (tiny_world.py), the base model of the default `python train.py` run.

Diffusion forcing, flow matching, pixel space, 32x32, clips of 9 frames = 3 blocks: every block
gets its own timestep, one of the sampler's 4 warped timesteps or 0 (clean context, as the
sampler's t = 0 cache pass provides at inference); x_t = (1 - σ) x0 + σ eps per block; the
block-causal forward predicts the velocity v; loss = MSE(v, eps - x0) on the noisy blocks only.
Training on exactly the sampler's timesteps is what makes 4 steps enough.

Run:   python tools/pretrain_tiny.py                 (~23 min on 2 CPU cores; writes assets/)
       python pretrain_tiny.py --steps 2 --batch 4 --out /tmp/tw.safetensors   (smoke test)
Test:  python -m pytest tests/test_tiny_world.py -q

Shape legend: B batch (b: one sampling batch), F frames, C = 3 channels (RGB, pixel space),
H, W pixels, n frames per block (3), K blocks (F / n), P prompts, Lt, Dt text tokens and width.
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import tyro
from safetensors.torch import save_file
from tqdm import tqdm

# a tool, not part of the algorithm: the repository root on the import path, so that
# `python tools/pretrain_tiny.py` (from anywhere) finds train.py, model.py and the rest
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from frozen import to_pixels
from kvcache import KVCache
from model import CONFIGS, CausalWanModel
from sample import GeneratorNoise, generate, make_generators, sampler_timesteps, sigma_of
from tiny_world import PROMPTS, RADIUS, SPEED, color_match, direction_match, parse_prompt, render, toy_text_embed


# ----------------------------------------------------------------------------------------------
# Prompt following of the real sampler, measured with the reward detectors

@torch.no_grad()
def evaluate_prompt_following(model, n=32, frames=9, seed=0, H=32, W=32, batch=32):
    """Sample n videos (4-step AR sampler, fresh KVCache per batch, per-video noise seeds) for n
    prompts drawn from PROMPTS (a seeded permutation, cycled), and score them.

    colour_acc: fraction with color_match > 0.5 (most foreground pixels are the named
    colour); direction_acc: fraction with direction_match > 0.5 (the centroid moves the
    named way in most frame pairs). Chance is 1/4 for each. Also returns the mean raw scores.
    """
    cfg, g = model.cfg, torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(PROMPTS), generator=g).tolist()
    prompts = [PROMPTS[perm[i % len(PROMPTS)]] for i in range(n)]
    was_training = model.training
    model.eval()
    cm, dm = [], []
    for i in range(0, n, batch):
        ps = prompts[i:i + batch]
        ctx = toy_text_embed(ps, cfg.text_len, cfg.text_dim)
        cache = KVCache.for_model(cfg, len(ps), frames, (H, W), 0, -1)
        noise = GeneratorNoise(make_generators([seed * 100003 + i + j for j in range(len(ps))]),
                               (cfg.in_dim, H, W))
        v = to_pixels(generate(model, ctx, cache, frames, noise))  # [b, F, 3, H, W]
        cm.append(color_match(v, ps))
        dm.append(direction_match(v, ps))
    model.train(was_training)
    cm, dm = torch.cat(cm), torch.cat(dm)
    return {"n": n, "frames": frames, "color_acc": (cm > 0.5).float().mean().item(),
            "direction_acc": (dm > 0.5).float().mean().item(),
            "color_match_mean": cm.mean().item(), "direction_match_mean": dm.mean().item()}


# ----------------------------------------------------------------------------------------------
# Pre-training

@dataclass
class Args:
    steps: int = 2800
    """optimizer steps (~0.45 s/step at batch 8 on 2 idle CPU cores: ~21 min)"""
    batch: int = 8
    """clips per step"""
    frames: int = 9
    """frames per clip (3 blocks of 3)"""
    lr: float = 1e-3
    """peak AdamW learning rate (linear warmup, then cosine decay to lr / 10)"""
    warmup: int = 100
    """warmup steps"""
    p_clean: float = 0.5
    """probability that a block is clean context (t = 0, no loss) instead of noised; 0.25 (with
    1400 steps at batch 16) learnt colours but not motion, 0.5 learnt both"""
    seed: int = 0
    """seed of the model init, the data and the noise"""
    eval_n: int = 64
    """videos sampled for the final prompt-following check (0: skip)"""
    eval_every: int = 250
    """steps between quick sample checks on 16 videos (0: never)"""
    out: str = "assets/tiny_world.safetensors"
    """weights path; the metadata JSON goes next to it with the .json suffix"""


def lr_at(step, args):
    """Linear warmup then cosine from lr to lr / 10: big steps early, a quiet finish."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    p = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def main(args: Args):
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)  # CPU: denormal softmax tails make attention ~3x slower
    torch.manual_seed(args.seed)  # the model init is part of what the seed reproduces
    cfg = CONFIGS["tiny"]
    model = CausalWanModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    n, K = cfg.frames_per_block, args.frames // cfg.frames_per_block
    assert args.frames % n == 0, "frames must be whole blocks"
    g = torch.Generator().manual_seed(args.seed)  # data + noise: one stream, reproducible
    # per-block noise levels: the sampler's 4 timesteps, plus t = 0 (clean context) at index 4
    ts, sig = sampler_timesteps()
    t_levels = torch.cat([ts, torch.zeros(1)])
    s_levels = torch.cat([sigma_of(ts), torch.zeros(1)])  # exact 0: the cache pass sees x0 itself
    probs = torch.tensor([(1 - args.p_clean) / 4] * 4 + [args.p_clean])
    ctx_all = toy_text_embed(PROMPTS, cfg.text_len, cfg.text_dim)  # [len(PROMPTS), Lt, Dt], fixed words
    specs = [parse_prompt(p) for p in PROMPTS]
    ema, t0, bar = None, time.time(), tqdm(range(args.steps), desc="pre-train")
    for step in bar:
        idx = torch.randint(len(PROMPTS), (args.batch,), generator=g)
        x0 = render([specs[i] for i in idx], args.frames, generator=g)  # [B, F, 3, 32, 32]
        lvl = torch.multinomial(probs, args.batch * K, replacement=True, generator=g).view(args.batch, K)
        t = t_levels[lvl].repeat_interleave(n, dim=1)                   # [B, F] per-frame timesteps
        sigma = s_levels[lvl].repeat_interleave(n, dim=1).view(args.batch, args.frames, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=g)
        v = model((1 - sigma) * x0 + sigma * eps, t, ctx_all[idx])      # block-causal forward
        noisy = (t > 0).float()                                         # [B, F] loss mask
        per_frame = (v - (eps - x0)).pow(2).mean((2, 3, 4))             # [B, F]
        loss = (per_frame * noisy).sum() / noisy.sum().clamp(min=1)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()  # smoothed loss
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr_at(step, args):.1e}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            r = evaluate_prompt_following(model, n=16, frames=args.frames, seed=1)
            bar.write(f"step {step + 1}: loss {ema:.4f}  colour acc {r['color_acc']:.2f}  "
                      f"direction acc {r['direction_acc']:.2f}  (16 samples)")
    train_s = time.time() - t0
    result = evaluate_prompt_following(model, n=args.eval_n, frames=args.frames) if args.eval_n else {}
    if result:
        print(f"samples (n={result['n']}): colour acc {result['color_acc']:.3f}, direction acc "
              f"{result['direction_acc']:.3f} (chance 0.25 each)")
    # write to temporary names, then rename: a crash never leaves a half-written asset
    out = args.out
    meta_path = os.path.splitext(out)[0] + ".json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out + ".tmp")
    meta = {"config": asdict(cfg), "steps": args.steps, "batch": args.batch, "frames": args.frames,
            "lr": args.lr, "warmup": args.warmup, "p_clean": args.p_clean, "seed": args.seed,
            "speed_px_per_frame": SPEED, "radius_px": RADIUS, "resolution": [32, 32],
            "final_loss_smoothed": ema, "wall_time_s": round(train_s, 1),
            "torch_version": torch.__version__, "prompts": len(PROMPTS), "samples": result}
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(out + ".tmp", out)
    os.replace(meta_path + ".tmp", meta_path)
    print(f"wrote {out} and {meta_path} ({train_s:.0f} s of training, loss {ema:.4f})")
    return meta


if __name__ == "__main__":
    main(tyro.cli(Args))
