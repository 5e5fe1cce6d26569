"""
An example user reward: `python train.py --rewards examples/my_reward.py:reward=0.5`.

Any function `fn(videos, prompts) -> Tensor[B]` works: videos are float in [0, 1] with shape
[B, F, 3, H, W], prompts a list of B strings, one score per video, higher = better.
It may import anything (a learned model, OpenCV, ...); rewards.py loads this file by path.
"""
import torch


def reward(videos, prompts):
    """Brightness close to mid-gray: 1 - 2 |mean luma - 0.5| in [0, 1] (a well exposed video)."""
    w = torch.tensor([0.299, 0.587, 0.114], device=videos.device).view(1, 1, 3, 1, 1)
    luma = (videos.float() * w).sum(2)  # [B, F, H, W]
    return 1 - 2 * (luma.flatten(1).mean(1) - 0.5).abs()  # [B]
