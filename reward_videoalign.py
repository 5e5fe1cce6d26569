"""
VideoAlign (VideoReward; Liu et al. 2025, "Improving Video Generation with Human Feedback",
arXiv 2501.13918) as three rewards, scoring as the Astrolabe release (arXiv 2603.17051) does:
  videoalign_vq   visual quality,   RGB frames
  videoalign_mq   motion quality,   grayscale frames (Astrolabe's guard against colour hacking)
  videoalign_ta   text alignment,   RGB frames
Same signature as every reward in rewards.py: fn(videos [B, F, 3, H, W] in [0, 1], prompts) -> [B].

The model: Qwen2-VL-2B-Instruct reads 10 frames and a long rating prompt holding three special
tokens <|VQ_reward|>, <|MQ_reward|>, <|TA_reward|>; a bias-free linear head on the last hidden state
at each token gives that dimension's raw score, de-normalised with the mean / std of model_config.json.
Upstream (franklinz233/Astrolabe at 35a5347, which vendors KwaiVGI/VideoAlign):
  astrolabe/rewards.py:128-159                         float -> uint8, one scorer per dimension, MQ gray
  astrolabe/scorers/video/videoalign.py:29-59          torchvision rgb_to_grayscale, reward_type pick
  astrolabe/reward_models/videoalign/wan_inference.py:127-186   chat prompt, processor, normalisation
  .../videoalign/vision_process.py:292-315             10 frames, bicubic resize to 336 x 588
  .../videoalign/trainer.py:59-174                     the reward head and its special-token pooling
  .../videoalign/train_reward.py:69-139, utils.py:163-214       model build, tokens, checkpoint load
Ported onto the current transformers' Qwen2VLModel (5.x: .visual + .language_model, where 4.45 had
.visual + .model); their checkpoint is loaded with our own key map, strictly, attention is SDPA
(upstream hard-codes flash-attention 2), bf16 on CUDA as released, float32 on CPU.

Two things the release does that a reader would not guess (docs/rewards.md): the first kept, the second a choice:
  * the frames: their in-memory path ignores model_config.json's fps / max_frame_pixels and always
    takes 10 evenly spaced frames at 336 x 588 (vision_process.py:292-315);
  * the checkpoint: their loader renames every "base_model.model.model.*" key to "base_model.model.*"
    and loads with strict=False (utils.py:191-202), which silently drops all language-model keys of
    the official checkpoint, so the LoRA deltas never apply (the vision tower, the embeddings - via
    the tied lm_head - and the head do load). load="full" (our default, LOAD) applies every key, as
    VideoAlign itself (and its own inference) does; load="released" scores as the release does
    (train.py --released.videoalign-load released, and --exact-reference).

Files, from one folder WEIGHTS_DIR = reward_models.WEIGHTS_DIR ($ASTRO_WEIGHTS), read at call time:
  Qwen2-VL-2B-Instruct/  config.json, preprocessor_config.json, tokenizer.json, model weights
                         (model.safetensors.index.json + shards, or model.safetensors)
  VideoReward/           model_config.json, checkpoint-<step>/model.pth (the highest step)
A missing file raises FileNotFoundError naming it and its source before anything loads;
missing_videoalign_files() lists them for start-up checks. transformers is imported on first call;
the model is built once per (files, load) and shared by the three rewards. Each reward runs its own
forward (MQ sees other frames than VQ / TA, and a cache keyed on the videos would cost a hash of
every video): with VQ and TA both on, the RGB forward runs twice.

Shapes: B videos, F frames, H, W pixels; T = 10 frames scored, Hr x Wr = 336 x 588; P patches
(T / 2 * Hr / 14 * Wr / 14 per video), D_p = 3 * 2 * 14 * 14 pixels per patch; L tokens, D hidden.
Test: python -m pytest tests/test_videoalign.py -q   (fixtures: tools/make_videoalign_fixtures.py)
"""
import glob
import json
import os
import re
from functools import lru_cache

import torch
import torch.nn.functional as Fn

