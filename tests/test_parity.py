"""
Parity with the public reference implementation (the released Astrolabe model, wrapper, sampler
and scheduler code run on CPU in float32 with small random weights; how the committed set was
made: tests/fixtures/README.md).

Every fixture set (a `*.json` description + its weights and tensors) in tests/fixtures/, or in
the folder named by ASTRO_FIXTURES instead, is replayed case by case:
  unit   sinusoid and RoPE tables          a       block-causal training forward (+ hooks, mask)
  a_local  local-window training mask      d       teacher forcing (+ mask)
  b      4-step AR sampling, global cache  c       rolling cache with sink (per-block cache)
Shapes, heads, text length, windows and seeds are all read from the JSON: nothing here knows
the public set's numbers. Tolerance: max |diff| <= 1e-4 (float32).

Run:  python -m pytest tests/test_parity.py -q
      ASTRO_FIXTURES=/path/to/other/set python -m pytest tests/test_parity.py -q
"""
import glob
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from kvcache import KVCache, attention_plan
from model import CausalWanModel, ModelConfig, rope_freqs, apply_rope, sinusoid
from sample import TensorNoise, generate, sampler_timesteps, flow_to_x0
from test_model import without_unread_clean

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.environ.get("ASTRO_FIXTURES", os.path.join(HERE, "fixtures"))
TOL = 1e-4
KNOWN = {"unit", "a", "alocal", "d", "b", "c", "sampler"}  # tensor-name prefixes we replay
# a fixture set is a JSON naming its weights and tensors files (the key manifests are not sets)
SETS = sorted(p for p in glob.glob(os.path.join(FIXTURES, "*.json")) if "tensors_file" in json.load(open(p)))


def maxdiff(a, b):
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs reference {tuple(b.shape)}"
    return (a.double() - b.double()).abs().max().item()


_cache = {}


def load_set(path):
    """(description, model with the set's weights, tensors), loaded once per set."""
    if path not in _cache:
        d = json.load(open(path))
        folder = os.path.dirname(path)
        mc = dict(d["model_config"], patch_size=tuple(d["model_config"]["patch_size"]))
        # every Wan2.1 T2V checkpoint has qk_norm and cross_attn_norm on: model.py always builds both
        assert mc.pop("qk_norm") and mc.pop("cross_attn_norm"), "a set without qk_norm / cross_attn_norm"
        cfg = ModelConfig(**mc, frames_per_block=d["num_frame_per_block"])
        model = CausalWanModel(cfg).eval()
        model.load_state_dict(load_file(os.path.join(folder, d["weights_file"])), strict=True)
        _cache[path] = d, model, load_file(os.path.join(folder, d["tensors_file"]))
    return _cache[path]


def cases(path):
    d = json.load(open(path))
    return ["unit", "sampler"] + [c.replace("a_local", "alocal") for c in d["cases"]]


PARAMS = [(p, c) for p in SETS for c in cases(p)]


def test_fixture_sets_found():
    assert SETS, f"no fixture sets (*.json) in {FIXTURES}"


@pytest.mark.parametrize("path", SETS, ids=os.path.basename)
def test_every_tensor_is_covered(path):
    """No tensor of the set goes unchecked: each belongs to a case this file replays."""
    d, _, T = load_set(path)
    prefixes = {k.split("_")[0] for k in T}
    assert prefixes <= KNOWN, f"unknown fixture cases {prefixes - KNOWN}: extend this test"
    listed = {c.replace("a_local", "alocal") for c in d["cases"]} | {"unit", "sampler"}
    assert prefixes <= listed


def grid(d, model):
    ph, pw = model.cfg.patch_size[1:]
    H, W = d["latent_hw"]
    return H // ph, W // pw


def dense_mask(plan, n_kv):
    """The (queries x keys) boolean mask that an attention plan implements."""
    n_q = max(hi for (_, hi), _ in plan)
    m = torch.zeros(n_q, n_kv, dtype=torch.bool)
    for (qlo, qhi), runs in plan:
        for lo, hi in runs:
            m[qlo:qhi, lo:hi] = True
    return m


