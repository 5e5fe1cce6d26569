"""
The tiny shapes world: procedural videos of one coloured shape moving in a named direction, its
reward detectors and its toy text encoder. tools/pretrain_tiny.py turns CausalWanModel(CONFIGS["tiny"])
into a 4-step AR sampler of these videos.

This is the world of the default run: `python train.py` with no arguments RL-fine-tunes the
pre-trained weights (assets/tiny_world.safetensors), with rewards that read the prompt
(color_match, direction_progress below; shape_match and shape_progress look at the shape itself,
so a shape smeared into a streak cannot score as a moving one). The prompts are "a {colour} {shape} moving
{direction}"; the text encoder is toy_text_embed below (fixed per-word vectors), so the model
has to learn what each word means from the videos alone.

The world: a black background, one flat-coloured circle, square or triangle (colours from
COLORS, so the colour detector's palette is exactly the drawing palette) moving at a
constant 2 px/frame. Space is a torus: the shape wraps around the frame edges, so a video of any
length is valid. The start is random but "upstream" (the shape has room for `LEAD` frames before
it reaches an edge), so the first clip of every video shows clean motion that the centroid-based
direction detector reads correctly (a shape crossing an edge makes its centroid jump backwards).

Imports nothing of this repository: copy it alone for the world and its detectors.
Test:  python -m pytest tests/test_tiny_world.py -q

Shape legend: B batch, F frames, C = 3 channels (RGB, pixel space), H, W pixels, P palette
colours (color_match).
"""

import math
import re
import zlib

import torch

COLOR_WORDS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
DIRECTION_WORDS = ("left", "right", "up", "down")
PROMPTS = [f"a {c} {s} moving {d}" for c in COLOR_WORDS for s in SHAPES for d in DIRECTION_WORDS]
SPEED = 2    # pixels per frame (at 32x32): 16 px over a 9-frame clip, unmistakable motion
RADIUS = 4   # half-size of a shape in pixels: 9 px wide, ~6-8% of a 32x32 frame
LEAD = 9     # frames the shape moves from its start before touching the edge ahead of it


# ----------------------------------------------------------------------------------------------
# The world's detectors: prompt-aware rewards. Assumption: a plain background covering more than
# half of every frame (black here); its colour is the per-channel median of the video.

COLORS = {  # the words a prompt may name -> RGB; tiny_world should draw with these values
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "white": (1.0, 1.0, 1.0), "purple": (1.0, 0.0, 1.0),
    "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0), "orange": (1.0, 0.5, 0.0),
}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y down


def _word(prompt, table):
    """First word of `prompt` that is a key of `table`, or None."""
    return next((w for w in re.findall(r"[a-z]+", prompt.lower()) if w in table), None)


def _foreground(videos, thresh=0.25):
    """Pixels farther than `thresh` (max over channels) from the video's median colour."""
    v = videos.float()
    bg = v.permute(0, 2, 1, 3, 4).flatten(2).median(2).values  # [B, 3]
    return (v - bg.view(-1, 1, 3, 1, 1)).abs().amax(2) > thresh  # [B, F, H, W]


def color_match(videos, prompts):
    """Fraction of the foreground pixels whose nearest palette colour (COLORS) is the colour the
    prompt names; 0 if the prompt names no colour or nothing differs from the background.
    Per foreground pixel, so the shape's size does not matter; nearest palette colour, not a
    fixed radius, so shading is tolerated (dark red is red).

    >>> v = torch.zeros(1, 2, 3, 8, 8); v[:, :, 0, 2:4, 2:4] = 0.8   # a dark red square on black
    >>> color_match(v.expand(3, -1, -1, -1, -1), ["a red square", "a blue square", "a square"])
    tensor([1., 0., 0.])
    """
    v, fg = videos.float(), _foreground(videos)  # [B, F, 3, H, W], [B, F, H, W]
    pal = torch.tensor(list(COLORS.values()), device=v.device)  # [P, 3]
    out = torch.zeros(v.shape[0], device=v.device)
    for b, p in enumerate(prompts):  # one video at a time: the distances are P times the video
        c = _word(p, COLORS)
        if c is not None and fg[b].any():
            dist = ((v[b].unsqueeze(1) - pal.view(1, -1, 3, 1, 1)) ** 2).sum(2)  # [F, P, H, W]
            nearest = pal[dist.argmin(1)]  # [F, H, W, 3] RGB of the nearest palette colour
            hit = (nearest == pal.new_tensor(COLORS[c])).all(-1)  # purple == magenta: same RGB
            out[b] = (hit & fg[b]).sum() / fg[b].sum()
    return out


