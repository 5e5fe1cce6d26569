"""
Builds the VideoAlign fixtures under tests/fixtures/videoalign/ by running THEIR code: a tiny random
Qwen2-VL-2B-Instruct-shaped base model and a tiny random VideoReward checkpoint, both in the real
file layouts, scored by the Astrolabe release's own VideoAlignScorer
(franklinz233/Astrolabe astrolabe/scorers/video/videoalign.py, which vendors KwaiVGI/VideoAlign in
astrolabe/reward_models/videoalign/) on two small fixed videos. tests/test_videoalign.py then checks
that reward_videoalign.py, on the current transformers, gives the same scores.

Their code pins transformers 4.45.2, so this runs in a throw-away environment, never the project's:
    pip install --no-deps --target /tmp/env_videoalign transformers==4.45.2 tokenizers==0.20.3 \
        huggingface_hub==0.29.1 peft==0.10.0 accelerate==1.4.0 pandas==2.2.3 \
        python-dateutil pytz tzdata six
    git clone https://github.com/franklinz233/Astrolabe /tmp/astrolabe_src   # read at commit 35a5347
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/env_videoalign python tools/make_videoalign_fixtures.py \
        --astrolabe /tmp/astrolabe_src
(the project venv's python, torch 2.14.1, torchvision 0.29.1, numpy 2.4 and PIL under it; versions are
recorded in scores.json). Their pins that we do not install, and why: trl and datasets are imported by
their training modules only; two stub modules stand in (trl.get_quantization_config returns None, as trl
does without 4/8-bit loading). The one patch to their code path: flash-attention 2 is hard-coded
(wan_inference.py:45, train_reward.py:105); we pass disable_flash_attn2=True, i.e. SDPA, on CPU in
float32.

Two loaders are scored. "released": their load_model_from_checkpoint (utils.py:163-214) rewrites every
key "base_model.model.model.*" to "base_model.model.*" and loads with strict=False - against a
checkpoint saved by their own training code (a PEFT model on transformers 4.45, the layout of the
official KlingTeam/VideoReward checkpoint-11352/model.pth) that drops every language-model key, so
the LoRA deltas never load (the LLM keeps the base weights; the embeddings still load through the tied
lm_head). "full": the same checkpoint loaded strictly, every key, as VideoAlign itself means it.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import types

import torch

REWARD_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
# Qwen2-VL's added tokens, in its tokenizer's order (ids follow the BPE vocabulary)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                 "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                 "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-Instruct's chat template (its chat_template.json / tokenizer_config.json)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message"
    " in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a "
    "helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content"
    "'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content']"
    " %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set "
    "image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}:"
    " {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or "
    "'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif "
    "'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor "
    "%}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PROMPTS = ["a red fox running through fresh snow", "waves breaking on a rocky shore at sunset, slow pan"]


def stub_training_only_modules():
    """trl and datasets are imported by their training modules only (train_reward.py, trainer.py)."""
    trl = types.ModuleType("trl")
    trl.get_quantization_config = lambda model_config: None  # no 4/8-bit loading
    trl.get_kbit_device_map = lambda: None
    trl.RewardTrainer = type("RewardTrainer", (), {})
    datasets = types.ModuleType("datasets")
    datasets.load_dataset = datasets.concatenate_datasets = None
    sys.modules.update(trl=trl, datasets=datasets)


def tiny_tokenizer(text):
    """A byte-level BPE in Qwen2's tokenizer.json format, trained on the prompt text, + its specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer)
    tok.add_special_tokens(QWEN_SPECIALS)
    return tok