@pytest.mark.parametrize("path,case", PARAMS, ids=lambda v: os.path.basename(str(v)))
def test_case(path, case):
    d, model, T = load_set(path)
    c = d["cases"].get("a_local" if case == "alocal" else case, {})
    h, w = grid(d, model)
    tpf, nfpb = h * w, model.cfg.frames_per_block
    hd = model.cfg.dim // model.cfg.num_heads

    if case == "unit":
        out = sinusoid(T["unit_sinusoid_t"], model.cfg.freq_dim)
        assert maxdiff(out, T["unit_sinusoid_out"]) <= TOL
        x = T["unit_rope_x"]
        for key in [k for k in T if k.startswith("unit_rope_out_start")]:
            start = int(key.rsplit("start", 1)[1])
            f = rope_freqs(hd, start, x.shape[1] // tpf, h, w)
            assert maxdiff(apply_rope(x, f), T[key]) <= TOL, key
        return

    if case == "sampler":
        ts, sig = sampler_timesteps(d["sampler"]["denoising_step_list"], d["sampler"]["timestep_shift"],
                                    d["sampler"]["warp_denoising_step"])
        assert torch.equal(ts, T["sampler_timesteps"]) and torch.equal(sig, T["sampler_sigmas"])
        return

    if case in ("a", "alocal", "d"):
        local = c.get("local_attn_size", -1)
        x, t, ctx = T[f"{case}_x"], T[f"{case}_t"], T[f"{case}_context"]
        clean = T.get(f"{case}_clean_x")
        hooks, seen = [], {}
        if case == "a":  # intermediates, captured with forward hooks on our modules
            names = {"patch_embedding": model.patch_embedding, "time_embedding": model.time_embedding,
                     "time_projection": model.time_projection, "text_embedding": model.text_embedding,
                     "head": model.head, **{f"block{i}": b for i, b in enumerate(model.blocks)}}
            for n, mod in names.items():
                hooks.append(mod.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)))
        with torch.no_grad():
            flow = model(x, t, ctx, clean_x=clean, local=local)
        for hk in hooks:
            hk.remove()
        assert maxdiff(flow, T[f"{case}_flow"]) <= TOL
        if f"{case}_x0" in T:
            assert maxdiff(flow_to_x0(x, flow, t, d["sampler"]["timestep_shift"]), T[f"{case}_x0"]) <= TOL
        for key in [k for k in T if k.startswith(f"{case}_dbg_")]:
            name = key[len(f"{case}_dbg_"):].replace("_out", "")
            assert maxdiff(seen[name], T[key]) <= TOL, key
        if f"{case}_mask" in T:  # the attention pattern itself, exactly
            F, ref = x.shape[1], T[f"{case}_mask"]
            plan = attention_plan(F, tpf, nfpb, local=local, teacher_forcing=clean is not None)
            if clean is not None:  # ours leaves out the clean frames nothing reads
                ref = without_unread_clean(ref, F, tpf, nfpb)
            assert torch.equal(dense_mask(plan, ref.shape[1]), ref)
        return

    # b / c: AR sampling through the KV cache, replaying the stored noise
    noise, renoise, ctx = T[f"{case}_noise"], T[f"{case}_renoise"], T[f"{case}_context"]
    B, F = noise.shape[:2]
    shift = d["sampler"]["timestep_shift"]
    cache = KVCache.for_model(model.cfg, B, F, d["latent_hw"], c.get("sink_size", 0), c.get("local_attn_size", -1))
    calls, steps, snaps = [], [], []
    cached = model.forward_cached

    def logged(x, t, context, cache, start_frame):  # the sampler's calls: start frame, timestep
        calls.append((start_frame, float(t.flatten()[0])))
        return cached(x, t, context, cache, start_frame)
    model.forward_cached = logged
    with torch.no_grad():
        lat = generate(model, ctx, cache, F, TensorNoise(noise, renoise), shift=shift,
                       timesteps=sampler_timesteps(d["sampler"]["denoising_step_list"], shift,
                                                   d["sampler"]["warp_denoising_step"])[0],
                       on_block=lambda k, x0s: (steps.append(torch.stack(x0s)), snaps.append(
                           (list(cache.frames), cache.length, cache.end_frame,
                            cache.k[:, :, :cache.length].clone(), cache.v[:, :, :cache.length].clone()))))
    del model.forward_cached  # the class's method again
    assert maxdiff(lat, T[f"{case}_latents"]) <= TOL
    # x0 after every step of every block: [block, step, B, n, C, H, W]
    assert maxdiff(torch.stack(steps), T[f"{case}_x0_steps"]) <= TOL
    # the call sequence: 4 steps + 1 cache pass per block, start frames and timesteps
    log = d["call_log"][case]
    assert [(e["current_start_frame"], e["timestep"]) for e in log] == calls
    if f"{case}_cache_pass_flow" in T:  # the sampler drops this output; recompute it:
        # block k's cache pass sees the clean K/V of blocks < k and writes its own clean K/V
        replay = KVCache.for_model(model.cfg, B, F, d["latent_hw"], c.get("sink_size", 0),
                                   c.get("local_attn_size", -1))
        with torch.no_grad():
            passes = torch.stack([model.forward_cached(lat[:, a:a + nfpb], torch.zeros(B, nfpb), ctx, replay, a)
                                  for a in range(0, F, nfpb)])
        assert maxdiff(passes, T[f"{case}_cache_pass_flow"]) <= TOL
    # K/V cache contents (valid part, RoPE applied): after the last block, and after each block
    for key in T:
        m = re.fullmatch(rf"{case}_kv_(final|after_block(\d+))_layer(\d+)_([kv])(?:_b(\d+))?", key)
        if not m:
            continue
        frames, length, end, K, V = snaps[-1 if m.group(1) == "final" else int(m.group(2))]
        buf = (K if m.group(4) == "k" else V)[int(m.group(3))]  # (B, length, Hd, D)
        assert maxdiff(buf if m.group(5) is None else buf[int(m.group(5))], T[key]) <= TOL, key
    # rolling cache: which frames it holds after each block
    contents = d["call_log"].get(f"{case}_cache_contents", [])
    for entry in contents:
        frames, length, end, _, _ = snaps[entry["block"]]
        assert frames == entry["frames_in_cache"]
        assert length == entry["local_end_index_tokens"]
        assert end * tpf == entry["global_end_index_tokens"]
    n_checked = sum(bool(re.fullmatch(rf"{case}_kv_.*", k)) for k in T)
    assert case != "c" or (contents and n_checked), "rolling-cache case without cache contents"