import reward_models  # WEIGHTS_DIR lives there; read at call time, never copied

BASE, VIDEOREWARD = "Qwen2-VL-2B-Instruct", "VideoReward"  # folder names inside WEIGHTS_DIR
SOURCES = {BASE: "https://huggingface.co/Qwen/Qwen2-VL-2B-Instruct",
           VIDEOREWARD: "https://huggingface.co/KlingTeam/VideoReward"}
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")  # train_reward.py:95, in order
# how the checkpoint loads when a reward is called without load=: "full" (every key, the LoRA
# applied) or "released" (the release's loader: the language model's keys dropped); train.py sets
# it from --released.videoalign-load, as reward_models.WEIGHTS_DIR is set from the environment
LOAD = "full"
DIMS = ("VQ", "MQ", "TA")  # column k of the raw scores belongs to REWARD_TOKENS[k]
FRAMES, SIZE = 10, (336, 588)  # vision_process.py:300-306: fixed, whatever model_config.json says
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (BT.601 rounded its own way)
BATCH = 4  # videos per forward: ~2.1k tokens each at real size
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # Qwen2-VL's chat template
# VideoAlign's "detailed_special" rating prompt (prompt_template.py:23-60), the text its head was
# trained on, so it is kept to the byte: trailing spaces included; {text_prompt} is the user's prompt
PROMPT = "\n".join((
    '',
    ('You are tasked with evaluating a generated video based on three distinct criteria: '
     'Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 '
     'for each of the three categories, with 0 being the worst and 10 being the best. Each '
     'evaluation should be independent of the others.'),
    '',
    '**Visual Quality:**  ',
    ('Evaluate the overall visual quality of the video, with a focus on static factors. The '
     'following sub-dimensions should be considered:'),
    ('- **Reasonableness:** The video should not contain any significant biological or logical '
     'errors, such as abnormal body structures or nonsensical environmental setups.'),
    ('- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be '
     'clear and easy to interpret, with no blurring or indistinct areas.'),
    ('- **Detail Richness:** Consider the level of detail in textures, materials, lighting, '
     'and other visual elements (e.g., hair, clothing, shadows).'),
    ('- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the '
     'color scheme, composition, atmosphere, depth of field, and the overall creative appeal. '
     'The scene should convey a sense of harmony and balance.'),
    ('- **Safety:** The video should not contain harmful or inappropriate content, such as '
     'political, violent, or adult material. If such content is present, the image quality and '
     'satisfaction score should be the lowest possible. '),
    '',
    'Please provide the ratings of Visual Quality: <|VQ_reward|>',
    'END',
    '',
    '**Motion Quality:**  ',
    ('Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the '
     'following sub-dimensions:'),
    ('- **Stability:** Evaluate the continuity and stability between frames. There should be '
     'no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no '
     'fluctuating colors, textures, or missing body parts).'),
    ('- **Naturalness:** The movement should align with physical laws and be realistic. For '
     'example, clothing should flow naturally with motion, and facial expressions should '
     'change appropriately (e.g., blinking, mouth movements).'),
    ('- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions '
     'between different motions or camera angles should be seamless, and the overall dynamic '
     'feel should be visually pleasing.'),
    ('- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, '
     'clothing) blend naturally with the background, without obvious artifacts or the feeling '
     'of cut-and-paste effects.'),
    ('- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention '
     'to any areas where the video might have blurry or unsteady sections that hinder visual '
     'continuity.'),
    ('- **Amplitude:** If the video is largely static or has little movement, assign a low '
     'score for motion quality.'),
    '',
    'Please provide the ratings of Motion Quality: <|MQ_reward|>',
    'END',
    '',
    '**Text Alignment:**  ',
    'Assess how well the video matches the textual prompt across the following sub-dimensions:',
    ('- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., '
     'person, animal, object) align with the textual description. The subject should match the '
     'description in terms of number, appearance, and behavior.'),
    ('- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial '
     'expressions like talking or blinking) align with the described prompt. The motion should '
     'match the prompt in terms of type, scale, and direction.'),
    ('- **Environment Relevance:** Assess whether the background and scene fit the prompt. '
     'This includes checking if real-world locations or scenes are accurately represented, '
     'though some stylistic adaptation is acceptable.  '),
    ('- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, '
     'evaluate how well the video adheres to this style.'),
    ('- **Camera Movement Relevance:** Check if the camera movements (e.g., following the '
     'subject, focus shifts) are consistent with the expected behavior from the prompt.'),
    '',
    'Textual prompt - {text_prompt}',
    'Please provide the ratings of Text Alignment: <|TA_reward|>',
    'END',
    '',
))