def direction_match(videos, prompts, eps=0.05):
    """Fraction of frame pairs in which the foreground centroid moves (by more than `eps` pixels)
    in the direction the prompt names (left, right, up, down); in [0, 1]. 0 if the prompt names
    no direction, the shape stands still, or a frame has no foreground.

    >>> v = torch.zeros(1, 4, 3, 8, 8)
    >>> for t in range(4): v[0, t, :, 3:5, 5 - t:7 - t] = 1.0     # a white square moving left
    >>> direction_match(v.expand(2, -1, -1, -1, -1), ["moving left", "moving right"])
    tensor([1., 0.])
    """
    fg = _foreground(videos).float()  # [B, F, H, W]
    B, F, H, W = fg.shape
    mass = fg.sum((2, 3))  # [B, F] foreground pixels per frame
    cx = (fg.sum(2) * torch.arange(W, device=fg.device)).sum(2) / mass.clamp(min=1)  # [B, F]
    cy = (fg.sum(3) * torch.arange(H, device=fg.device)).sum(2) / mass.clamp(min=1)  # [B, F]
    out = torch.zeros(B, device=fg.device)
    for b, p in enumerate(prompts):
        word = _word(p, DIRECTIONS)
        if word is not None and F > 1:
            dx, dy = DIRECTIONS[word]
            step = dx * cx[b].diff() + dy * cy[b].diff()  # [F-1] centroid motion along the word
            out[b] = ((step > eps) & (mass[b, 1:] > 0) & (mass[b, :-1] > 0)).float().mean()
    return out


def size_constancy(videos, prompts):
    """The foreground keeps its size: 1 - mean_t |A_t - median A| / median A, clipped at 0, where
    A_t is the foreground pixel count of frame t. A quality term for single-object videos: a
    shape that fades, dissolves into streaks or smears scores lower; steady motion does not.

    >>> v = torch.zeros(2, 4, 3, 8, 8); v[:, :, :, 2:6, 2:6] = 1.0   # a 4x4 square ...
    >>> v[1, 3, :, 2:4] = 0.0                                          # ... that halves in frame 3
    >>> size_constancy(v, ["", ""])
    tensor([1.0000, 0.8750])
    """
    area = _foreground(videos).float().sum((2, 3))  # [B, F] foreground pixels per frame
    med = area.median(1, keepdim=True).values.clamp(min=1)
    return (1 - ((area - med).abs() / med).mean(1)).clamp(min=0)  # [B]


def direction_progress(videos, prompts, speed=1 / 16):
    """How steadily the foreground moves the way the prompt names, at `speed` (fraction of the
    frame per frame; 1/16 is the shapes world's 2 px at 32x32): per frame pair the displacement
    along the named direction / (speed * frame size), clipped to [-1, 1], mean over pairs.
    1 = steady motion at that speed, 0 = standing still, -1 = the opposite way. Unlike
    direction_match it gives partial credit, so a slow or stop-and-go shape scores in between.

    Positions are circular means (angles on the frame's width and height): the shapes world
    wraps around, and a shape crossing an edge would make a plain centroid jump across the frame.

    >>> v = torch.zeros(1, 5, 3, 16, 16)
    >>> for t in range(5): v[0, t, :, 6:9, (14 - t) % 16] = 1.0   # 1 px/frame left, across the edge
    >>> direction_progress(v.expand(2, -1, -1, -1, -1), ["moving left", "moving up"]).round(decimals=4)
    tensor([1., 0.])
    """
    fg = _foreground(videos).float()  # [B, F, H, W]
    B, F, H, W = fg.shape
    out = torch.zeros(B, device=fg.device)
    if F < 2:
        return out

    def circ_mean(mass, n):  # mass [B, F, n] along one axis -> angle of its circular mean [B, F]
        a = torch.arange(n, device=fg.device) * (2 * math.pi / n)
        return torch.atan2((mass * a.sin()).sum(-1), (mass * a.cos()).sum(-1))

    def step(angle, n):  # wrapped difference of consecutive angles, in pixels [B, F-1]
        d = angle.diff(dim=1)
        return torch.remainder(d + math.pi, 2 * math.pi).sub(math.pi) * n / (2 * math.pi)
    sx, sy = step(circ_mean(fg.sum(2), W), W), step(circ_mean(fg.sum(3), H), H)
    seen = (fg.sum((2, 3)) > 0).float()  # [B, F] frames with a foreground
    for b, p in enumerate(prompts):
        word = _word(p, DIRECTIONS)
        if word is not None:
            dx, dy = DIRECTIONS[word]
            # progress_t = clip((dx * dx_t + dy * dy_t) / (speed * size), -1, 1)
            prog = ((dx * sx[b] + dy * sy[b]) / (speed * (W if dx else H))).clamp(-1, 1)
            out[b] = (prog * seen[b, 1:] * seen[b, :-1]).mean()
    return out


