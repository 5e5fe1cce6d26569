"""
The memory model: what one RL step of train.py holds at its peak, predicted from the run's
config before anything loads (train.py prints it at start and stops when it exceeds the memory the
process can have; sample.py checks its own peak the same way; tools/bench.py memory measures it); and
train_flops, the FLOPs of one training forward and backward (tools/bench.py gpu's MFU).

    static      frozen base weights, every LoRA adapter (float32)
    optimizer   theta's gradients and AdamW's two moments (float32), from the first update on
    rollout     the window's KV caches (--rollout-batch videos, the cache's capacity) + the
                histories before the window (streaming, s > 0) + one model call's working set
    update      histories + a micro-batch's stacked copy of them + the activations autograd
                saves in the x_theta forward (all blocks, or with --grad-checkpointing each
                block's input and one block's worth) + the backward's gradient buffers
    decode      the VAE's working set for --decode-batch videos (real models): whole frames, or
                one --vae-tile tile and the decoded tiles (vae_decode_bytes)
    reward      the pixels and the copy each reward gets; learned reward models' weights and
                their activations for one chunk of frames
    eval        the periodic eval's whole videos: a KV cache for each of a rollout batch
    reward_model  a Qwen2-VL reward (HPSv3, VideoAlign) and one forward, on the GPU only while it scores
peak = static + optimizer + max(rollout, update, eval, reward_model) + decode + reward.

Activations are counted from what autograd saves per transformer block, element by element
(tests/test_scale.py checks the counts against torch's saved-tensor hooks); attention never
stores a score matrix (SDPA's flash / memory-efficient kernels), but a query block whose keys
are two runs (sink + window, clean prefix + own block) attends to a concatenated copy.

Test:  python -m pytest tests/test_scale.py -q
Run:   python tools/bench.py memory      (measured next to predicted, and every preset at real size)

Shape legend: Ly layers, D model dim, Df FFN dim, r LoRA rank, P tokens per latent frame, h, w
latent (tiny: pixel) height/width, F latent frames of the whole video, T of the window, m
micro-batch, n samples per rank, E eval videos per rollout, Lt text tokens, b bytes per element;
train_flops: Nt token rows through a block, Nq of them past their K and V, p pixels per patch,
M rows of one linear, I -> O its features.
"""
import os

import torch

from common import UsageError, log
from lora import add_adapter, adapter_numel
from kvcache import attention_plan, clean_context_frames
from model import CausalWanModel

GB = 2 ** 30

# bytes autograd saves per token and layer of the x_theta forward, as (per D, per Df, per r),
# in two parts. "kv": what every token keeps, its K and V being needed by later queries: norm1's
# input, the modulated input of the k/v projections, k before its RMSNorm, and A x of the k and v
# LoRA. "query": what a token whose output is computed adds: q before its norm, roped q, the
# attention output and its concatenation, the residual, norm3's input and output, cross q before
# and after its norm, the cross-attention output, norm2's input, the FFN input (11 D), the FFN
# hidden before and after GELU (2 Df), A x of the q, o, cross q, cross o and FFN LoRA (6 r).
# float32: 4 bytes each. bf16 autocast: bf16 where autocast computes, float32 where the model
# upcasts (the norms' inputs, q/k before RMSNorm), plus autocast's bf16 copy of every LoRA input.
# The roped K and V themselves are counted apart (kept_keys), as are autocast's bf16 copies of
# each layer's A and B.
SAVED_BYTES = {torch.float32: {"kv": (12, 0, 8), "query": (44, 8, 24)},
               torch.bfloat16: {"kv": (12, 0, 4), "query": (34, 4, 12)}}

# the Wan2.1 VAE decoding frame by frame (diffusers' feature cache), float32: its working set is
# VAE_DECODE_FIXED + VAE_BYTES_PER_PIXEL x (output height x width), whatever the frame count; a
# straight line through the peaks measured on a CPU (random weights, glibc's mmap threshold fixed,
# docs/benchmarks.md) at 64x64, 128x128, 256x256, 240x416 and 480x832 pixels, each within 1% of it
# (8.0 GiB at 480x832); its 127 M float32 weights
VAE_BYTES_PER_PIXEL = 21.0e3
VAE_DECODE_FIXED = 30e6
VAE_WEIGHTS = 127e6 * 4
# --vae-tile: diffusers' tiled decode (AutoencoderKLWan.tiled_decode) cuts the latent into tiles of
# `tile` pixels every 3/4 tile (its default: 256 every 192), decodes each tile over all frames with
# the working set above, keeps every decoded tile, then blends them into rows, concatenates the rows
# and clamps: the tiles + 3 whole videos at the end
# (measured on a CPU within 2.1% for tiles of 128 and 160; tiles of 64 carry overhead this does not
# count, 1.4x the prediction: docs/benchmarks.md)
VAE_TILE_STRIDE = 3 / 4
VAE_TILE_ASSEMBLY = 3

