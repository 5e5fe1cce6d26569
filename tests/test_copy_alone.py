"""
Files a researcher can copy into their own project: each is copied, with only the files it names,
into an empty folder and run there by a fresh interpreter that cannot see this repository. The
snippet uses the file for real (a loss and its gradient, a cache that evicts, a generated video)
and prints a check the test reads back.

  nft_loss.py                          the RL maths
  kvcache.py                           the rolling KV cache
  rewards.py                           the reward signature, weight-free rewards, MultiReward
  lora.py                              named LoRA adapters on any nn.Linear-based model
  model.py + kvcache.py + lora.py      the causal Wan DiT, both forwards
  sample.py + model.py + kvcache.py + lora.py   the 4-step AR sampler (generate)

Run:  python -m pytest tests/test_copy_alone.py -q
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "nft_loss": (["nft_loss.py"], """
import torch, nft_loss as nft
r = nft.optimality_prob(nft.group_advantages(torch.tensor([1., 2., 3., 5.]), [0, 0, 1, 1]))
x0, old = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
theta = old.clone().requires_grad_(True)
loss = nft.nft_policy_loss(theta, old, x0, r.float())
loss.backward()
print("ok", bool(r[1] > 0.5 > r[0]), bool(theta.grad.abs().sum() > 0))
"""),
    "kvcache": (["kvcache.py"], """
import torch
from kvcache import KVCache
cache = KVCache(num_layers=1, batch=1, frames=0, tokens_per_frame=2, num_heads=1, head_dim=4, sink=3, local=6)
for s in range(0, 12, 3):
    lo, hi = cache.begin(s, 3)
    cache.write(0, lo, torch.randn(1, hi - lo, 1, 4), torch.randn(1, hi - lo, 1, 4))
print("ok", cache.frames == [0, 1, 2, 9, 10, 11], cache.layer(0)[0].shape == (1, 12, 1, 4))
"""),
    "rewards": (["rewards.py"], """
import torch
from rewards import MultiReward
mr = MultiReward(["flicker=2", "colorfulness=1"])
scores = mr.score(torch.rand(2, 4, 3, 8, 8), ["a", "b"])
print("ok", sorted(scores) == ["colorfulness", "flicker"], mr.total(scores).shape == (2,))
"""),
    "lora": (["lora.py"], """
import torch, torch.nn as nn
from lora import LoRALinear, add_adapter, copy_adapter, lerp_adapter, use_adapter, adapter_params
net = nn.Sequential(LoRALinear(8, 8), nn.ReLU(), LoRALinear(8, 2))
add_adapter(net, "default", rank=2)
copy_adapter(net, "default", "old")
for p in adapter_params(net, "default"):
    nn.init.normal_(p)
x = torch.randn(5, 8)
with use_adapter(net, None):
    base = net(x)
with use_adapter(net, "old"):
    old = net(x)
with use_adapter(net, "default"):
    new = net(x)
lerp_adapter(net, "old", "default", 0.0)
with use_adapter(net, "old"):
    print("ok", torch.equal(base, old), not torch.allclose(new, base), torch.equal(net(x), new))
"""),
    "model": (["model.py", "kvcache.py", "lora.py"], """
import torch
from kvcache import KVCache
from model import CausalWanModel, ModelConfig
cfg = ModelConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=3, out_dim=3, text_dim=8, text_len=4)
torch.manual_seed(0)
m = CausalWanModel(cfg).eval()
for p in m.parameters():
    torch.nn.init.normal_(p, std=0.1)
x, t, ctx = torch.randn(1, 6, 3, 4, 4), torch.full((1, 6), 500.0), torch.randn(1, 4, 8)
with torch.no_grad():
    full = m(x, t, ctx)  # the training forward, block-causal
    cache = KVCache.for_model(cfg, 1, 6, (4, 4))
    cached = torch.cat([m.forward_cached(x[:, a:a + 3], t[:, a:a + 3], ctx, cache, a) for a in (0, 3)], 1)
print("ok", full.shape == (1, 6, 3, 4, 4), torch.allclose(full, cached, atol=1e-5))
"""),
    "sample": (["sample.py", "model.py", "kvcache.py", "lora.py"], """
import torch
from kvcache import KVCache
from model import CausalWanModel, ModelConfig
from sample import GeneratorNoise, generate, make_generators
cfg = ModelConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=3, out_dim=3, text_dim=8, text_len=4)
torch.manual_seed(0)
m = CausalWanModel(cfg).eval()
for p in m.parameters():
    torch.nn.init.normal_(p, std=0.1)
ctx = torch.randn(2, 4, 8)
video = generate(m, ctx, KVCache.for_model(cfg, 2, 6, (4, 4)), 6, GeneratorNoise(make_generators([1, 2]), (3, 4, 4)))
print("ok", video.shape == (2, 6, 3, 4, 4), bool(torch.isfinite(video).all()))
"""),
}


@pytest.mark.parametrize("name", list(CASES))
def test_copied_alone_it_runs(name, tmp_path):
    files, snippet = CASES[name]
    for f in files:
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    # a clean interpreter: no pytest path, no PYTHONPATH, the empty folder as its only project dir
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, '.')\n" + snippet],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    words = r.stdout.split()
    assert words[0] == "ok" and len(words) > 1 and all(w == "True" for w in words[1:]), r.stdout
