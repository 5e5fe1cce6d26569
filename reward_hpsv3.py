"""
HPSv3, the image-preference reward Astrolabe trains and reports with, scored as the released code
scores it, from local files, on the current transformers.

What it is. HPSv3 (Ma et al. 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score",
github.com/MizzenAI/HPSv3, PyPI `hpsv3` 1.0.0) is Qwen2-VL-7B-Instruct fine-tuned on human image
preferences, with an MLP head on the hidden state of a special `<|Reward|>` token that gives
(mu, sigma) of a Gaussian preference score; mu is the score. Astrolabe (arXiv 2603.17051) scores
every frame of a video and keeps the mean of the best 30% (github.com/franklinz233/Astrolabe,
astrolabe/rewards.py:67-123, video_hpsv3_local).

Upstream sources, all in hpsv3 1.0.0 unless said (read them beside this file):
  hpsv3/model/qwen2vl_trainer.py   Qwen2VLRewardModelBT: the ranknet head, and a forward that
                                   embeds the image tokens, runs the language model with NO
                                   position ids and pools the `<|Reward|>` token
  hpsv3/train.py                   create_model_and_processor: adds `<|Reward|>` to the tokenizer,
                                   resizes the embeddings to it, head kept in float32, SDPA
                                   without flash-attn
  hpsv3/inference.py               HPSv3RewardInferencer: strict load of HPSv3.safetensors over the
                                   whole model; the chat message per image at 256*28*28 pixels
  hpsv3/dataset/utils.py           fetch_image / smart_resize: the PIL bicubic resize to that size
  hpsv3/dataset/data_collator_qwen.py   INSTRUCTION and the reward prompt (copied below)
  hpsv3/config/HPSv3_7B.yaml       ranknet head, 2 outputs, special reward token, bf16
Their code pins transformers 4.45.2. This file runs the same computation on the current
Qwen2-VL classes (transformers 5.x: Qwen2VLModel = .visual + .language_model) and does the
message, the tokens and the pixels itself, so nothing depends on how a processor behaves today.
tools/make_hpsv3_fixtures.py ran THEIR code on a tiny random model in the real file layout, and
tests/test_hpsv3.py checks this file against those scores.

Files (in reward_models.WEIGHTS_DIR = $ASTRO_WEIGHTS, read when called; nothing is downloaded):
  Qwen2-VL-7B-Instruct/  config.json, tokenizer.json, preprocessor_config.json  (HF
                         Qwen/Qwen2-VL-7B-Instruct; its weight shards are NOT needed: HPSv3's
                         checkpoint holds every tensor of the model)
  HPSv3.safetensors      HF MizzenAI/HPSv3
Cost at real size: 7.75 B parameters kept (vision 0.68 B + language model 7.07 B; the checkpoint's
0.54 B lm_head is skipped), 15.5 GB on the GPU in bf16 (the 3.7 M head in float32); per frame one
forward of ~250-270 image tokens + ~560 prompt tokens (estimate); docs/rewards.md, "Shipped".

Use: --rewards hpsv3=1 (train.REGISTRY holds this file's REWARDS). Test: python -m pytest tests/test_hpsv3.py -q

Shapes: B videos, F frames, n frames scored per video, M images (B*n), m images in one forward
(<= BATCH), L tokens, D hidden width, P patches of 14x14 (x 2 time steps) per image, K = 3*2*14*14
values per patch, G grid (t, h, w) in patches.
"""
import json
import math
import os
from functools import lru_cache

import numpy as np
import torch

import reward_models
from rewards import top_fraction

# the files, by their names in the weights folder (listed, with their sources, in reward_models)
BASE = reward_models.HPSV3_BASE  # Qwen2-VL-7B-Instruct/: all we read of it
BASE_FILES = reward_models.HPSV3_BASE_FILES  # config.json, tokenizer.json, preprocessor_config.json
CHECKPOINT = reward_models.HPSV3_CHECKPOINT  # HPSv3.safetensors
FRAMES = reward_models.FRAMES  # 8 evenly spaced frames by default; 0 = every frame, as released
BATCH = 4  # images per forward: the released reward_batch_size (a 7B VLM at ~900 tokens each)
PIXELS = 256 * 28 * 28  # HPSv3 resizes every image to about this many pixels (min = max)
REWARD_TOKEN = "<|Reward|>"

