"""
Make tests/fixtures/hpsv3/: a tiny random HPSv3 in its real file layout, a few fixed video frames
and prompts, and the scores that HPSv3's OWN code gives them. tests/test_hpsv3.py then checks that
reward_hpsv3.py (our port onto the current transformers) gives the same numbers.

HPSv3 (Ma et al. 2025, PyPI `hpsv3` 1.0.0, github.com/MizzenAI/HPSv3) pins transformers==4.45.2,
which cannot live beside this project's transformers 5.x; so this script runs in a throw-away
folder of packages put in front of the project's venv (same python, same torch):

    . .venv/bin/activate
    pip install --no-deps --target /tmp/env_hpsv3 transformers==4.45.2 "tokenizers<0.21" \
        "huggingface_hub<1.0" hpsv3==1.0.0 trl==0.11.4 peft==0.13.2 accelerate==1.0.1 fire \
        omegaconf antlr4-python3-runtime==4.9.3 pandas matplotlib datasets==3.0.1 pyarrow \
        dill==0.3.8 multiprocess==0.70.16 xxhash fsspec==2024.6.1 aiohttp aiohappyeyeballs \
        aiosignal frozenlist multidict yarl propcache attrs rich tensorboard \
        tensorboard-data-server protobuf markdown werkzeug absl-py grpcio termcolor tqdm pyyaml
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/env_hpsv3 python tools/make_hpsv3_fixtures.py

(everything `hpsv3/inference.py` imports on its way to the model: its trainer module pulls in
trl, peft, datasets, pandas, matplotlib and tensorboard). Made with: python 3.11.7, torch 2.14.1
(CPU), transformers 4.45.2, tokenizers 0.20.3, hpsv3 1.0.0, Pillow 13.0.0; the JSON records them.

What runs is HPSv3's code, changed only where a CPU without downloads needs it:
  - its config hpsv3/config/HPSv3_7B.yaml, with model_name_or_path -> the tiny folder,
    torch_dtype float32, bf16 off, SDPA (disable_flash_attn2), no gradient checkpointing, no
    tensorboard; everything else (ranknet head, 2 outputs, special reward token) as shipped;
  - HPSv3RewardInferencer(config, checkpoint, device="cpu") builds the model and processor with
    hpsv3/train.py:create_model_and_processor and loads the checkpoint strictly, as released;
  - frames are scored the way Astrolabe's video_hpsv3_local does (github.com/franklinz233/
    Astrolabe, astrolabe/rewards.py:67-123): each frame rounded to uint8, a PIL image, the
    prompt repeated per frame, 4 images per reward() call, mu = logits[:, 0], video reward = mean
    of the top max(1, int(0.3 F)) frame scores.
The tiny files (all random, made here; no real weight is involved):
  Qwen2-VL-7B-Instruct/  config.json in the released flat layout (hidden 32, 2 layers, 2 heads, 1
      kv head, vision depth 2 / width 32 / 2 heads, vocab 448), model.safetensors (random bf16
      base weights, as the released folder holds bf16, all overwritten by HPSv3's strict load), generation_config.json, preprocessor_config.json
      (Qwen2VLImageProcessor, the released values), tokenizer.json (a byte-level BPE of 400 tokens
      trained here with Qwen2's pre-tokenizer, plus Qwen2-VL's 14 special tokens in their order),
      tokenizer_config.json and chat_template.json (Qwen2-VL-Instruct's template);
  HPSv3.safetensors  every tensor of HPSv3's model (4.45 key names, after its resize of the
      embeddings to len(tokenizer) + <|Reward|>), drawn at seed 1 with 1/sqrt(fan_in) scales so the
      image moves the score.
"""
import json
import os
import sys

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                   "hpsv3")
BASE = os.path.join(OUT, "Qwen2-VL-7B-Instruct")
PROMPTS = ["a red fox running in the snow", "a calm lake at dawn, mist over the water"]
B, F, H, W = 2, 3, 48, 80  # videos, frames, pixels: upscaled by HPSv3's resize to 364 x 588

