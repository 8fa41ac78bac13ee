"""Image grids as PNG (no torchvision needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def save_grid(images: torch.Tensor, path: Path | str, nrow: int = 8, scale: int = 4, pad: int = 1) -> Path:
    """Save images in [-1, 1] ([N, C, H, W], C = 1 or 3) as one PNG grid, upscaled ``scale`` times (nearest).

    Example:
        >>> save_grid(torch.zeros(4, 1, 16, 16), "/tmp/g.png", nrow=2)  # doctest: +SKIP
    """
    from PIL import Image

    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu().numpy()
    n, c, h, w = x.shape
    nrow = max(1, min(nrow, n))
    rows = (n + nrow - 1) // nrow
    grid = np.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    img = Image.fromarray(grid[0] if c == 1 else grid.transpose(1, 2, 0), mode="L" if c == 1 else "RGB")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
