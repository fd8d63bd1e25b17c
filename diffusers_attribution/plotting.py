"""Small helpers shared by the methods' matplotlib figures (always built as `matplotlib.figure.Figure`, which
renders with Agg and touches no pyplot state)."""

from __future__ import annotations

import numpy as np
import torch


def image_array(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] in [-1, 1] → an array for `imshow` in [0, 1]: [H, W] for one channel, [H, W, 3] for RGB."""
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
