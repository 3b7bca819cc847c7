"""LLaVA-NeXT (llava-hf/llava-v1.6-*): LLaVA with any-resolution tiles and a learned row-end token.

Each image arrives as the whole image squashed to 336 px plus the tiles of its best grid
resolution (see :class:`models.llava.processing.LlavaNextFrameProcessor`). Per image, the tile
features are stitched back into one (rows x cols) feature map, the rows/columns that only saw the
letterbox padding are cut off (unpadding), ``image_newline`` is appended to every row, and the
base image's features go first - transformers' ``LlavaNextModel.pack_image_features``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from models.generation import to_tensor
from models.layers import zeros_parameter
from models.llava.modeling import LlavaForConditionalGeneration
from models.llava.processing import select_best_resolution

if TYPE_CHECKING:
    from transformers import LlavaNextConfig


def unpadded_shape(image_size: Sequence[int], height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the feature map (height x width) that shows the original image."""
    orig_h, orig_w = (int(v) for v in image_size)
    if orig_w / orig_h > width / height:
        new_h = int(round(orig_h * (width / orig_w), 7))
        pad = (height - new_h) // 2
        return pad, height - pad, 0, width
    new_w = int(round(orig_w * (height / orig_h), 7))
    pad = (width - new_w) // 2
    return 0, height, pad, width - pad


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-NeXT with transformers' interface: ``pixel_values`` (N, tiles, 3, 336, 336), ``image_sizes`` (N, 2).

    ``pixel_values`` may be zero-padded on the tile axis (as the processor pads a batch); each image
    uses the tiles its size implies. :meth:`image_token_count` gives the prompt's image tokens per image.
    """

    def __init__(self, config: "LlavaNextConfig"):
        super().__init__(config)
        if config.vision_feature_select_strategy != "default":
            raise NotImplementedError("LLaVA-NeXT needs vision_feature_select_strategy 'default'")
        self.image_newline = zeros_parameter((config.text_config.hidden_size,))
        self.grid_pinpoints = [tuple(p) for p in config.image_grid_pinpoints]
        vision = config.vision_config
        self.tile_size = vision.image_size
        self.side = vision.image_size // vision.patch_size

    def grid(self, image_size: Sequence[int]) -> tuple[int, int]:
        """Tile rows and columns for an image of (height, width)."""
        height, width = select_best_resolution([int(v) for v in image_size], self.grid_pinpoints)
        return height // self.tile_size, width // self.tile_size

    def image_token_count(self, image_size: Sequence[int]) -> int:
        rows, cols = self.grid(image_size)
        top, bottom, left, right = unpadded_shape(image_size, rows * self.side, cols * self.side)
        return self.side * self.side + (bottom - top) * (right - left + 1)

    def pack(self, features: Tensor, image_size: Sequence[int]) -> Tensor:
        """One image's (1 + tiles, side*side, D) features -> (image_token_count, D)."""
        rows, cols = self.grid(image_size)
        dim = features.shape[-1]
        base = features[0]
        grid = features[1:].reshape(rows, cols, self.side, self.side, dim).transpose(0, 2, 1, 3, 4)
        grid = grid.reshape(rows * self.side, cols * self.side, dim)
        top, bottom, left, right = unpadded_shape(image_size, rows * self.side, cols * self.side)
        grid = grid[top:bottom, left:right]
        newline = ops.broadcast_to(self.image_newline.astype(grid.dtype).reshape(1, 1, dim), (bottom - top, 1, dim))
        grid = ops.concat((grid, newline), axis=1).reshape(-1, dim)
        return ops.concat((base, grid), axis=0)

    def get_image_features(self, pixel_values, image_sizes=None, **kwargs) -> Tensor:
        """All images of the batch -> packed features concatenated in prompt order (F, D)."""
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (N, 2) with each image's original (height, width)")
        pixel_values = pixel_values.asnumpy() if isinstance(pixel_values, Tensor) else np.asarray(pixel_values)
        sizes = np.asarray(image_sizes.asnumpy() if isinstance(image_sizes, Tensor) else image_sizes).reshape(-1, 2)
        if pixel_values.ndim == 6:  # (B, T, tiles, 3, H, W): frames of videos
            pixel_values = pixel_values.reshape((-1,) + pixel_values.shape[2:])
        counts = [rows * cols + 1 for rows, cols in (self.grid(s) for s in sizes)]
        tiles = np.concatenate([pv[:n] for pv, n in zip(pixel_values, counts)])
        features = self._encode(to_tensor(tiles, ms.float32))
        packed, start = [], 0
        for size, n in zip(sizes, counts):
            packed.append(self.pack(features[start:start + n], size))
            start += n
        return ops.concat(packed, axis=0)
