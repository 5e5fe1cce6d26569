"""
The real-model path end to end at toy size: `train.py self-forcing` and `sample.py --model wan-1.3b`
with a Self-Forcing-layout generator file, a Diffusers-layout Wan VAE and umT5 + tokenizer, all
tiny and random (the wan-1.3b entry of model.CONFIGS is swapped for a toy of the same kind:
16 latent channels, 1x2x2 patches, the text encoder's width).

Test: python -m pytest tests/test_real_path.py -q
"""
import dataclasses
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import model as model_lib
import sample
import train
from common import UsageError
from test_frozen import TINY_T5, TINY_VAE, randomise, tiny_tokenizer

TOY = model_lib.ModelConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=TINY_T5["d_model"])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("real")
    randomise(diffusers.AutoencoderKLWan(**TINY_VAE), 0).save_pretrained(d / "wan" / "vae")
    t5 = transformers.UMT5EncoderModel(transformers.UMT5Config(**TINY_T5))
    randomise(t5, 1).save_pretrained(d / "wan" / "text_encoder")
    tiny_tokenizer(d / "wan" / "tokenizer")
    torch.manual_seed(2)
    dit = model_lib.CausalWanModel(TOY)
    torch.nn.init.normal_(dit.head.head.weight, std=0.5)  # a zero head would decode one flat video
    torch.save({"generator_ema": {"model." + k: v for k, v in dit.state_dict().items()}}, d / "sf.pt")
    return d


def test_train_self_forcing_preset_end_to_end(files, tmp_path, monkeypatch):
    monkeypatch.setitem(model_lib.CONFIGS, "wan-1.3b", TOY)
    wan = str(files / "wan")
    args = dataclasses.replace(
        train.PRESETS["self-forcing"], ckpt=str(files / "sf.pt"), vae=wan, text_encoder=wan,
        height=32, width=32, num_frames=6, prompts=["a red circle moving left", "a blue square"],
        prompts_per_step=2, group_size=2, micro_batch=2, steps=2, lr=1e-3, lora_rank=4, lora_alpha=4.0,
        rewards=["colorfulness=1"], eval_prompts=1, eval_every=2, ckpt_every=0, progress=False,
        out_dir=str(tmp_path))
    train.main(args)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["grad_norm"] > 0 for r in steps)
    assert len({r["reward_mean"] for r in steps}) == 2  # rewards computed on decoded videos
    import imageio.v2 as imageio
    frames = imageio.mimread(str(tmp_path / "eval" / "step_000002.mp4"))
    assert len(frames) == 1 + 4 * (6 - 1) and frames[0].shape == (32, 32, 3)  # VAE: 6 latents -> 21
    assert os.path.isfile(tmp_path / "ckpt_000002" / "lora" / "adapter_model.safetensors")


def test_sample_wan_streams_the_decode(files, tmp_path, monkeypatch):
    monkeypatch.setitem(model_lib.CONFIGS, "wan-1.3b", TOY)
    wan = str(files / "wan")
    out = tmp_path / "v.mp4"
    sample.main(sample.Args(model="wan-1.3b", ckpt=str(files / "sf.pt"), vae=wan, text_encoder=wan,
                            prompts=["a red circle"], num_frames=6, height=32, width=48, out=str(out)))
    import imageio.v2 as imageio
    frames = imageio.mimread(str(out))
    assert len(frames) == 21 and frames[0].shape == (32, 48, 3)
    assert max(f.std() for f in frames) > 0  # not a blank video
    with pytest.raises(UsageError, match=r"not found: --ckpt .*nowhere.pt, --vae .*no_vae \(README"):
        sample.main(sample.Args(model="wan-1.3b", ckpt=str(files / "nowhere.pt"), vae=str(files / "no_vae"),
                                text_encoder=wan, out=str(out)))
    with pytest.raises(UsageError, match="multiples of 16"):
        sample.main(sample.Args(model="wan-1.3b", ckpt=str(files / "sf.pt"), vae=wan, text_encoder=wan,
                                height=40, out=str(out)))