# Qwen2-VL-Instruct's chat template (its chat_template.json), a system turn added when none given
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for "
    "message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if "
    "message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in "
    "message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in "
    "content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ "
    "image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif "
    "content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif "
    "%}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] "
    "}}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt "
    "%}<|im_start|>assistant\n{% endif %}")
# Qwen2's special tokens, in the order (and so the relative ids) of the released tokenizer
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
            "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
            "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2's pre-tokenizer split (its tokenizer.json)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
N_BPE = 400  # byte alphabet (256) + 144 merges; the special tokens get ids 400..413


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def make_tokenizer(corpus):
    """A small byte-level BPE built the way Qwen2's tokenizer.json is: NFC, regex split, byte
    level, no BOS; then the special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, \
        processors, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=N_BPE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    assert tok.get_vocab_size() == N_BPE
    tok.add_special_tokens(SPECIALS)
    tok.save(os.path.join(BASE, "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    write_json(os.path.join(BASE, "tokenizer_config.json"), {
        "add_prefix_space": False, "bos_token": None, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                                      "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                                      "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                                      "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                      "<|video_pad|>"],
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
                                 for t, i in ids.items()}})
    write_json(os.path.join(BASE, "chat_template.json"), {"chat_template": CHAT_TEMPLATE})
    return ids


def make_base(ids):
    """config.json in Qwen2-VL-7B-Instruct's flat layout at tiny sizes, and random base weights."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    cfg = {
        "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"], "hidden_act": "silu", "hidden_size": 32,
        "initializer_range": 0.02, "intermediate_size": 128, "max_position_embeddings": 32768,
        "max_window_layers": 2, "model_type": "qwen2_vl", "num_attention_heads": 2,
        "num_hidden_layers": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {"depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3,
                          "hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2},
        # head_dim 16 -> 8 rotary frequencies, split over (t, h, w) like the real [16, 24, 24] of 64
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "vocab_size": 448}
    write_json(os.path.join(BASE, "config.json"), cfg)
    write_json(os.path.join(BASE, "generation_config.json"), {
        "bos_token_id": ids["<|endoftext|>"], "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"],
        "temperature": 0.01, "top_k": 1, "top_p": 0.001, "transformers_version": "4.45.2"})
    write_json(os.path.join(BASE, "preprocessor_config.json"), {
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"})
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(BASE))
    from safetensors.torch import save_file
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
              os.path.join(BASE, "model.safetensors"), metadata={"format": "pt"})


