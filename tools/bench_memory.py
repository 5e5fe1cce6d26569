"""
Memory harnesses behind `python tools/bench.py memory`, `realsize`, `vae` and `vlm`: the memory model
(memory.py) set against what one RL step of train.py really holds, plus the random Wan files in
the released layouts that let train.py run the real-model path with nothing downloaded.

    python tools/bench.py memory --json m.json   every MEMORY_CASES entry, one RL step of train.py's
                                           self-forcing preset each in a fresh process: measured
                                           peak next to memory.predict; then every preset's
                                           prediction at its real size
    python tools/bench.py vae                    the Wan2.1 VAE (random weights) decoding whole frames
                                           and in tiles (--vae-tile): measured peak next to
                                           memory.vae_decode_bytes (128x192 whole, 256x384 in tiles of 128)
    python tools/bench.py vlm                    HPSv3's and VideoAlign's Qwen2-VL at real width and token
                                           counts, 2 layers: one forward's working set (bf16) next
                                           to memory.VLM_REWARDS (the numbers it was set from)
    python tools/bench.py realsize [--keep]      the full wan-1.3b (random weights, full Wan2.1 VAE,
                                           a one-layer umT5) through the same preset on the CPU:
                                           64x64 pixels, 6 latent frames, one step end to end

Measured peak on a CPU = the tensors alive when the step starts + the step's RSS growth, with
glibc's mmap threshold fixed so freed tensors leave RSS at once; that is the number a GPU's
allocated counter gives. Also here: the bench model sizes (SIZES) and two helpers bench.py shares
(random_model, subprocess_json). Numbers are printed, never asserted; memory.py's own tests are
tests/test_scale.py.

Shape legend: H x W latent size, F latent frames of the video, T latent frames of the window.
"""
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn as nn

# a tool, not part of the algorithm: the repository root on the import path, so that
# `python tools/bench.py` (from anywhere) finds train.py, model.py and the rest
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common
import memory
import streaming
import train
from common import reset_peak
from model import CONFIGS, Block, CausalWanModel, Head, RMSNorm, _draw_modulation, randomize_head

BENCH = os.path.join(ROOT, "tools", "bench.py")  # every memory case runs as `bench.py --case memory:...`

# "bench": Wan's shape at half the width and 4 layers, small enough for a 2-core CPU (8190 tokens
# in 21 frames of 30x52 latents); "small": a cheaper one for the memory dry runs
SIZES = dict(CONFIGS, bench=replace(CONFIGS["wan-1.3b"], dim=768, ffn_dim=3072, num_heads=6, num_layers=4),
             small=replace(CONFIGS["wan-1.3b"], dim=384, ffn_dim=1536, num_heads=3, num_layers=2))


def random_model(cfg, dev, dtype):
    """Random weights straight on the device (meta first: no CPU copy of a 14B model)."""
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    model = model.to_empty(device=dev)
    init_materialized(model)  # to_empty leaves garbage: every parameter initialised
    return model.to(dtype)