def _shape_masks(dx, dy):
    """The three shapes at offsets (dx, dy) from their centre pixel, as render draws them:
    (circle, square, triangle) bool masks of dx's and dy's broadcast shape."""
    circle = dx ** 2 + dy ** 2 <= (RADIUS + 0.5) ** 2
    square = (dx.abs() <= RADIUS) & (dy.abs() <= RADIUS)
    triangle = (dy.abs() <= RADIUS) & (2 * dx.abs() <= dy + RADIUS)  # apex up, base at the bottom
    return circle, square, triangle


def _best_fit(fg, shape):
    """Where the named shape, at the drawing size, fits the foreground best, frame by frame:
    (IoU (B, F), row (B, F), column (B, F)) of the best of every position on the torus. The overlap
    at every shift is one circular cross-correlation, done with the FFT."""
    B, F, H, W = fg.shape
    dx = (torch.arange(W, device=fg.device) + W // 2) % W - W // 2  # column offsets from column 0, wrapped
    dy = ((torch.arange(H, device=fg.device) + H // 2) % H - H // 2).view(H, 1)
    tmpl = _shape_masks(dx.float(), dy.float())[SHAPES.index(shape)].float()  # (H, W), centred at (0, 0)
    # overlap(y, x) = sum_ij fg[i, j] tmpl[i - y, j - x]: the template centred at pixel (y, x)
    overlap = torch.fft.irfft2(torch.fft.rfft2(fg) * torch.fft.rfft2(tmpl).conj(), s=(H, W)).round()
    # IoU = overlap / (|fg| + |template| - overlap)
    iou = overlap / (fg.sum((2, 3), keepdim=True) + tmpl.sum() - overlap).clamp(min=1)  # (B, F, H, W)
    best = iou.flatten(2).max(2)
    return best.values, best.indices // W, best.indices % W


def shape_match(videos, prompts):
    """Shape integrity: per frame, the best overlap (IoU over the torus) of the foreground with the
    shape the prompt names, drawn at the world's size; mean over frames, in [0, 1]. A crisp shape
    scores 1, the wrong shape less, a shape smeared into a streak or dissolved much less. 0 if the
    prompt names no shape.

    >>> v = torch.zeros(2, 3, 3, 32, 32); v[:, :, 0, 4:13, 4:13] = 1.0   # a red 9x9 square ...
    >>> v[1, :, 0, 4:13, 4:28] = 1.0                                     # ... or smeared to 9x24
    >>> shape_match(v, ["a square", "a square"])                         # 81 / 216 = 0.375
    tensor([1.0000, 0.3750])
    """
    fg = _foreground(videos).float()  # [B, F, H, W]
    out = torch.zeros(fg.shape[0], device=fg.device)
    for b, p in enumerate(prompts):
        shape = _word(p, {k: None for k in SHAPES})
        if shape is not None:
            out[b] = _best_fit(fg[b:b + 1], shape)[0].mean()
    return out


def shape_progress(videos, prompts, speed=1 / 16):
    """direction_progress measured on the shape itself: the position where the named shape fits
    best (see shape_match) moves along the named direction at `speed` (fraction of the frame per
    frame), each frame pair's progress clip(displacement / (speed * size), -1, 1) weighted by how
    well the shape fits in both frames. A streak whose mass drifts the right way earns little;
    a crisp shape moving steadily the named way earns 1.

    >>> v = torch.zeros(2, 4, 3, 32, 32)
    >>> for t in range(4): v[:, t, 1, 10:19, 20 - 2 * t:29 - 2 * t] = 1.0  # a green square, 2 px/frame left
    >>> for t in range(4): v[1, t, 1, 10:19, 20 - 2 * t:29] = 1.0         # ... smeared behind it
    >>> shape_progress(v, ["a square moving left"] * 2).round(decimals=3)
    tensor([1.0000, 0.7030])
    """
    fg = _foreground(videos).float()  # [B, F, H, W]
    B, F, H, W = fg.shape
    out = torch.zeros(B, device=fg.device)
    for b, p in enumerate(prompts):
        shape, word = _word(p, {k: None for k in SHAPES}), _word(p, DIRECTIONS)
        if shape is None or word is None or F < 2:
            continue
        iou, y, x = (a[0].float() for a in _best_fit(fg[b:b + 1], shape))  # (F,) each
        # displacement between frames on the torus, in pixels: wrapped into [-size/2, size/2)
        ddx = torch.remainder(x.diff() + W / 2, W) - W / 2
        ddy = torch.remainder(y.diff() + H / 2, H) - H / 2
        dx, dy = DIRECTIONS[word]
        # progress_t = clip((dx ddx + dy ddy) / (speed * size), -1, 1), weighted by the fit of both frames
        prog = ((dx * ddx + dy * ddy) / (speed * (W if dx else H))).clamp(-1, 1)
        out[b] = (prog * torch.minimum(iou[1:], iou[:-1])).mean()
    return out


# the detectors as rewards: train.py adds them to rewards.REWARDS (--rewards color_match=1 ...)
REWARDS = {"color_match": color_match, "direction_match": direction_match,
           "direction_progress": direction_progress, "size_constancy": size_constancy,
           "shape_match": shape_match, "shape_progress": shape_progress}


# ----------------------------------------------------------------------------------------------
# The toy text encoder

def toy_text_embed(prompts, text_len, text_dim, seed=0):
    """A weight-free text encoder: each word gets a fixed pseudo-random vector (seeded by the
    word itself), one row per word, zero-padded to text_len rows like umT5's output.

    returns: (B, text_len, text_dim)
    """
    out = torch.zeros(len(prompts), text_len, text_dim)
    for i, p in enumerate(prompts):
        for j, word in enumerate(p.lower().split()[:text_len]):
            g = torch.Generator().manual_seed(zlib.crc32(word.encode()) + seed)
            out[i, j] = torch.randn(text_dim, generator=g)
    return out


def _first_word(words, vocab):
    """The first of `words` that is in `vocab`, or None."""
    for w in words:
        if w in vocab:
            return w
    return None


def parse_prompt(prompt):
    """"a red circle moving left" -> ("red", "circle", "left"): the first known word of each kind."""
    words = prompt.lower().replace(",", " ").split()
    spec = tuple(_first_word(words, vocab) for vocab in (COLORS, SHAPES, DIRECTIONS))
    if None in spec:
        raise ValueError(f"prompt '{prompt}' must name a colour {list(COLORS)}, a shape "
                         f"{list(SHAPES)} and a direction {list(DIRECTIONS)}")
    return spec


def readable(prompt):
    """True if the prompt names a colour, a shape and a direction the tiny model was trained on
    (COLOR_WORDS, SHAPES, DIRECTION_WORDS): other words are noise to it."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    return all(words & set(vocab) for vocab in (COLOR_WORDS, SHAPES, DIRECTION_WORDS))


def render(specs, frames, H=32, W=32, generator=None):
    """Videos for a list of (colour, shape, direction) specs -> [B, F, 3, H, W] in [-1, 1].

    Vectorised over the batch (the pre-training draws 32 clips per step). Coordinates are
    integer pixel centres and the speed is an integer, so a shape moves by exact pixel shifts
    (no anti-aliasing: blended edge pixels would have colours between palette entries).
    """
    B = len(specs)
    rgb = torch.tensor([COLORS[c] for c, _, _ in specs])                       # [B, 3] in [0, 1]
    kind = torch.tensor([SHAPES.index(s) for _, s, _ in specs])                 # [B]
    d = torch.tensor([DIRECTIONS[w] for _, _, w in specs], dtype=torch.float32)  # [B, 2] (dx, dy)
    # start centre: in frame on both axes, and upstream along the motion so that the first LEAD
    # frames never touch the edge ahead (mirrored for left/up); y points down as in DIRECTIONS
    u = torch.rand(B, 2, generator=generator)
    size = torch.tensor([W, H], dtype=torch.float32)
    room = (size - 1 - 2 * RADIUS - SPEED * (LEAD - 1) * d.abs()).clamp(min=0)  # [B, 2]
    c0 = RADIUS + (u * (room + 1)).floor().clamp(max=room)                       # along +axis
    c0 = torch.where(d < 0, size - 1 - c0, c0)                                   # [B, 2] (x, y)
    t = torch.arange(frames, dtype=torch.float32)
    cx = (c0[:, 0, None] + SPEED * d[:, 0, None] * t)[..., None, None]  # [B, F, 1, 1]
    cy = (c0[:, 1, None] + SPEED * d[:, 1, None] * t)[..., None, None]
    # torus offsets in (-W/2, W/2]: the wrap-around is just a modulo on the distance to the centre
    dx = (torch.arange(W, dtype=torch.float32) - cx + W / 2) % W - W / 2  # [B, F, 1, W]
    dy = (torch.arange(H, dtype=torch.float32).view(H, 1) - cy + H / 2) % H - H / 2  # [B, F, H, 1]
    circle, square, triangle = _shape_masks(dx, dy)  # [B, F, H, W] each
    k = kind.view(B, 1, 1, 1)
    mask = torch.where(k == 0, circle, torch.where(k == 1, square, triangle)).float()  # [B,F,H,W]
    return mask[:, :, None] * (2 * rgb.view(B, 1, 3, 1, 1)) - 1  # black (-1) + colour on the mask
