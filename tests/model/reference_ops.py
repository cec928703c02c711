"""Readable reference forms of the model's steps, for the tests to check the fast forms against."""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of the first ``2 * rope.shape[-2]`` dims.

    x: [B, S, H, D]; rope: [B, S, R/2, 2].
    """
    rot_dim = rope.shape[-2] * 2
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    pairs = x_rot.reshape(*x_rot.shape[:-1], rot_dim // 2, 2)  # [B, S, H, R/2, 2]
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]  # [B, S, 1, R/2]
    rotated = torch.stack(
        (pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin), dim=-1
    ).flatten(3)
    return torch.cat((rotated, x_pass), dim=-1)
