"""
Device placement on a GPU, checked without one: the rollout (model, KV cache, sampler, LoRA
adapters, a streaming history) and the NFT update (three x0 predictions, the loss, gradient
clipping, the optimizer step, the θ_old / EMA / reference adapters) run with the model on a *fake*
CUDA device; so does the real-model path (a Wan-layout checkpoint loaded as train.py loads it, umT5,
the Wan VAE decoding whole, block by block and in tiles), on small random files.
PyTorch's FakeTensorMode gives tensors a device, shape and dtype but no data, and raises, as CUDA
would, when a tensor made on the CPU meets one on the GPU (0-dim CPU scalars excepted, as on
CUDA). Here only the tensors on "cuda" are fake: everything on the CPU (seeds, generators, the
timestep grid) runs for real, so the code takes its ordinary path. What this cannot see: numbers
(a fake tensor has none), backward (autograd's engine asks the driver for a context: the
gradients are set as backward would place them; the CPU twin runs backward), autocast (off without
a CUDA driver: these runs are float32; bf16 + autocast is tested on the CPU, tests/test_scale.py),
kernels and memory (tools/gpu_check.py).

Test:  python -m pytest tests/test_fake_cuda.py -q      (CPU, ~21 s on 2 cores)
Shape legend: n samples, T window frames, C channels, H, W pixels (the tiny model works in pixels).
"""
import os
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils import _pytree as pytree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gpu_check  # random Wan files in the real layouts, at a small width
import train
from checkpoints import load_base
from frozen import FrozenParts
from lora import adapter_params, copy_adapter, lerp_adapter, use_adapter
from model import CONFIGS, CausalWanModel, randomize_head
from streaming import rollout, rollout_histories, rollout_windows


def _names_cuda(x):
    """A device= argument that asks for the GPU."""
    return isinstance(x, (torch.device, str)) and str(x).startswith("cuda")


class FakeGPU(FakeTensorMode):
    """Tensors on "cuda" are fake (no data, no driver needed); every op without one runs for real.

    A read of a fake tensor's value (`bool(mask.any())`, `.item()`) has nothing to read: it gets
    1 (True), enough for the code to go on along its ordinary path. This checks devices, not numbers."""

    def __init__(self):
        # allow_non_fake_inputs: a real CPU tensor may reach a GPU op, where the device check judges it;
        # a ShapeEnv: a size that depends on values (x[mask]) becomes a symbol instead of an error
        super().__init__(allow_non_fake_inputs=True, shape_env=ShapeEnv())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = pytree.tree_leaves((args, kwargs))
        on_gpu = any(isinstance(a, FakeTensor) for a in leaves) or _names_cuda(kwargs.get("device"))
        if not on_gpu:  # a CPU op: run it for real, outside the fake mode
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:  # a value read of a GPU tensor
            return True if args[0].dtype == torch.bool else 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def tiny_args(*flags):
    """The tiny run: 2 prompts x 2 candidates, 6 frames, windows of 3 (step 1 trains frames [3, 6)
    on a history), float32."""
    return train.parse_args(["--num-frames", "6", "--window", "3", "--prompts-per-step", "2", "--group-size", "2",
                             "--micro-batch", "2", "--bf16", "off", *flags])


def rl_step_on(device, args):
    """One RL step's tensors, as train.main runs them, on `device`: the rollout of the window [3, 6)
    after a shared history, then the NFT update of the first micro-batch and the adapters' moves.
    Returns the tensors it made, by name."""
    torch.manual_seed(0)
    model = CausalWanModel(CONFIGS["tiny"])
    randomize_head(model)
    train.add_policies(model, args)  # θ, θ_old, ref (--selective), ema
    model.to(device)
    params = adapter_params(model, "default")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr)
    ctx = torch.randn(4, 8, CONFIGS["tiny"].text_dim).to(device)  # (n, Lt, Dt) as FrozenParts.embed gives
    js, K, s = range(4), args.group_size, 3  # this rank's samples, candidates per prompt, window start
    model.eval()
    with use_adapter(model, "old"):
        history = rollout_histories(model, ctx, js, K, 0, s, args)
        x0 = rollout_windows(model, ctx, js, K, 0, s, history, args)  # (n, T, C, H, W)
    model.train()
    r = torch.tensor([0.2, 0.8, 0.5, 0.5], device=device)  # (n,) as optimality_prob gives, on the device
    kl_mask = torch.tensor([True, False, True, True], device=device)
    loss, kl, kl_all, theta_old = train.nft_microbatch(
        model, args, x0=x0[:2], ctx=ctx[:2], r=r[:2], kl_mask=kl_mask[:2], history=history.for_samples(0, 2),
        step=0, first_sample=0, start=s, autocast=torch.autocast(torch.device(device).type, enabled=False))
    if device == "cuda":  # autograd's engine asks the driver for a CUDA context: no backward here;
        # gradients where backward puts them, on each parameter's own device (no custom autograd.Function exists)
        for p in params:
            p.grad = torch.zeros_like(p)
    else:
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    opt.step()
    lerp_adapter(model, "ema", "default", 0.9)
    lerp_adapter(model, "old", "default", 0.5)
    if args.selective:
        copy_adapter(model, "default", "ref")
    return {"x0": x0, "loss": loss, "kl": kl, "kl_all": kl_all, "theta_old": theta_old, "grad_norm": grad_norm,
            "grad": params[0].grad, "adam": opt.state[params[0]]["exp_avg"], "ema": adapter_params(model, "ema")[0]}


