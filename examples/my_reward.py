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