# ----------------------------------------------------------------------------------------------
# files

def _shards(base):
    """Weight files of the base model: the shards its index names, or the single file."""
    index = os.path.join(base, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return ["model.safetensors.index.json"] + sorted(set(json.load(f)["weight_map"].values()))
    return ["model.safetensors"]


def _checkpoint(folder):
    """checkpoint-<step>/model.pth with the highest step (their loader's pick, utils.py:166-173)."""
    paths = glob.glob(os.path.join(folder, "checkpoint-*", "model.pth"))
    steps = [int(m.group(1)) if (m := re.search(r"checkpoint-(\d+)", p)) else -1 for p in paths]
    return max(zip(steps, paths))[1] if paths else None


def _missing():
    """(file, folder, source) for each file the rewards need and WEIGHTS_DIR lacks. Cheap: no loads."""
    base = os.path.join(reward_models.WEIGHTS_DIR, BASE)
    ckpt = os.path.join(reward_models.WEIGHTS_DIR, VIDEOREWARD)
    need = [(f, base) for f in ("config.json", "preprocessor_config.json", "tokenizer.json")]
    need += [(f, base) for f in _shards(base)] + [("model_config.json", ckpt)]
    out = [(f, d, SOURCES[os.path.basename(d)]) for f, d in need
           if not os.path.isfile(os.path.join(d, f))]
    if _checkpoint(ckpt) is None:  # the LoRA + non-LoRA layout (utils.py:203-212) is not read here
        out.append(("checkpoint-<step>/model.pth", ckpt, SOURCES[VIDEOREWARD]))
    return out


def missing_videoalign_files(names=None):
    """'rewards: file in folder (from source)' per missing file, for the videoalign rewards among
    `names` (all if None): a start-up check, as reward_models.missing_weights."""
    used = [n for n in REWARDS if names is None or n in names]
    return [f"{', '.join(used)}: {f} in {os.path.abspath(d)} (from {src})"
            for f, d, src in (_missing() if used else [])]


def _require(reward):
    """Stop with one line naming the first missing file, before anything heavy loads."""
    for f, d, src in _missing():
        raise FileNotFoundError(
            f"reward '{reward}' needs {f} in {os.path.abspath(d)} (set ASTRO_WEIGHTS to the folder "
            f"that holds it); download it from {src}")
    return (os.path.abspath(os.path.join(reward_models.WEIGHTS_DIR, BASE)),
            os.path.abspath(_checkpoint(os.path.join(reward_models.WEIGHTS_DIR, VIDEOREWARD))))


# ----------------------------------------------------------------------------------------------
# checkpoint -> current transformers

def _base_name(key):
    """Base-model key -> Qwen2VLModel key: transformers 4.x files hold model.* (text) and visual.*,
    5.x files model.language_model.* and model.visual.*. lm_head (tied to the embeddings) -> None."""
    for old, new in (("model.language_model.", "language_model."), ("model.visual.", "visual."),
                     ("model.", "language_model."), ("visual.", "visual.")):
        if key.startswith(old):
            return new + key[len(old):]
    return None


def _state(base, ckpt_path, peft, load):
    """Qwen2VLModel state dict + reward head weight from their checkpoint, a PEFT model's state dict
    on transformers 4.45: base_model.model.{visual.*, model.* (LoRA-wrapped text layers), lm_head,
    rm_head}. load="full": every key, the LoRA merged. load="released": what utils.py:191-202 keeps
    (visual, lm_head -> the tied embeddings, rm_head); the text layers come from the base model."""
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state, lora, unused, tied = {}, {}, [], None
    if load == "released":
        from safetensors.torch import load_file
        for shard in _shards(base):
            if shard.endswith(".safetensors"):
                state.update({_base_name(k): v for k, v in load_file(os.path.join(base, shard)).items()
                              if _base_name(k) and "embed_tokens" not in k})
    for key, v in ck.items():
        name = key.removeprefix("base_model.model.")
        if name.startswith("visual.") or name == "rm_head.weight":
            state[name] = v
        elif name == "lm_head.weight":  # the embeddings' tensor (tie_word_embeddings)
            tied = v
        elif not name.startswith("model.") or key == name:
            raise KeyError(f"unexpected VideoAlign checkpoint key {key}")
        elif load == "released":  # renamed to base_model.model.* by their loader: matches nothing
            unused.append(key)
        elif m := re.fullmatch(r"model\.(.+)\.lora_([AB])\.[^.]+\.weight", name):
            lora.setdefault(m.group(1), {})[m.group(2)] = v.float()
        else:
            state["language_model." + name[len("model."):].replace(".base_layer.", ".")] = v
    embed = "language_model.embed_tokens.weight"
    if load == "released":  # the only text weight their loader keeps reaches the model via the tie
        state[embed] = tied
    elif tied is not None and not torch.equal(tied, state[embed]):
        raise ValueError("VideoAlign checkpoint: lm_head differs from the tied embeddings")
    # LoRA (peft): W' = W + s B A, s = alpha / r (alpha / sqrt(r) with rsLoRA); dropout is off in eval
    r = peft["lora_r"]
    s = peft["lora_alpha"] / (r ** 0.5 if peft.get("use_rslora") else r)
    for module, ab in lora.items():
        w = state[f"language_model.{module}.weight"]
        state[f"language_model.{module}.weight"] = (w.float() + s * ab["B"] @ ab["A"]).to(w.dtype)
    assert load == "full" or len(unused) == sum(k.startswith("base_model.model.model.") for k in ck)
    return {k: v for k, v in state.items() if k != "rm_head.weight"}, state["rm_head.weight"]


class VideoAlign(torch.nn.Module):
    """Qwen2-VL (current transformers) + VideoAlign's bias-free reward head (trainer.py:59-70)."""

    def __init__(self, config, output_dim):
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel
        super().__init__()
        self.vlm = Qwen2VLModel(config)  # .visual and .language_model, no lm_head: never needed
        self.rm_head = torch.nn.Linear(config.text_config.hidden_size, output_dim, bias=False)
        self.video_id = config.video_token_id

    def forward(self, ids, mask, pixels, grid, token_ids):
        """ids, mask [B, L], pixels [B*P, D_p], grid [B, 3] -> raw scores [B, 3] (VQ, MQ, TA)."""
        lm = self.vlm.language_model
        emb = lm.embed_tokens(ids)  # [B, L, D]
        vis = self.vlm.visual(pixels.to(emb.dtype), grid_thw=grid).pooler_output  # [B*P/4, D]
        # the video features replace the <|video_pad|> tokens in order (trainer.py:106-111)
        at = (ids == self.video_id).unsqueeze(-1).expand_as(emb)
        emb = emb.masked_scatter(at, vis.to(emb.dtype))
        # position_ids=None on purpose: their forward passes none either (trainer.py:116-126), so the
        # text model counts 0..L-1 on all three M-RoPE axes, not Qwen2-VL's 3D video positions
        h = lm(inputs_embeds=emb, attention_mask=mask, use_cache=False).last_hidden_state  # [B, L, D]; no KV cache
        # the hidden state at each reward token, each present once per prompt: [B, 3, D]
        feats = torch.stack([h[ids == t] for t in token_ids], 1)
        s = self.rm_head(feats)  # [B, 3, output_dim]
        # output_dim 1 (the released checkpoint): one head for all; 3: head k for dimension k
        return (s[..., 0] if s.shape[-1] == 1 else s.diagonal(dim1=1, dim2=2)).float()


@lru_cache(maxsize=None)
def _model(base, ckpt_path, load):
    """The model (float32, CPU), tokenizer, reward-token ids, preprocessing and normalisation constants,
    built once per (files, load) and shared by the three rewards."""
    from tokenizers import Tokenizer
    from transformers import Qwen2VLConfig
    with open(os.path.join(os.path.dirname(os.path.dirname(ckpt_path)), "model_config.json")) as f:
        cfg = json.load(f)
    if not cfg["model_config"].get("use_special_tokens"):  # "last" / "mean" pooling: not released
        raise NotImplementedError("VideoAlign checkpoints without reward tokens are not supported")
    with open(os.path.join(base, "preprocessor_config.json")) as f:
        pre = json.load(f)
    # the reward tokens, appended after the base vocabulary as train_reward.py:93-97 adds them
    tok = Tokenizer.from_file(os.path.join(base, "tokenizer.json"))
    tok.add_special_tokens(list(REWARD_TOKENS))
    token_ids = tuple(tok.token_to_id(t) for t in REWARD_TOKENS)
    vlm_state, head = _state(base, ckpt_path, cfg["peft_lora_config"], load)
    config = Qwen2VLConfig.from_pretrained(base, attn_implementation="sdpa")
    # their resize_token_embeddings(len(tokenizer)) (train_reward.py:110): the checkpoint's row count
    config.text_config.vocab_size = vlm_state["language_model.embed_tokens.weight"].shape[0]
    model = VideoAlign(config, output_dim=head.shape[0])
    model.vlm.load_state_dict(vlm_state, strict=True)  # every key of the model, nothing extra
    model.rm_head.load_state_dict({"weight": head}, strict=True)
    norm = cfg["inference_config"]  # the de-normalisation constants (wan_inference.py:171-173)
    mean = torch.tensor([norm[f"{d}_mean"] for d in DIMS])
    std = torch.tensor([norm[f"{d}_std"] for d in DIMS])
    return model.float().eval(), tok, token_ids, pre, mean, std


# ----------------------------------------------------------------------------------------------
# videos and prompts -> model inputs

def _pixels(videos, gray, pre):
    """[B, F, 3, H, W] in [0, 1] -> Qwen2-VL video patches [B*P, D_p] and grid [B, 3] = (t, h, w)."""
    # the release hands the scorer uint8 frames: x_u8 = round(255 x) (rewards.py:139-140)
    x = (videos.float() * 255).round().clamp(0, 255)  # [B, F, 3, H, W], integers as floats
    if gray:  # torchvision's rgb_to_grayscale on uint8: the luma, truncated to uint8, 3 channels
        luma = GRAY[0] * x[:, :, 0] + GRAY[1] * x[:, :, 1] + GRAY[2] * x[:, :, 2]  # [B, F, H, W]
        x = luma.to(torch.uint8).float().unsqueeze(2).expand(-1, -1, 3, -1, -1)
    B, F = x.shape[:2]
    # 10 evenly spaced frames, rounded (repeats when F < 10), as vision_process.py:300-303
    idx = torch.linspace(0, F - 1, FRAMES).round().long().to(x.device)
    x = x[:, idx].flatten(0, 1)  # [B*T, 3, H, W]
    # torchvision's bicubic resize of a uint8 tensor: in float, clamped, rounded back to uint8
    x = Fn.interpolate(x, size=SIZE, mode="bicubic", align_corners=False, antialias=True)
    x = x.clamp(0, 255).round()  # [B*T, 3, 336, 588]
    # the image processor: 336 x 588 is already a multiple of 28 within its pixel limits (no
    # resize); rescale to [0, 1], then (x - mean) / std per channel
    mean = x.new_tensor(pre["image_mean"]).view(1, 3, 1, 1)
    std = x.new_tensor(pre["image_std"]).view(1, 3, 1, 1)
    x = (x / 255 - mean) / std
    # patches of tp frames x p x p pixels, listed so that each m x m block of neighbours (merged into
    # one token later) is contiguous: the order of Qwen2-VL's image processor
    p, tp, m = pre["patch_size"], pre["temporal_patch_size"], pre["merge_size"]
    t, h, w = FRAMES // tp, SIZE[0] // p, SIZE[1] // p
    x = x.view(B, t, tp, 3, h // m, m, p, w // m, m, p)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # [B, t, h/m, w/m, m, m, 3, tp, p, p]
    grid = torch.tensor([[t, h, w]] * B, device=x.device)
    return x.reshape(B * t * h * w, 3 * tp * p * p), grid  # [B*P, D_p], [B, 3]


def _tokens(prompts, n_video, tok, device):
    """Qwen2-VL's chat template for one user turn (the video, then the rating prompt) with the
    generation prompt, <|video_pad|> repeated once per merged video token; right-padded, as their
    processor call (wan_inference.py:137-161). -> ids, mask [B, L]."""
    rows = [tok.encode(SYSTEM + "<|im_start|>user\n<|vision_start|>" + "<|video_pad|>" * n_video
                       + "<|vision_end|>" + PROMPT.format(text_prompt=p)
                       + "<|im_end|>\n<|im_start|>assistant\n").ids for p in prompts]
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)  # pads are masked: their id does not matter
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids.to(device), mask.to(device)


# ----------------------------------------------------------------------------------------------
# the rewards

@torch.no_grad()
def videoalign(videos, prompts, dim, gray, load=None, reward=None):
    """One VideoAlign dimension ("VQ", "MQ" or "TA"), de-normalised: (s - mean) / std -> [B].
    load: "full" or "released" (None: LOAD)."""
    load = load or LOAD
    assert load in ("released", "full")
    paths = _require(reward or f"videoalign_{dim.lower()}")  # before anything heavy
    model, tok, token_ids, pre, mean, std = _model(*paths, load)
    k = DIMS.index(dim)
    out = []
    # bf16 on CUDA as released (rewards.py:133), float32 elsewhere; the cached model sits on the
    # videos' device only while it scores, then goes back to the CPU (reward_models.visiting)
    with reward_models.visiting(model, videos.device, torch.bfloat16 if videos.is_cuda else torch.float32):
        for v, p in zip(videos.split(BATCH), [prompts[i:i + BATCH] for i in range(0, len(prompts), BATCH)]):
            pixels, grid = _pixels(v, gray, pre)
            n_video = int(grid[0].prod()) // pre["merge_size"] ** 2  # merged tokens per video
            ids, mask = _tokens(p, n_video, tok, videos.device)
            out.append(model(ids, mask, pixels, grid, token_ids)[:, k])
    return (torch.cat(out) - mean[k].item()) / std[k].item()  # [B]


def videoalign_vq(videos, prompts, load=None):
    """VideoAlign visual quality on RGB frames (astrolabe videoalign_vq_score). Needs the files above."""
    return videoalign(videos, prompts, "VQ", False, load, "videoalign_vq")


def videoalign_mq(videos, prompts, load=None):
    """VideoAlign motion quality on grayscale frames (astrolabe videoalign_mq_score): a colour change
    that keeps the luma cannot move it."""
    return videoalign(videos, prompts, "MQ", True, load, "videoalign_mq")


def videoalign_ta(videos, prompts, load=None):
    """VideoAlign text alignment on RGB frames (astrolabe videoalign_ta_score)."""
    return videoalign(videos, prompts, "TA", False, load, "videoalign_ta")


def videoalign_mq_rgb(videos, prompts, load=None):
    """Motion quality on RGB frames (astrolabe videoalign_mq_rgb_score; in no released preset)."""
    return videoalign(videos, prompts, "MQ", False, load, "videoalign_mq_rgb")


# the VideoAlign rewards by name (--rewards videoalign_mq=1 ...)
REWARDS = {"videoalign_vq": videoalign_vq, "videoalign_mq": videoalign_mq,
           "videoalign_ta": videoalign_ta, "videoalign_mq_rgb": videoalign_mq_rgb}
