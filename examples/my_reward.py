"""
An example user reward: `python train.py --rewards examples/my_reward.py:reward=1`.

Any function `fn(videos, prompts) -> Tensor[B]` works: videos are float in [0, 1] with shape
[B, F, 3, H, W], prompts a list of B strings, one score per video, higher = better.
It may import anything (a learned model, OpenCV, ...); rewards.py loads this file by path.
"""
import torch


def reward(videos, prompts):
    """Warmth: mean red minus mean blue, in [-1, 1] (a colour grade no built-in reward asks for)."""
    rgb = videos.float().mean(dim=(1, 3, 4))  # [B, 3] mean colour of each video
    return rgb[:, 0] - rgb[:, 2]  # [B]


def size(videos, prompts):
    """Bigger things: the share of pixels that differ from the video's median colour (its plain
    background), in [0, 1]. The shapes world always draws its shapes at one size."""
    v = videos.float()
    bg = v.permute(0, 2, 1, 3, 4).flatten(2).median(2).values  # [B, 3] background colour
    fg = (v - bg.view(-1, 1, 3, 1, 1)).abs().amax(2) > 0.25  # [B, F, H, W] foreground pixels
    return fg.float().mean(dim=(1, 2, 3))  # [B]