# The prompt HPSv3 was trained with, verbatim (hpsv3/dataset/data_collator_qwen.py: INSTRUCTION
# followed by prompt_with_special_token); the reward is read off the hidden state of <|Reward|>.
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""
REWARD_PROMPT = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def chat_text(prompt, n_image_tokens):
    """The text Qwen2-VL-Instruct's chat template makes of one user turn [image, text] with the
    generation prompt (its default system turn first), the image placeholder already expanded to
    one <|image_pad|> per merged 28x28 patch, as Qwen2VLProcessor expands it."""
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|>" + "<|image_pad|>" * n_image_tokens + "<|vision_end|>"
            + INSTRUCTION.format(text_prompt=prompt) + REWARD_PROMPT
            + "<|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------------------------
# files

def _require():
    """The paths (base folder, checkpoint), or one line that says which file is missing, in which
    folder, and where it comes from (reward_models.weight_file) - before anything heavy loads.
    The start-up checks find the same files through reward_models.missing_weights(["hpsv3"])."""
    for names in reward_models.LEARNED["hpsv3"]:
        reward_models.weight_file("hpsv3", *names)
    return (os.path.join(reward_models.WEIGHTS_DIR, BASE),
            os.path.join(reward_models.WEIGHTS_DIR, CHECKPOINT))


# ----------------------------------------------------------------------------------------------
# pixels: hpsv3/dataset/utils.py (resize) then Qwen2VLImageProcessor (normalise, patchify)