def randomise(model, seed=1):
    """HPSv3's weights at random: matrices ~ N(0, 1/fan_in) so activations keep their scale,
    norms and the head's output bias 1 + 0.1 N, other biases 0.1 N (the init of the real file is irrelevant: all of it is loaded)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        n = torch.randn(v.shape, generator=g)
        if v.ndim >= 2:
            sd[k] = n / (v[0].numel() ** 0.5)
        elif "norm" in k or ".ln" in k or "ln_q" in k or k == "rm_head.5.bias":
            sd[k] = 1 + 0.1 * n  # the output bias too: mu near 1, so relative errors mean something
        else:
            sd[k] = 0.1 * n
    return sd


def frames():
    """[B, F, 3, H, W] uint8: smooth random colour fields (7 x 11 noise, bilinear) + fine noise."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(B * F, 3, 7, 11, generator=g)
    x = torch.nn.functional.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)
    x = (x + 0.1 * torch.rand(B * F, 3, H, W, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).view(B, F, 3, H, W)


def main():
    import PIL
    import tokenizers
    import transformers
    from importlib.metadata import version
    from PIL import Image
    from safetensors.torch import save_file
    assert transformers.__version__ == "4.45.2", "run in the throw-away env (see the docstring)"
    os.makedirs(BASE, exist_ok=True)
    from hpsv3.dataset.data_collator_qwen import INSTRUCTION, prompt_with_special_token
    corpus = [INSTRUCTION, prompt_with_special_token, *PROMPTS] * 4
    ids = make_tokenizer(corpus)
    make_base(ids)

    # their config, pointed at the tiny files and a CPU in float32
    import yaml
    import hpsv3
    cfg_path = os.path.join(os.path.dirname(hpsv3.__file__), "config", "HPSv3_7B.yaml")
    cfg = yaml.safe_load(open(cfg_path))
    cfg.update(model_name_or_path=BASE, torch_dtype="float32", bf16=False,
               disable_flash_attn2=True, gradient_checkpointing=False, report_to="none",
               output_dir="/tmp/hpsv3_fixture_out", dataloader_num_workers=0)
    tmp_cfg = "/tmp/hpsv3_fixture_out/HPSv3_tiny.yaml"
    os.makedirs(os.path.dirname(tmp_cfg), exist_ok=True)
    yaml.safe_dump(cfg, open(tmp_cfg, "w"))

    # HPSv3.safetensors: every tensor of their model, at random
    from hpsv3.train import create_model_and_processor
    from hpsv3.utils.parser import DataConfig, ModelConfig, PEFTLoraConfig, TrainingConfig, \
        parse_args_with_yaml
    (_, targs, mcfg, pcfg), _ = parse_args_with_yaml(
        (DataConfig, TrainingConfig, ModelConfig, PEFTLoraConfig), tmp_cfg, is_train=False)
    model, processor, _ = create_model_and_processor(mcfg, pcfg, targs)
    save_file(randomise(model), os.path.join(OUT, "HPSv3.safetensors"), metadata={"format": "pt"})
    reward_id = processor.tokenizer.convert_tokens_to_ids("<|Reward|>")
    del model

    # their inferencer, as Astrolabe's video_hpsv3_local calls it
    from hpsv3 import HPSv3RewardInferencer
    scorer = HPSv3RewardInferencer(tmp_cfg, os.path.join(OUT, "HPSv3.safetensors"), device="cpu")
    videos = frames()
    flat = videos.flatten(0, 1).permute(0, 2, 3, 1).numpy()  # [B*F, H, W, 3] uint8
    images = [Image.fromarray(a) for a in flat]
    prompts = [p for p in PROMPTS for _ in range(F)]
    logits = []
    with torch.no_grad():
        for i in range(0, len(images), 4):  # reward_batch_size = 4, as released
            logits.append(scorer.reward(images[i:i + 4], prompts[i:i + 4]))
    logits = torch.cat(logits).view(B, F, 2)  # (mu, sigma) per frame
    mu = logits[..., 0]
    k = max(1, int(F * 0.3))
    video = [sum(sorted(s, reverse=True)[:k]) / k for s in mu.tolist()]
    first = scorer.prepare_batch(images[:1], prompts[:1])  # what one frame becomes, for debugging

    from hpsv3.dataset.utils import smart_resize
    sizes = [(48, 80), (480, 832), (720, 1280), (256, 256), (33, 47), (1080, 1920)]
    save_file({"videos": videos.contiguous()}, os.path.join(OUT, "inputs.safetensors"))
    write_json(os.path.join(OUT, "scores.json"), {
        "what": "HPSv3's own code on the tiny files; see tools/make_hpsv3_fixtures.py",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "hpsv3": version("hpsv3"), "Pillow": PIL.__version__, "numpy": np.__version__},
        "prompts": PROMPTS, "shape": [B, F, 3, H, W], "reward_token_id": reward_id,
        "frame_mu": mu.tolist(), "frame_sigma": logits[..., 1].tolist(), "video_top30": video,
        "first_frame": {"input_ids": first["input_ids"][0].tolist(),
                        "image_grid_thw": first["image_grid_thw"].tolist(),
                        "pixel_values_sum": first["pixel_values"].double().sum().item(),
                        "pixel_values_shape": list(first["pixel_values"].shape)},
        "smart_resize_256x28x28": {f"{h}x{w}": list(smart_resize(h, w, 28, 200704, 200704))
                                   for h, w in sizes}})
    print("frame mu", mu.tolist(), "\nvideo", video)


if __name__ == "__main__":
    main()