@torch.no_grad()
def init_materialized(model):
    """Every parameter of a model built on the meta device and materialised with to_empty()
    (garbage memory) initialised as at construction: norm gains 1 and biases 0, modulations
    randn / sqrt(Dm), Wan's init_weights for the linears, a random head."""
    for m in model.modules():
        if isinstance(m, (RMSNorm, nn.LayerNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        if isinstance(m, (Block, Head)):
            _draw_modulation(m.modulation)  # Wan's randn / sqrt(Dm), the draw of construction
    nn.init.zeros_(model.patch_embedding.bias)  # init_weights leaves the conv's bias alone
    model.init_weights()
    randomize_head(model)


def subprocess_json(cmd, env=None):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return r.stdout


# ----------------------------------------------------------------------------------------------
# Random Wan files in the real layouts, for dry runs of train.py (nothing is downloaded)

def write_random_generator(path, cfg, seed=0):
    """A random DiT of config `cfg` saved as a Self-Forcing checkpoint ({"generator_ema": ...},
    keys prefixed "model.", bf16 as released), for train.py --ckpt."""
    torch.manual_seed(seed)
    m = random_model(cfg, "cpu", torch.bfloat16)
    torch.save({"generator_ema": {"model." + k: v for k, v in m.state_dict().items()}}, path)


def word_tokenizer(folder, words):
    """A word-level stand-in for google/umt5-xxl's tokenizer, saved as the real one is: pad <pad> =
    0, EOS </s> = 1 appended by the post-processor ("$A </s>", as T5's), unk = 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def write_random_frozen(folder, text_dim):
    """A Diffusers-layout folder (vae/, text_encoder/, tokenizer/): the full Wan2.1 VAE with random
    weights and a one-layer umT5 of width `text_dim` (the real one is 24 layers: its 11 GB are
    freed before the DiT loads, so they never meet the step's peak)."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(0)
    AutoencoderKLWan().save_pretrained(os.path.join(folder, "vae"))
    t5 = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=text_dim, d_kv=64, d_ff=256, num_layers=1, num_heads=4,
                                     feed_forward_proj="gated-gelu"))
    t5.save_pretrained(os.path.join(folder, "text_encoder"))
    word_tokenizer(os.path.join(folder, "tokenizer"), "a fox in the snow cat".split())


class LatentParts:
    """Stand-ins for umT5 and the VAE in the memory dry runs: fixed random text rows of the model's
    width, and the first 3 latent channels shown as pixels, so the rewards run at latent size and
    the DiT's step is all that is measured (memory.predict(..., decode=False))."""
    def __init__(self, args, prompts, device):
        self.cfg, self.device = CONFIGS[args.model], device

    def embed(self, prompts):
        g = torch.Generator().manual_seed(0)
        return torch.randn(len(prompts), self.cfg.text_len, self.cfg.text_dim, generator=g).to(self.device)

    def decode(self, lat):
        return ((lat[:, :, :3].float() + 1) / 2).clamp(0, 1)


# (name, size, latent H x W, frames, window, cache window, sink, grad checkpointing)
MEMORY_CASES = [
    ("bench 30x52 F6 s=0", "bench", (30, 52), 6, 6, -1, 0, False),
    ("bench 30x52 F6 s=0 ckpt", "bench", (30, 52), 6, 6, -1, 0, True),
    ("bench 30x52 F9 s=6 rolling", "bench", (30, 52), 9, 3, 6, 3, False),
    ("bench 30x52 F9 s=6 rolling ckpt", "bench", (30, 52), 9, 3, 6, 3, True),
    ("small 20x36 F12 s=0", "small", (20, 36), 12, 12, -1, 0, False),
    ("small 20x36 F12 s=0 ckpt", "small", (20, 36), 12, 12, -1, 0, True),
    ("small 20x36 F12 s=6", "small", (20, 36), 12, 6, -1, 0, False),
    ("small 20x36 F12 s=6 ckpt", "small", (20, 36), 12, 6, -1, 0, True),
]


def memory_case_args(case, ckpt_file, out):
    """train.py's self-forcing preset at a case's size: 1 prompt x 2 videos, one step."""
    _, size, (h, w), F, T, local, sink, gc = case
    # --vae and --text-encoder only have to pass train.py's up-front checks (a wan model needs
    # both, as existing files): LatentParts stands in for the two, so neither file is ever read
    return replace(train.PRESETS["self-forcing"], ckpt=ckpt_file, vae=ckpt_file, text_encoder=ckpt_file,
                   height=8 * h, width=8 * w, num_frames=F,
                   window=T, window_select="last", local_attn=local, sink=sink, grad_checkpointing=gc,
                   prompts=["a fox in the snow"], prompts_per_step=1, group_size=2, micro_batch=1,
                   rewards=["colorfulness=1"], lora_rank=64, lora_alpha=64.0, steps=1, eval_every=0,
                   bf16="off", progress=False, out_dir=out)


def live_tensor_mb():
    """MiB held by every tensor alive now (each storage once): what a GPU allocator would hold."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2 ** 20


def memory_case(index, ckpt_file):
    """(in a fresh process) one RL step of a MEMORY_CASES entry: measured peak next to predicted.
    Measured = the tensors alive when the step starts (counted) + the step's RSS growth over that
    start, so the process's own non-tensor memory (libraries, allocator, Python) is not counted,
    as a GPU's allocated counter would not count it."""
    case = MEMORY_CASES[index]
    CONFIGS["wan-1.3b"] = SIZES[case[1]]  # the self-forcing preset's path at this size
    train.FrozenParts = LatentParts  # latents stand in for pixels: the DiT's step alone
    at_start = []

    def reset_peak_counting(device):  # the step clock's probe, plus a count of the live tensors
        at_start.append(live_tensor_mb())
        return reset_peak(device)
    common.reset_peak = reset_peak_counting
    with tempfile.TemporaryDirectory() as out:
        args = memory_case_args(case, ckpt_file, out)
        train.main(args)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            row = [json.loads(line) for line in f][-1]
    pred = memory.predict(args, SIZES[case[1]], start=max(streaming.window_starts(args)), decode=False)
    return {"name": case[0], "measured_mb": at_start[-1] + row["mem/peak_mb"], "predicted_mb": pred["peak"] / 2 ** 20,
            "rss_total_mb": row["mem/total_mb"],
            "step_s": row["time/step_s"], "terms_mb": {k: v / 2 ** 20 for k, v in pred.items()}}


def memory_bench(args):
    """Every MEMORY_CASES entry in a fresh process, with glibc's mmap threshold fixed at 64 KiB so
    that a freed tensor leaves RSS at once: RSS then follows the live tensor bytes, the number
    CUDA's allocator reports (by default glibc keeps freed heap pages, so RSS only ever grows).
    Then the prediction for every preset at its real size."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for size in sorted({c[1] for c in MEMORY_CASES}):
            files[size] = os.path.join(tmp, f"{size}.pt")
            write_random_generator(files[size], SIZES[size])
        for i, case in enumerate(MEMORY_CASES):
            out = subprocess_json([sys.executable, BENCH, "--case", f"memory:{i}:{files[case[1]]}"], env=env)
            r = json.loads(out.strip().splitlines()[-1])
            cases.append(r)
            print(f"{r['name']:34s} measured {r['measured_mb']:8.0f} MiB  predicted {r['predicted_mb']:8.0f} MiB  "
                  f"({r['predicted_mb'] / r['measured_mb'] - 1:+.1%})  step {r['step_s']:.0f} s", flush=True)
    presets = []
    for name, preset in train.PRESETS.items():
        cfg = CONFIGS[preset.model]
        pred = memory.predict(preset, cfg, start=max(streaming.window_starts(preset)), bf16=preset.model != "tiny")
        presets.append({"name": name, "predicted_gb": pred["peak"] / memory.GB})
        print(f"preset {name:15s} predicted {memory.summary(pred)}", flush=True)
    return {"cases": cases, "presets": presets}


def realsize(args):
    """The full wan-1.3b (1.42 B parameters, LoRA rank 256 on every block linear: 0.35 B per
    adapter) through train.py's self-forcing preset, float32 on the CPU: random generator in the
    Self-Forcing layout, random full Wan2.1 VAE, a one-layer umT5; 64x64 pixels, 6 latent frames,
    1 prompt x 2 videos, one RL step end to end. Measured peak (RSS) next to the memory model."""
    folder = os.path.join(tempfile.gettempdir(), "astrolabe_realsize")
    os.makedirs(folder, exist_ok=True)
    gen = os.path.join(folder, "self_forcing_random.pt")
    cfg = CONFIGS["wan-1.3b"]
    t0 = time.perf_counter()
    if not os.path.exists(gen):
        write_random_generator(gen, cfg)
        write_random_frozen(folder, cfg.text_dim)
    print(f"random files in {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = os.path.join(folder, "run")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "train.py", "self-forcing", "--ckpt", gen, "--vae", folder, "--text-encoder", folder,
           "--height", "64", "--width", "64", "--num-frames", "6", "--prompts", "a fox in the snow",
           "--prompts-per-step", "1", "--group-size", "2", "--steps", "1", "--eval-every", "0",
           "--rewards", "colorfulness=1", "--bf16", "off", "--no-progress", "--out-dir", out]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    log = subprocess_json(cmd, env=env)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        row = [json.loads(line) for line in f][-1]
    a = replace(train.PRESETS["self-forcing"], height=64, width=64, num_frames=6, prompts_per_step=1, group_size=2,
                eval_every=0, rewards=["colorfulness=1"], bf16="off")
    pred = memory.predict(a, cfg)
    res = {"measured_mb": row["mem/total_mb"], "predicted_mb": pred["peak"] / 2 ** 20, "step_s": row["time/step_s"],
           "rollout_s": row["time/rollout_s"], "update_s": row["time/update_s"], "wall_s": wall,
           "terms_mb": {k: v / 2 ** 20 for k, v in pred.items()}}
    print("\n".join(line for line in log.splitlines() if line.startswith(("memory", "step", "1 rank"))))
    print(f"realsize wan-1.3b: step {res['step_s']:.0f} s (rollout {res['rollout_s']:.0f}, update "
          f"{res['update_s']:.0f}), whole run {wall:.0f} s; peak {res['measured_mb'] / 1024:.2f} GiB measured, "
          f"{res['predicted_mb'] / 1024:.2f} GiB predicted ({res['predicted_mb'] / res['measured_mb'] - 1:+.1%})")
    if not args.keep:
        shutil.rmtree(folder)
    return res


# (name, pixel height, width, latent frames, tile: 0 whole frames); tiles of 128 at 256x384 make a
# 3 x 4 grid with every kind of edge, as 160 does at 480x832 (smaller tiles cost more than
# memory.vae_decode_bytes counts: tiles of 64 at 128x192 measured 1.4x its prediction)
VAE_CASES = [("whole frames 128x192 F3", 128, 192, 3, 0), ("tiles of 128 256x384 F3", 256, 384, 3, 128)]


def vae_case(index):
    """(in a fresh process) one VAE_CASES entry: the full Wan2.1 VAE (random weights, float32)
    decoding one video through frozen.WanVAE, tiled as FrozenParts tiles it; the peak's growth over
    the loaded VAE next to memory.vae_decode_bytes less the weights."""
    from diffusers import AutoencoderKLWan
    from frozen import WanVAE
    name, H, W, F, tile = VAE_CASES[index]
    torch.manual_seed(0)
    vae = WanVAE(AutoencoderKLWan().eval())
    if tile:
        vae.tile(tile)
    z = torch.randn(1, F, 16, H // 8, W // 8)
    base = reset_peak("cpu")
    t0 = time.perf_counter()
    video = vae.decode(z)  # (1, 1 + 4 (F - 1), 3, H, W)
    seconds = time.perf_counter() - t0
    measured = common.peak_growth("cpu", base)
    pred = memory.vae_decode_bytes(H, W, video.shape[1], tile) - memory.VAE_WEIGHTS
    return {"name": name, "measured_mb": measured, "predicted_mb": pred / 2 ** 20, "decode_s": seconds}


def vae_bench(args):
    """Every VAE_CASES entry in a fresh process (glibc's mmap threshold fixed, as memory_bench)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    cases = []
    for i, case in enumerate(VAE_CASES):
        r = json.loads(subprocess_json([sys.executable, BENCH, "--case", f"vae:{i}"], env=env).strip().splitlines()[-1])
        cases.append(r)
        print(f"{r['name']:26s} measured {r['measured_mb']:7.0f} MiB  predicted {r['predicted_mb']:7.0f} MiB  "
              f"({r['predicted_mb'] / r['measured_mb'] - 1:+.1%})  decode {r['decode_s']:.0f} s", flush=True)
    return cases


# the Qwen2-VL rewards at their real widths and token counts, depth cut to 2 layers (a no-grad forward
# holds one layer's intermediates at a time, so its working set does not grow with depth):
# (name, text widths (hidden, MLP, heads, kv heads), merger width, grid (t, h, w) in patches per
# item, tokens per item); the released batch of 4 items per forward
VLM_CASES = [("hpsv3 4 frames", (3584, 18944, 28, 4), 3584, (1, 24, 42), 830),
             ("videoalign 4 videos", (1536, 8960, 12, 2), 1536, (5, 24, 42), 2100)]


def vlm_case(index, dtype=torch.bfloat16, batch=4, vocab=1000):
    """(in a fresh process) one VLM_CASES entry: peak RSS growth of the vision tower and language model
    scoring `batch` items, next to memory.VLM_REWARDS' working-set term."""
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel
    name, (D, Df, heads, kv), merger, grid, L = VLM_CASES[index]
    text = dict(hidden_size=D, intermediate_size=Df, num_attention_heads=heads, num_key_value_heads=kv,
                num_hidden_layers=2, vocab_size=vocab, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    vision = dict(depth=2, embed_dim=1280, hidden_size=merger, mlp_ratio=4, num_heads=16)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, attn_implementation="sdpa",
                        image_token_id=vocab - 1, video_token_id=vocab - 2)
    torch.manual_seed(0)
    m = Qwen2VLModel(cfg).to(dtype).eval()
    P = grid[0] * grid[1] * grid[2]  # patches per item; 4 patches merge into one token
    ids = torch.randint(0, vocab - 3, (batch, L))
    ids[:, 10:10 + P // 4] = vocab - 1  # the visual tokens' places
    pixels = torch.randn(batch * P, 3 * 2 * 14 * 14, dtype=dtype)
    with torch.no_grad():
        emb = m.language_model.embed_tokens(ids)
        base = reset_peak("cpu")
        visual = m.visual(pixels, grid_thw=torch.tensor([grid] * batch)).pooler_output
        emb = emb.masked_scatter((ids == vocab - 1).unsqueeze(-1), visual.to(emb.dtype))
        m.language_model(inputs_embeds=emb, attention_mask=torch.ones(batch, L, dtype=torch.long), use_cache=False)
        measured = common.peak_growth("cpu", base)
    key = "hpsv3" if name.startswith("hpsv3") else "videoalign_mq"
    return {"name": name, "measured_mb": measured, "predicted_mb": memory.VLM_REWARDS[key][1] / 2 ** 20}


def vlm_bench(args):
    """Every VLM_CASES entry in a fresh process (glibc's mmap threshold fixed, as memory_bench)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    cases = []
    for i in range(len(VLM_CASES)):
        r = json.loads(subprocess_json([sys.executable, BENCH, "--case", f"vlm:{i}"], env=env).strip().splitlines()[-1])
        cases.append(r)
        print(f"{r['name']:22s} measured {r['measured_mb']:6.0f} MiB  memory.py {r['predicted_mb']:6.0f} MiB "
              f"(bf16, one forward of the released batch)", flush=True)
    return cases
