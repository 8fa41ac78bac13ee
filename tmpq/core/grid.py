"""Image grids as PNG: torchvision's ``make_grid`` (white 1-pixel gaps), upscaled nearest-neighbour."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid


def save_grid(images: torch.Tensor, path: Path | str, nrow: int = 8, scale: int = 4, pad: int = 1) -> Path:
    """Save images in [-1, 1] ([N, C, H, W], C = 1 or 3) as one PNG grid, upscaled ``scale`` times (nearest); a
    1-channel batch gives a grayscale PNG. Videos ``[N, C, F, H, W]`` (a video model's samples) give one row of
    ``F`` frames per video (``nrow`` is then the frame count).

    Example:
        >>> save_grid(torch.zeros(4, 1, 16, 16), "/tmp/g.png", nrow=2)  # doctest: +SKIP
    """
    from PIL import Image

    if images.ndim == 5:  # videos: each a row of its frames
        nrow = images.shape[2]
        images = images.transpose(1, 2).flatten(0, 1)
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu()
    c = x.shape[1]
    grid = make_grid(x, nrow=max(1, min(nrow, len(x))), padding=pad, pad_value=255)  # uint8 [3, H, W]
    if len(x) == 1:  # make_grid returns a lone image as it is: give it the same border as a grid's
        grid = torch.nn.functional.pad(grid, (pad, pad, pad, pad), value=255)
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2).numpy()
    img = Image.fromarray(grid[0] if c == 1 else grid.transpose(1, 2, 0), mode="L" if c == 1 else "RGB")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