# learned rewards: float32 parameters (open_clip / torchvision architectures, counted), and a
# forward's working set per image of a chunk (CHUNK = 32 in reward_models.py), no grad
REWARD_PARAMS = {"hpsv2": 986e6, "clip_score": 428e6, "aesthetic": 428e6 + 0.9e6, "dynamic_degree": 5.3e6}
REWARD_CHUNK_BYTES = {"hpsv2": 32 * 257 * 1280 * 12 * 4, "clip_score": 32 * 257 * 1024 * 12 * 4,
                      "aesthetic": 32 * 257 * 1024 * 12 * 4, "dynamic_degree": 32 * 1.5e8}
# the Qwen2-VL rewards: (parameters, a forward's working set in bf16). They sit on the GPU only
# while they score (reward_hpsv3 / reward_videoalign move the model back to the CPU after each
# call), so they compete with the rollout and the update for the peak instead of adding to it.
# Parameters counted from the real configs (the lm_head is never built): HPSv3 7.745 B
# (Qwen2-VL-7B: vision 0.676 B + language model 7.069 B), VideoAlign 2.209 B (Qwen2-VL-2B: 0.665 B
# + 1.543 B). Working set of one forward of the released batch (4 frames of ~830 tokens; 4 videos of
# ~2,100 tokens), measured on a CPU in bf16 at the real widths and token counts with 2 layers (a
# no-grad forward holds one layer's intermediates at a time; peak RSS growth, docs/rewards.md):
# HPSv3 465 MiB, VideoAlign 869 MiB (float32: 914, 1518)
VLM_REWARDS = {"hpsv3": (7.745e9, 465 * 2 ** 20),
               **{f"videoalign_{d}": (2.209e9, 869 * 2 ** 20) for d in ("vq", "mq", "ta", "mq_rgb")}}


def parameter_counts(cfg, rank):
    """(base parameters, parameters of one LoRA adapter of `rank`), counted on the meta device."""
    with torch.device("meta"):
        m = CausalWanModel(cfg)
        base = sum(p.numel() for p in m.parameters())
        add_adapter(m, "count", rank)
    return base, adapter_numel(m, "count")


def kept_keys(plan, q_from=0, tokens=0, history_tokens=0):
    """Key tokens one layer keeps for backward (K and V each, per video) when its queries are the
    plan's blocks from token q_from on: a block attending to one run reads a view of the whole K
    (the call's own tokens, behind the history's when there is one), which attention then keeps;
    a block attending to two or more runs reads a torch.cat copy of them."""
    blocks = [runs for (lo, _), runs in plan if lo >= q_from]
    copies = sum(sum(hi - lo for lo, hi in runs) for runs in blocks if len(runs) > 1)
    whole = history_tokens + tokens if any(len(runs) == 1 for runs in blocks) else 0
    return copies + whole


def saved_activations(cfg, rank, dtype, layers, text=0):
    """Bytes autograd keeps for backward in one forward: `layers` lists, per block, (tokens,
    query tokens, kept key tokens) summed over the batch (kept_keys); `text` tokens of the
    cross-attention context."""
    kv, query = SAVED_BYTES[dtype]["kv"], SAVED_BYTES[dtype]["query"]
    b = torch.finfo(dtype).bits // 8
    d, f = cfg.dim, cfg.ffn_dim
    total = 0
    for tokens, q_tokens, keys in layers:
        total += tokens * (kv[0] * d + kv[1] * f + kv[2] * rank)
        total += q_tokens * (query[0] * d + query[1] * f + query[2] * rank)
        # the roped K and V that attention keeps, and the text side's k/v and their LoRA's A x
        total += 2 * keys * d * b + text * 6 * d * b + text * 2 * rank * b
        if dtype == torch.bfloat16:  # autocast's bf16 copy of theta's A and B, kept for backward
            total += 2 * rank * (8 * 2 * d + (d + f) + (f + d))
    return total