def build_base(folder, text):
    """Tiny Qwen2-VL: tokenizer, configs, random weights, saved by transformers 4.45 itself."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    os.makedirs(folder, exist_ok=True)
    tok = tiny_tokenizer(text)
    tok.save(os.path.join(folder, "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIALS}
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for t, i in ids.items()}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"add_prefix_space": False, "added_tokens_decoder": decoder,
                   "additional_special_tokens": QWEN_SPECIALS[1:],
                   "bos_token": None, "chat_template": CHAT_TEMPLATE,
                   "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
                   "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
                   "padding_side": "left", "split_special_tokens": False,
                   "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}, f, indent=2)
    with open(os.path.join(folder, "chat_template.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE}, f, indent=2)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:  # Qwen2-VL-2B's values
        json.dump({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
                   "temporal_patch_size": 2, "merge_size": 2,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711],
                   "image_processor_type": "Qwen2VLImageProcessor",
                   "processor_class": "Qwen2VLProcessor"}, f, indent=2)
    # Qwen2-VL-2B's shape, shrunk: hidden 1536 -> 48, 28 layers -> 2, vision 32 blocks x 1280 -> 2 x 16;
    # vocab above the tokenizer's size, as 151936 > 151660 (the reward model shrinks it)
    cfg = Qwen2VLConfig(
        vocab_size=tok.get_vocab_size() + 3 + 13, hidden_size=48, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=32768,
        sliding_window=32768, max_window_layers=2, torch_dtype="float32",
        rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]},  # sums to head_dim / 2 = 6
        vision_config={"depth": 2, "embed_dim": 16, "hidden_size": 48, "mlp_ratio": 2, "num_heads": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"])
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(folder, safe_serialization=True)


def build_checkpoint(folder, workdir):
    """model_config.json like the official one (LoRA r/alpha shrunk) and checkpoint-11352/model.pth:
    the PEFT model their create_model_and_processor builds, weights moved as training would move them
    (LoRA B away from zero, reward head, vision tower and embeddings changed; frozen base layers kept)."""
    from astrolabe.reward_models.videoalign.train_reward import create_model_and_processor
    from astrolabe.reward_models.videoalign.utils import ModelConfig, PEFTLoraConfig, TrainingConfig
    cfg = {"data_config": {"meta_data": "/path/to/meta.csv", "data_dir": "/path/to/videos",
                           "meta_data_test": None, "max_frame_pixels": 200704, "num_frames": None,
                           "fps": 2.0, "p_shuffle_frames": 0.0, "p_color_jitter": 0.0,
                           "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special",
                           "add_noise": False, "sample_type": "uniform", "use_tied_data": True},
           "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "model_revision": "main",
                            "output_dim": 1, "use_special_tokens": True, "freeze_vision_tower": False,
                            "freeze_llm": False, "tune_merger": False, "torch_dtype": "float32",
                            "trust_remote_code": False, "attn_implementation": None,
                            "load_in_8bit": False, "load_in_4bit": False, "bnb_4bit_quant_type": "nf4",
                            "use_bnb_nested_quant": False, "reward_token": "special",
                            "loss_type": "regular"},
           "peft_lora_config": {"lora_enable": True, "vision_lora": False, "lora_r": 4, "lora_alpha": 8,
                                "lora_dropout": 0.05, "lora_target_modules": None,
                                "lora_namespan_exclude": ["lm_head", "rm_head", "embed_tokens", "visual"],
                                "lora_modules_to_save": None, "lora_task_type": "CAUSAL_LM",
                                "use_rslora": False, "num_lora_modules": -1},
           "inference_config": {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646,
                                "MQ_std": 1.3811, "TA_mean": 2.8105, "TA_std": 2.5121}}
    os.makedirs(os.path.join(folder, "checkpoint-11352"), exist_ok=True)
    with open(os.path.join(folder, "model_config.json"), "w") as f:
        json.dump(cfg, f, indent=4)
    model, _, _ = create_model_and_processor(
        ModelConfig(**cfg["model_config"]), PEFTLoraConfig(**cfg["peft_lora_config"]),
        TrainingConfig(output_dir=workdir, disable_flash_attn2=True))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "rm_head" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "visual" in name or "embed_tokens" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    sd = model.state_dict()
    torch.save(sd, os.path.join(folder, "checkpoint-11352", "model.pth"))
    return sorted(sd)


def videos():
    """Two colourful moving videos in [0, 1], [2, 6, 3, 24, 40], not on the 1/255 grid."""
    g = torch.Generator().manual_seed(2)
    t = torch.arange(6).view(1, 6, 1, 1, 1).float()
    y = torch.linspace(0, 1, 24).view(1, 1, 1, 24, 1)
    x = torch.linspace(0, 1, 40).view(1, 1, 1, 1, 40)
    phase = torch.tensor([0.0, 2.0, 4.0]).view(1, 1, 3, 1, 1)
    speed = torch.tensor([0.15, 0.4]).view(2, 1, 1, 1, 1)
    v = 0.5 + 0.4 * torch.sin(6 * x + 3 * y + phase + speed * t * 6)
    return (v + 0.05 * torch.rand(v.shape, generator=g)).clamp(0, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--astrolabe", required=True, help="checkout of franklinz233/Astrolabe")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "tests", "fixtures", "videoalign"))
    args = ap.parse_args()
    import PIL, peft, tokenizers, torchvision, transformers
    assert transformers.__version__ == "4.45.2", "run in the pinned throw-away env (see docstring)"
    stub_training_only_modules()
    sys.path.insert(0, os.path.abspath(args.astrolabe))
    from astrolabe.reward_models.videoalign import prompt_template, utils, wan_inference
    from astrolabe.scorers.video.videoalign import VideoAlignScorer

    weights = os.path.join(os.path.abspath(args.out), "weights")
    base, ckpt = os.path.join(weights, "Qwen2-VL-2B-Instruct"), os.path.join(weights, "VideoReward")
    work = tempfile.mkdtemp()
    os.makedirs(os.path.join(work, "Qwen"))
    os.symlink(base, os.path.join(work, "Qwen", "Qwen2-VL-2B-Instruct"))
    os.chdir(work)  # model_name_or_path "Qwen/Qwen2-VL-2B-Instruct" resolves to the tiny base here

    text = prompt_template.DETAILED_PROMPT_WITH_SPECIAL_TOKEN + " ".join(PROMPTS)
    build_base(base, text)
    ckpt_keys = build_checkpoint(ckpt, work)

    # the only patch: SDPA instead of the hard-coded flash-attention 2
    def sdpa_config(**kw):
        kw["disable_flash_attn2"] = True
        return utils.TrainingConfig(**kw)
    wan_inference.TrainingConfig = sdpa_config
    strict_loader = utils.load_model_from_checkpoint

    def full_loader(model, checkpoint_dir, step):  # every key, strictly: what VideoAlign means
        sd = torch.load(os.path.join(checkpoint_dir, "checkpoint-11352", "model.pth"),
                        map_location="cpu", weights_only=True)
        model.load_state_dict(sd, strict=True)
        return model, "11352"

    v = videos()
    out = {"versions": {"transformers": transformers.__version__, "peft": peft.__version__,
                        "tokenizers": tokenizers.__version__, "torch": torch.__version__,
                        "torchvision": torchvision.__version__, "PIL": PIL.__version__,
                        "astrolabe_commit": "35a5347"},
           "prompts": PROMPTS, "scores": {}}
    for loader_name, loader in (("released", strict_loader), ("full", full_loader)):
        wan_inference.load_model_from_checkpoint = loader
        out["scores"][loader_name] = {}
        for dim, gray in (("VQ", False), ("MQ", True), ("TA", False), ("MQ_rgb", False)):
            scorer = VideoAlignScorer(model_path=ckpt, device="cpu", dtype=torch.float32,
                                      reward_type=dim.split("_")[0], use_grayscale=gray)
            with torch.no_grad():  # the uint8 step of astrolabe/rewards.py:139-140, then the scorer
                u8 = (v * 255).round().clamp(0, 255).to(torch.uint8)
                s = scorer(list(u8), PROMPTS)
            out["scores"][loader_name][dim] = s.tolist()
            if loader_name == "released" and dim == "VQ":  # what their processor fed the model
                batch = scorer.scorer.prepare_batch_from_frames(list(u8), PROMPTS)
                out["input_ids"] = [row[m.bool()].tolist() for row, m in
                                    zip(batch["input_ids"], batch["attention_mask"])]
                out["video_grid_thw"] = batch["video_grid_thw"].tolist()
                sd = scorer.scorer.model.state_dict()
                renamed = [k.replace("base_model.model.model.", "base_model.model.", 1)
                           if k.startswith("base_model.model.model.") else k for k in ckpt_keys]
                out["released_loader_ignores"] = sum(k not in sd for k in renamed)
                out["checkpoint_keys"] = len(ckpt_keys)
    from safetensors.torch import save_file
    save_file({"videos": v}, os.path.join(args.out, "inputs.safetensors"))
    with open(os.path.join(args.out, "scores.json"), "w") as f:
        json.dump(out, f)
    shutil.rmtree(work)
    print(json.dumps({k: out[k] for k in ("versions", "scores", "released_loader_ignores",
                                          "checkpoint_keys")}, indent=1))


if __name__ == "__main__":
    main()