@pytest.mark.parametrize("flags", [(), ("--selective", "--local-attn", "4", "--sink", "1", "--window-context", "noisy")],
                         ids=["default", "selective-rolling-cache"])
def test_an_rl_step_keeps_every_tensor_on_the_gpu(flags):
    args = tiny_args(*flags)
    with FakeGPU():
        out = rl_step_on("cuda", args)
    for name, t in out.items():
        assert isinstance(t, FakeTensor) and t.device.type == "cuda", name
    assert out["x0"].shape == (4, 3, 3, 32, 32) and out["loss"].shape == ()
    cpu = rl_step_on("cpu", args)  # the same step for real on the CPU: the same shapes, a loss, a gradient
    assert {k: tuple(v.shape) for k, v in cpu.items()} == {k: tuple(v.shape) for k, v in out.items()}
    assert torch.isfinite(cpu["loss"]) and cpu["grad_norm"] > 0


def test_the_real_model_path_keeps_every_tensor_on_the_gpu(tmp_path):
    # a Wan-layout generator (Wan's blocks at width 64), a narrow Wan2.1 VAE and a one-layer umT5, as
    # train.py's real presets load them: --ckpt, --vae and --text-encoder
    pytest.importorskip("diffusers")
    gen = gpu_check.write_random_files(str(tmp_path), gpu_check.TINY_WAN, "cpu", gpu_check.TINY_VAE)
    args = train.parse_args(["self-forcing", "--ckpt", gen, "--vae", str(tmp_path), "--text-encoder", str(tmp_path),
                             "--prompts", "a fox in the snow", "--rewards", "colorfulness=1", "--height", "64",
                             "--width", "64", "--num-frames", "6", "--bf16", "off"])
    prompts = ["a fox in the snow", "a cat in the snow"]
    with FakeGPU():
        frozen = FrozenParts(args, prompts, "cuda")  # umT5 embeds on the GPU, the rows wait on the CPU
        ctx = frozen.embed(prompts)  # (B, Lt, Dt)
        model = load_base(args, "cuda", torch.float32, cfg=gpu_check.TINY_WAN)  # meta, assigned, moved
        lat = rollout(model, ctx, [1, 2], 6, args)  # (B, F, C, h, w): 6 latent frames of 8 x 8
        whole = frozen.decode(lat)  # (B, Fp, 3, Hp, Wp)
        stream = frozen.vae.stream()  # sample.py's block-by-block decode
        blocks = torch.cat([stream.push(lat[:, :3]), stream.push(lat[:, 3:])], dim=1)
        frozen.vae.tile(32)  # --vae-tile: diffusers' tiled decode
        tiled = frozen.decode(lat)
    for name, t in {"ctx": ctx, "lat": lat, "whole": whole, "blocks": blocks, "tiled": tiled}.items():
        assert isinstance(t, FakeTensor) and t.device.type == "cuda", name
    assert lat.shape == (2, 6, 16, 8, 8)
    assert whole.shape == tiled.shape == (2, 21, 3, 64, 64) and blocks.shape == (2, 21, 3, 64, 64)


def test_the_fake_gpu_catches_a_cpu_tensor_meeting_a_gpu_one():
    with FakeGPU():
        x = torch.randn(2, 3).to("cuda")
        assert (x + torch.tensor(1.0)).device.type == "cuda"  # a 0-dim CPU scalar is allowed, as on CUDA
        with pytest.raises(RuntimeError, match="devices"):
            x + torch.randn(2, 3)  # the bug class this file guards against