def predict(args, cfg, start=0, world=1, decode=True, bf16=False):
    """Peak memory of one RL step of train.py with `args` on a model of config `cfg`, per rank,
    in bytes: {term: bytes, ..., "peak": bytes}. start: the largest window start the run draws
    (streaming.window_starts; histories exist when it is > 0). decode=False leaves out the VAE (dry
    runs with latents standing in for pixels); bf16: base and autocast in bf16 (train.use_bf16)."""
    act = torch.bfloat16 if bf16 else torch.float32
    b = 2 if bf16 else 4  # bytes of the base, its activations and the KV caches
    ph, pw = cfg.patch_size[1:]
    tiny = args.model == "tiny"
    h, w = (args.height, args.width) if tiny else (args.height // 8, args.width // 8)
    P = (h // ph) * (w // pw)
    T, F = args.window or args.num_frames, args.num_frames
    n = args.prompts_per_step * args.group_size // world
    m = args.micro_batch
    block = cfg.frames_per_block
    base, adapter = parameter_counts(cfg, args.lora_rank)
    n_adapters = 2 + args.selective + args.ema  # default, old (+ ref) (+ ema)
    out = {"weights": base * b, "adapters": n_adapters * adapter * 4, "optimizer": 3 * adapter * 4}

    # ---- KV caches: capacity frames x P tokens x D, K and V, every layer; + the text K/V
    cap = args.local_attn if args.local_attn >= 0 else F
    per_video_cache = 2 * cfg.num_layers * (cap * P + cfg.text_len) * cfg.dim * b
    streaming = start > 0
    prompts_here = max(1, args.prompts_per_step // world)
    n_hist = 0
    if streaming:  # one history per prompt (shared-prefix) or per sample (independent)
        n_hist = prompts_here if args.group_mode == "shared-prefix" else n
    histories = n_hist * per_video_cache
    out["histories"] = histories  # part of rollout and update below, reported on its own
    latents = n * T * cfg.in_dim * h * w * 4  # the window's clean latents, float32
    rb = args.rollout_batch or m  # videos per sampler call; the histories run in one batch
    # one sampler call: a block of videos through a layer (the FFN hidden is the largest)
    call = max(rb, n_hist) * block * P * (cfg.ffn_dim + 6 * cfg.dim) * b
    out["rollout"] = histories + rb * per_video_cache + call + latents

    # ---- the update: the x_theta forward's saved activations for one micro-batch
    clean = args.window_context == "clean"
    mask_block = 1 if args.released.train_mask == "frame" else block
    # teacher forcing: the clean frames some noisy block reads, before the noisy ones
    nc = clean_context_frames(T, mask_block) if clean else 0
    tokens = m * (nc + T) * P
    past = list(range(start))  # the history's frames: all of them, or the rolling cache's
    if args.local_attn >= 0:
        past = [f for f in past if f < args.sink or f >= start - (cap - args.sink)]
    sink = args.sink if args.released.train_sink else 0
    plan = attention_plan(T, P, mask_block, start, args.local_attn, sink, past, clean)
    hist_tokens = len(past) * P if streaming else 0
    # every block but the last computes every token; the last one only the noisy frames (clean)
    q_last = nc * P
    keys = m * kept_keys(plan, 0, tokens // m, hist_tokens)
    keys_last = m * kept_keys(plan, q_last, tokens // m, hist_tokens)
    layers = [(tokens, tokens, keys)] * (cfg.num_layers - 1) + [(tokens, tokens - m * q_last, keys_last)]
    full = saved_activations(cfg, args.lora_rank, act, layers, m * cfg.text_len)
    if args.grad_checkpointing:  # each block's input, plus one block recomputed at a time
        saved = cfg.num_layers * tokens * cfg.dim * b + full // cfg.num_layers
    else:
        saved = full
    # backward: gradient buffers of a block's activations in flight (the FFN hidden and a few D)
    grads_in_flight = tokens * (2 * cfg.ffn_dim + 6 * cfg.dim) * 4
    hist_copy = m * per_video_cache if streaming else 0
    out["update"] = histories + hist_copy + latents + saved + grads_in_flight

    # ---- decode and rewards
    if tiny or not decode:  # pixels are the latents' own size (tiny: pixel space; dry runs)
        pixels = n * T * 3 * h * w * 4
        out["decode"] = 0
    else:  # the VAE's working set (whole frames or --vae-tile tiles), and 1 + 4 (T - 1) frames at 8x
        # the latent size per video of the --decode-batch the rewards score at once (train.py's reward step)
        Fp = 1 + 4 * (T - 1)
        out["decode"] = vae_decode_bytes(args.height, args.width, Fp, args.vae_tile, args.decode_batch)
        pixels = args.decode_batch * Fp * 3 * args.height * args.width * 4  # float32
    named = [spec.split("=")[0] for spec in args.rewards]
    learned = [name for name in named if name in REWARD_PARAMS]
    # the pixels, and the copy of them the reward being called gets (rewards.MultiReward.score)
    out["reward"] = 2 * pixels + sum(REWARD_PARAMS[r] * 4 for r in learned) + max(
        [REWARD_CHUNK_BYTES[r] for r in learned], default=0)

    # ---- the periodic eval: whole videos for the eval prompts, one cache for all of them
    E = min(args.eval_prompts, rb) if args.eval_every else 0  # videos per eval rollout
    out["eval"] = E * (per_video_cache + F * cfg.in_dim * h * w * 4) + E * block * P * (cfg.ffn_dim + 6 * cfg.dim) * b

    # ---- a Qwen2-VL reward while it scores: its weights (bf16 on a GPU, as the base) and one
    # forward; one at a time (MultiReward calls the rewards in turn, each leaves the GPU after)
    wb = 2 if bf16 else 4
    out["reward_model"] = max([VLM_REWARDS[r][0] * wb + VLM_REWARDS[r][1] * wb / 2 for r in named if r in VLM_REWARDS],
                              default=0)

    out["peak"] = (out["weights"] + out["adapters"] + out["optimizer"]
                   + max(out["rollout"], out["update"], out["eval"], out["reward_model"]) + out["decode"] + out["reward"])
    return out


def vae_decode_bytes(height, width, pixel_frames, tile=0, videos=1):
    """Peak bytes of the Wan VAE decoding `videos` videos of `pixel_frames` frames of height x width
    pixels at once: its weights, plus the working set of whole frames; or, with tiles of `tile`
    pixels (frozen.FrozenParts, --vae-tile), the larger of (one tile's working set + the tiles
    decoded before it) and (every decoded tile + the blended rows, their concatenation and its
    clamped copy at the end)."""
    if not tile or (height <= tile and width <= tile):  # diffusers tiles only a larger frame
        return VAE_WEIGHTS + videos * (VAE_DECODE_FIXED + VAE_BYTES_PER_PIXEL * height * width)
    stride = int(tile * VAE_TILE_STRIDE)
    # a tile starts every stride pixels and is cut at the frame's edge: overlaps are decoded twice
    tiled_area = (sum(min(tile, height - i) for i in range(0, height, stride))
                  * sum(min(tile, width - j) for j in range(0, width, stride)))
    tiles = pixel_frames * 3 * tiled_area * 4  # every decoded tile, float32
    video = pixel_frames * 3 * height * width * 4
    one_tile = VAE_DECODE_FIXED + VAE_BYTES_PER_PIXEL * min(tile, height) * min(tile, width)
    return VAE_WEIGHTS + videos * max(one_tile + tiles, tiles + VAE_TILE_ASSEMBLY * video)


def summary(pred):
    """One line: the predicted peak and its terms, in GB (histories are inside rollout and update)."""
    terms = ", ".join(f"{k} {v / GB:.2f}" for k, v in pred.items() if k not in ("peak", "histories"))
    return f"{pred['peak'] / GB:.2f} GB ({terms})"


def levers(args):
    """What to change when the prediction does not fit, largest effect first."""
    out = []
    if not args.grad_checkpointing:
        out.append("--grad-checkpointing")
    if args.micro_batch > 1:
        out.append("a smaller --micro-batch")
    if args.local_attn < 0 and args.num_frames > 21:
        out.append("a rolling cache (--local-attn 12 --sink 3)")
    if args.model != "tiny" and not args.vae_tile:
        out.append("VAE decode in tiles (--vae-tile 160)")
    out.append("a smaller --lora-rank")
    if args.ema:
        out.append("--no-ema")
    return out


def report(args, cfg, start, world, bf16, device):
    """train.py's start-up lines: the predicted peak per rank; then, before anything loads, a stop
    (UsageError naming the levers) when it exceeds the memory this process can have (fits)."""
    pred = predict(args, cfg, start=start, world=world, bf16=bf16)
    log(f"memory model: predicted peak {summary(pred)} per rank")
    fits(pred["peak"], device, levers(args), args.ignore_memory_check)


def available(device):
    """(bytes this process can have, in words; None where unknown). CUDA: the card's free memory
    (less 5% the allocator needs for itself). CPU: MemAvailable (/proc/meminfo), within a cgroup's
    limit where one is set, shared by the ranks on this machine (torchrun's LOCAL_WORLD_SIZE)."""
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(device)
        return 0.95 * free, "this GPU's free memory"
    try:
        with open("/proc/meminfo") as f:
            have = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):  # not Linux
        return None, "unknown"
    try:  # a container's limit (cgroup v2): what is left under it, if less
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit, used = f.read().strip(), int(g.read())
        if limit != "max":
            have = min(have, int(limit) - used)
    except (OSError, ValueError):
        pass
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return have / ranks, "the memory available" + (f" to each of {ranks} ranks" if ranks > 1 else "")


def fits(peak, device, what_helps, ignore):
    """Stop (UsageError) when `peak` bytes exceed what available() finds, naming the levers and
    --ignore-memory-check; with `ignore`, say so and go on (the prediction may be pessimistic)."""
    have, where = available(device)
    if have is None or peak <= have:
        return
    msg = (f"the memory model predicts a peak of {peak / GB:.1f} GB, more than {where} ({have / GB:.1f} GB); "
           f"levers: {', '.join(what_helps)}; or --ignore-memory-check to go on anyway")
    if not ignore:
        raise UsageError(msg)
    log(f"warning: {msg} (going on: --ignore-memory-check)")


def predict_sample(cfg, videos, frames, hw, local=-1, bf16=False, decode=False, text_file_bytes=0):
    """Peak bytes of sample.py making `videos` videos of `frames` latent frames at latent size hw:
    the DiT's weights, a KV cache per video, the latents, one block through a layer's FFN; with
    decode (Wan) the VAE decoding one video afterwards. The text encoder runs and is freed before
    the DiT loads, so the peak is the larger of the two phases; it is counted from its files
    (`text_file_bytes`, bf16 on disk as Wan ships umT5: twice that in float32)."""
    b = 2 if bf16 else 4
    ph, pw = cfg.patch_size[1:]
    P = (hw[0] // ph) * (hw[1] // pw)
    base, _ = parameter_counts(cfg, 1)
    cap = local if local >= 0 else frames
    cache = videos * 2 * cfg.num_layers * (cap * P + cfg.text_len) * cfg.dim * b
    latents = videos * frames * cfg.in_dim * hw[0] * hw[1] * 4
    call = videos * cfg.frames_per_block * P * (cfg.ffn_dim + 6 * cfg.dim) * b
    vae = vae_decode_bytes(8 * hw[0], 8 * hw[1], 1 + 4 * (frames - 1)) if decode else 0  # 8x the latent size
    return max(text_file_bytes * b / 2, base * b + cache + latents + call + vae)


def file_bytes(path):
    """The size of a file, or of every file in a folder (a Diffusers model folder); 0 for None."""
    if not path:
        return 0
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, names in os.walk(path) for f in names)


# ----------------------------------------------------------------------------------------------
# Model FLOPs of one training call, for MFU. Only matmuls count (what torch's FlopCounterMode
# counts too): every Linear, the patch Conv3d (a matmul over patches), attention's scores and
# its weighted sum of values; 2 FLOPs per multiply-add. Norms, RoPE, softmax, GELU and adaLN are
# elementwise (< 1% here). A linear on M rows, I -> O features (linear(M, I, O, ...) below):
#     forward 2MIO;  backward dX 2MIO (if its input needs a gradient) + dW 2MIO (if trained)
# plus, with a trained LoRA adapter of rank r (y += B A x):
#     forward 2Mr(I + O);  backward dB 2MrO + d(Ax) 2MrO + dA 2MIr + dX 2MIr (if input needs it)
# Attention of Nq query tokens against the Nk keys they see: forward 4 Nq Nk D (scores, values),
# backward 8 Nq Nk D (dQ, dK, dP, dV); Nq Nk summed over the block-causal plan (`qk`: causality
# and the window skip key blocks: 21 frames in blocks of 3 see 4/7 of the full square).
# The base is frozen in the NFT update, so its linears need dX but no dW: at 1.3B, 480x832, 21
# frames the backward is 1.6x the forward (attention, half the forward, still costs 2x), not the
# 2x of full training (6 x parameters x tokens) that MFU is usually quoted with; bench prints both.


def train_flops(cfg, frames, hw, batch=1, lora_rank=0, base_grad=False, start_frame=0, local=-1,
                sink=0, history=(), teacher_forcing=False):
    """(forward, backward) FLOPs of model(x, t, ctx) on (batch, frames, C, *hw) latents with a
    trained LoRA adapter of rank `lora_rank` active (0: none) and the base weights trained or
    frozen; history: the frames of a history cache (start_frame, local, sink as the forward)."""
    D, Lt, p = cfg.dim, cfg.text_len, cfg.patch_size[1] * cfg.patch_size[2]
    P = hw[0] * hw[1] // p  # tokens per frame
    nc = clean_context_frames(frames, cfg.frames_per_block) if teacher_forcing else 0
    nf = nc + frames  # teacher forcing: [clean frames some noisy block reads ; noisy] frames
    Nt = batch * nf * P  # token rows through every block
    trained = base_grad or lora_rank > 0
    flops = [0, 0]  # forward, backward

    def linear(M, I, O, x_grad, r=0):
        flops[0] += 2 * M * I * O + 2 * M * r * (I + O)
        flops[1] += 2 * M * I * O * (x_grad + base_grad) + 2 * M * r * (2 * O + I + I * x_grad)

    # embeddings: patches (from x), text MLP (from the raw context), time MLPs (from sinusoids)
    linear(Nt, cfg.in_dim * p, D, False)
    linear(batch * Lt, cfg.text_dim, D, False), linear(batch * Lt, D, D, base_grad)
    rows = batch * nf
    linear(rows, cfg.freq_dim, D, False), linear(rows, D, D, base_grad), linear(rows, D, 6 * D, base_grad)
    # sum over query blocks of (query tokens) x (keys they see), history keys included
    plan = attention_plan(frames, P, cfg.frames_per_block, start_frame, local, sink, history, teacher_forcing)
    qk = batch * sum((qhi - qlo) * sum(hi - lo for lo, hi in runs) for (qlo, qhi), runs in plan)
    # the last block computes only what the head reads: with teacher forcing the noisy frames
    clean = nc * P  # query tokens the last block skips, per video
    qk_last = batch * sum((qhi - qlo) * sum(hi - lo for lo, hi in runs) for (qlo, qhi), runs in plan
                          if qlo >= clean)
    r = lora_rank
    for i in range(cfg.num_layers):
        last = i == cfg.num_layers - 1
        Nq, qk_i = (Nt - batch * clean, qk_last) if last else (Nt, qk)  # tokens past their K and V
        # block 0's input comes from frozen embeddings: no gradient unless the base is trained
        x_grad = base_grad or (trained and i > 0)
        linear(Nq, D, D, x_grad, r)  # self-attention q
        for _ in range(2):  # k, v of every token
            linear(Nt, D, D, x_grad, r)
        linear(Nq, D, D, trained, r)  # o
        flops[0] += 4 * qk_i * D
        flops[1] += 8 * qk_i * D * trained
        linear(Nq, D, D, trained, r), linear(Nq, D, D, trained, r)  # cross-attention q, o
        for _ in range(2):  # cross-attention k, v of the text tokens (context: no gradient)
            linear(batch * Lt, D, D, base_grad, r)
        flops[0] += 4 * Nq * Lt * D
        flops[1] += 8 * Nq * Lt * D * trained
        linear(Nq, D, cfg.ffn_dim, trained, r), linear(Nq, cfg.ffn_dim, D, trained, r)  # FFN
    linear(batch * frames * P, D, p * cfg.out_dim, trained)  # head (the noisy half only)
    return flops[0], flops[1]