def smart_resize(h, w, factor=28, min_pixels=PIXELS, max_pixels=PIXELS):
    """Qwen2-VL's target size, sides multiples of `factor`, about min..max pixels, aspect kept
    (hpsv3/dataset/utils.py:smart_resize). With min = max = 256*28*28, a 480x832 frame -> 336x588
    (scaled down, floored), a 48x80 one -> 364x588 (scaled up, ceiled: can pass max_pixels)."""
    if max(h, w) / min(h, w) > 200:
        raise ValueError(f"hpsv3: aspect ratio {max(h, w) / min(h, w):.0f} > 200")
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        # beta = sqrt(h w / max): the scale that brings the area to max_pixels, then floor
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def frame_patches(frame, pre):
    """One frame [3, H, W] uint8 (CPU) -> (patches [P, K] float32, grid (1, h/14, w/14)).

    The resize is PIL's bicubic on the uint8 image, as hpsv3's fetch_image does it (a torch
    bicubic differs by a few grey levels). Then Qwen2VLImageProcessor: its own smart_resize is a
    no-op (sides are already multiples of 28), x / 255, (x - mean) / std, the frame repeated to
    temporal_patch_size = 2 time steps, and patches ordered so each 2x2 block of patches that the
    merger fuses into one token is contiguous."""
    from PIL import Image
    h, w = smart_resize(*frame.shape[1:])
    img = Image.fromarray(frame.permute(1, 2, 0).numpy()).resize((w, h), Image.BICUBIC)
    # rescale in float64 then float32, as transformers' rescale does: [3, h, w]
    x = torch.from_numpy((np.asarray(img, dtype=np.float64) * (1 / 255)).astype(np.float32))
    x = x.permute(2, 0, 1)
    mean = torch.tensor(pre["image_mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(pre["image_std"], dtype=torch.float32).view(3, 1, 1)
    x = (x - mean) / std
    p, m, t = pre["patch_size"], pre["merge_size"], pre["temporal_patch_size"]
    gh, gw = h // p, w // p
    x = x[None].expand(t, -1, -1, -1)  # a still image fills both time steps: [t, 3, h, w]
    # [t, 3, gh/m, m, p, gw/m, m, p] -> [gh/m, gw/m, m, m, 3, t, p, p]: merge blocks contiguous
    x = x.reshape(t, 3, gh // m, m, p, gw // m, m, p).permute(2, 5, 3, 6, 1, 0, 4, 7)
    return x.reshape(gh * gw, 3 * t * p * p), (1, gh, gw)  # [P, K], G


# ----------------------------------------------------------------------------------------------
# the model: Qwen2VLModel (vision tower + language model) and HPSv3's head

class HPSv3(torch.nn.Module):
    """Qwen2VLRewardModelBT's scoring path on the current Qwen2-VL classes. lm_head is not built:
    a reward never generates (it is in the checkpoint and checked there, 1 GB less on the GPU)."""

    def __init__(self, vlm, head, ids):
        super().__init__()
        self.vlm, self.head, self.ids = vlm, head, ids  # ids: token name -> id

    def forward(self, input_ids, attention_mask, pixel_values, grid_thw):
        """input_ids, attention_mask [m, L], pixel_values [sum P, K], grid_thw [m, 3] -> [m, 2]
        (mu, sigma) in float32."""
        text, visual = self.vlm.language_model, self.vlm.visual
        emb = text.embed_tokens(input_ids)  # [m, L, D]
        img = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw).pooler_output  # [sum P/4, D]
        # each <|image_pad|> takes the next merged image token, in order (masked_scatter)
        pad = (input_ids == self.ids["<|image_pad|>"]).unsqueeze(-1)
        emb = emb.masked_scatter(pad, img.to(emb.dtype))
        # No position ids, as HPSv3's forward calls the language model (qwen2vl_trainer.py, the
        # self.model(...) call): positions 0..L-1 on all three M-RoPE axes, NOT Qwen2-VL's
        # (t, h, w) image positions. That is what HPSv3 was trained and scores with.
        hidden = text(inputs_embeds=emb, attention_mask=attention_mask,
                      use_cache=False).last_hidden_state  # [m, L, D]; no KV cache: one pass
        at = input_ids == self.ids[REWARD_TOKEN]  # [m, L], one True per row
        assert (at.sum(1) == 1).all(), "hpsv3: one <|Reward|> token per text expected"
        # the head runs in float32 on the reward token's hidden state (create_model_and_processor
        # keeps rm_head in float32): Linear 1024, ReLU, Dropout, Linear 16, ReLU, Linear 2
        return self.head(hidden[at].float())  # [m, 2]


def ranknet_head(d):
    """HPSv3's rm_head for rm_head_type 'ranknet' with no kwargs; keys rm_head.{0,3,5}.*."""
    nn = torch.nn
    return nn.Sequential(nn.Linear(d, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16),
                         nn.ReLU(), nn.Linear(16, 2))


def convert_keys(sd):
    """HPSv3.safetensors' names (transformers 4.45: model.* is the language model, visual.* the
    vision tower, at the top level) -> this module's (5.x Qwen2VLModel: language_model.*, visual.*,
    under vlm.). Strict: an unknown key is an error, and lm_head.weight, the only key not used,
    must be there."""
    out, unused = {}, {"lm_head.weight"}
    for k, v in sd.items():
        if k.startswith("model."):
            out["vlm.language_model." + k[len("model."):]] = v
        elif k.startswith("visual."):
            out["vlm." + k] = v
        elif k.startswith("rm_head."):
            out["head." + k[len("rm_head."):]] = v
        elif k in unused:
            unused.discard(k)
        else:
            raise KeyError(f"hpsv3: unexpected key {k} in {CHECKPOINT}")
    if unused:
        raise KeyError(f"hpsv3: {CHECKPOINT} lacks {sorted(unused)}: not HPSv3's full checkpoint")
    return out


@lru_cache(maxsize=None)
def load_hpsv3(base, checkpoint, dtype=torch.bfloat16):
    """(model, tokenizer, preprocessor config) from the base folder and the checkpoint, built once
    per (files, dtype). The model is built empty (meta) from config.json with SDPA attention,
    sized to the checkpoint's vocabulary (HPSv3 resized it to the tokenizer + <|Reward|>), then
    every tensor is loaded strictly from HPSv3.safetensors: the base folder's weights are never
    read, since the checkpoint overwrites all of them in HPSv3's own loader."""
    from safetensors import safe_open
    from tokenizers import Tokenizer
    from transformers import Qwen2VLConfig, Qwen2VLModel
    from transformers.models.qwen2_vl import modeling_qwen2_vl as q

    with safe_open(checkpoint, "pt") as f:  # lm_head (0.54 B) only checked for, never read
        sd = {k: None if k == "lm_head.weight" else f.get_tensor(k) for k in f.keys()}
    cfg = Qwen2VLConfig.from_pretrained(base, attn_implementation="sdpa")
    cfg.text_config.vocab_size = sd["model.embed_tokens.weight"].shape[0]  # resized, as trained
    tok = Tokenizer.from_file(os.path.join(base, "tokenizer.json"))
    tok.add_special_tokens([REWARD_TOKEN])  # the next id, as HPSv3's add_special_tokens gives it
    ids = {t: tok.token_to_id(t) for t in ("<|image_pad|>", "<|endoftext|>", REWARD_TOKEN)}
    if ids["<|image_pad|>"] != cfg.image_token_id or ids[REWARD_TOKEN] >= cfg.text_config.vocab_size:
        raise ValueError(f"hpsv3: {base}/tokenizer.json does not match {CHECKPOINT} ({ids})")
    with torch.device("meta"):  # no 8 B random init: every tensor comes from the checkpoint
        model = HPSv3(Qwen2VLModel(cfg), ranknet_head(cfg.text_config.hidden_size), ids)
    model.load_state_dict(convert_keys(sd), strict=True, assign=True)
    # non-persistent buffers (the rotary frequencies) are not in any file: build them for real
    model.vlm.language_model.rotary_emb = q.Qwen2VLRotaryEmbedding(config=cfg.text_config)
    model.vlm.visual.rotary_pos_emb = q.Qwen2VLVisionRotaryEmbedding(cfg.vision_config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"hpsv3: not loaded: {left}"
    model.vlm.to(dtype)
    model.head.float()  # float32 always, as HPSv3 keeps it
    with open(os.path.join(base, "preprocessor_config.json")) as f:
        pre = json.load(f)
    return model.eval().requires_grad_(False), tok, pre


# ----------------------------------------------------------------------------------------------
# the reward

def encode(tok, texts, pad_id):
    """Token ids, right-padded with <|endoftext|> as HPSv3's processor pads (padding_side="right"),
    and the attention mask: [m, L] each."""
    rows = [tok.encode(t).ids for t in texts]
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


@torch.no_grad()
def frame_scores(videos, prompts, frames=FRAMES, batch=BATCH, dtype=None):
    """HPSv3 mu per scored frame: [B, F, 3, H, W] in [0, 1] -> [B, n] float32."""
    base, checkpoint = _require()
    dev = videos.device
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    model, tok, pre = load_hpsv3(base, checkpoint, dtype)
    x = reward_models._subsample(videos, frames)  # [B, n, 3, H, W]
    B, n = x.shape[:2]
    # uint8 frames, as the released code hands HPSv3 PIL images: round(255 x), clamped
    x = (x.float() * 255).round().clamp(0, 255).to(torch.uint8).flatten(0, 1).cpu()  # [M, 3, H, W]
    texts = [p for p in prompts for _ in range(n)]  # each frame scored with its video's prompt
    merge = pre["merge_size"] ** 2
    mu = []
    # on the videos' device only while it scores (reward_models.visiting), then back to the CPU
    with reward_models.visiting(model, dev):
        for i in range(0, B * n, batch):  # `batch` images per forward (released: 4)
            pix, grids = zip(*[frame_patches(f, pre) for f in x[i:i + batch]])
            grid = torch.tensor(grids)  # [m, 3]
            ids, mask = encode(tok, [chat_text(p, int(g.prod()) // merge)
                                     for p, g in zip(texts[i:i + batch], grid)], model.ids["<|endoftext|>"])
            out = model(ids.to(dev), mask.to(dev), torch.cat(pix).to(dev), grid.to(dev))  # [m, 2]
            mu.append(out[:, 0])  # (mu, sigma): mu is the score
    return torch.cat(mu).view(B, n)


def hpsv3(videos, prompts, frames=FRAMES, batch=BATCH, dtype=None):
    """HPSv3 (Ma et al. 2025) as Astrolabe's video reward: mu per frame of `frames` evenly spaced
    frames (0 = all, as released), video reward = mean of the top 30% (higher = better). batch: images per forward (released 4); dtype: the VLM's (default
    bf16 on CUDA, float32 on the CPU; the head is always float32). Needs HPSv3.safetensors and
    the Qwen2-VL-7B-Instruct folder's config/tokenizer/preprocessor files."""
    return top_fraction(frame_scores(videos, prompts, frames, batch, dtype), 0.3)  # [B]


REWARDS = {"hpsv3": hpsv3}
