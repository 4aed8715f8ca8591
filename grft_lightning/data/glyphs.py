"""Synthetic printed characters: the pre-training data of the ViT testbed (``grft_lightning.core.testbed``).

62 classes (``0-9``, ``A-Z``, ``a-z``) rendered from the TrueType fonts that ship inside
matplotlib (DejaVu, STIX, Computer Modern: every font that draws all 62 characters distinctly),
with random size, position, small rotation and shear, stroke width, colours and a procedural
background (flat, linear gradient or smooth noise). Glyphs stay upright (at most +-12 degrees)
and keep their position variation, so orientation and position stay learnable features for the
downstream structured tasks. Nothing here uses the downstream data (MNIST digits, photographs).

Every batch is a pure function of ``(seed, index)``: a run is reproducible from its seed and a
resumed run draws exactly the batches it would have drawn.
"""

from __future__ import annotations

import functools
import glob
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

CHARACTERS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Computer Modern symbols: distinct glyphs at the letters' code points, but not letters
SYMBOL_FONTS = {"cmsy10.ttf", "cmex10.ttf"}
CANVAS = 64  # rendered at 2x, then downsampled to the output size (anti-aliasing)


def _font_dir() -> str:
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


@functools.lru_cache(maxsize=1)
def usable_fonts() -> tuple[str, ...]:
    """The matplotlib fonts that draw every character, each differently from the font's fallback box."""
    fonts = []
    for path in sorted(glob.glob(os.path.join(_font_dir(), "*.ttf"))):
        if os.path.basename(path) in SYMBOL_FONTS:
            continue
        font = ImageFont.truetype(path, 40)
        masks = []
        for char in CHARACTERS:
            image = Image.new("L", (CANVAS, CANVAS))
            ImageDraw.Draw(image).text((8, 4), char, fill=255, font=font)
            masks.append(np.asarray(image) > 127)
        if all(m.sum() > 20 for m in masks) and len({m.tobytes() for m in masks}) == len(CHARACTERS):
            fonts.append(path)
    if not fonts:
        raise RuntimeError(f"no usable TrueType font found in {_font_dir()} (is matplotlib installed?)")
    return tuple(fonts)


@functools.lru_cache(maxsize=2048)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _background(rng: np.random.Generator, size: int, difficulty: float) -> np.ndarray:
    """H x W x 3 float image in [0, 1]: flat, a linear gradient, or smooth colour noise (the last
    two only as ``difficulty`` grows)."""
    kind = rng.integers(3) if rng.random() < difficulty else 0
    if kind == 0:
        return np.broadcast_to(rng.random(3), (size, size, 3)).copy()
    if kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)
        t = (t - t.min()) / (np.ptp(t) + 1e-8)
        a, b = rng.random(3), rng.random(3)
        return a + t[..., None] * (b - a)
    coarse = rng.random((4, 4, 3)).astype(np.float32)
    coarse = 0.5 * coarse + 0.5 * coarse.mean((0, 1))  # half contrast: the glyph stays readable
    image = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(image, dtype=np.float32) / 255


def render_glyph(rng: np.random.Generator, label: int, size: int = 32, difficulty: float = 1.0) -> np.ndarray:
    """One ``size x size x 3`` uint8 image of character ``label``; ``difficulty`` in [0, 1] scales
    the geometric jitter and the share of textured backgrounds (the curriculum)."""
    fonts = usable_fonts()
    font = _font(fonts[rng.integers(len(fonts))], int(rng.integers(30, 54)))
    stroke = int(rng.integers(0, 3))
    mask = Image.new("L", (CANVAS * 2, CANVAS * 2))
    draw = ImageDraw.Draw(mask)
    left, top, right, bottom = draw.textbbox((0, 0), CHARACTERS[label], font=font, stroke_width=stroke)
    draw.text((CANVAS - (left + right) / 2, CANVAS - (top + bottom) / 2), CHARACTERS[label], fill=255, font=font,
              stroke_width=stroke)
    # inverse affine map (output -> input pixel): rotation, shear, scale, then a translation that
    # keeps most of the glyph on the canvas
    d = difficulty
    angle, shear = np.deg2rad(rng.uniform(-12, 12) * d), rng.uniform(-0.25, 0.25) * d
    scale = rng.uniform(1 - 0.3 * d, 1 + 0.25 * d)
    cos, sin = np.cos(angle), np.sin(angle)
    matrix = np.array([[cos, -sin + shear], [sin, cos]]) / scale
    shift = rng.uniform(-0.22, 0.22, size=2) * CANVAS * (0.25 + 0.75 * d)
    centre_out = np.array([CANVAS / 2, CANVAS / 2]) + shift
    offset = np.array([CANVAS, CANVAS]) - matrix @ centre_out
    glyph = mask.transform((CANVAS, CANVAS), Image.AFFINE, (*matrix[0], offset[0], *matrix[1], offset[1]),
                           resample=Image.BILINEAR)
    alpha = np.asarray(glyph.resize((size, size), Image.BILINEAR), dtype=np.float32)[..., None] / 255
    if rng.random() >= d:  # early in the curriculum: grey levels of high contrast, either polarity
        dark, light = rng.uniform(0, 0.3), rng.uniform(0.7, 1)
        back, colour = (dark, light) if rng.random() < 0.5 else (light, dark)
        background, colour = np.full((size, size, 3), back), np.full(3, colour)
    else:
        background = _background(rng, size, d)
        colour = rng.random(3)
        while np.abs(colour - background.mean((0, 1))).sum() < 0.6:  # keep the glyph visible
            colour = rng.random(3)
    image = background * (1 - alpha) + colour * alpha
    image += rng.normal(0, rng.uniform(0, 0.04), image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def difficulty_at(index: int, ramp: int) -> float:
    """The curriculum: digits and capitals with little jitter on flat backgrounds at batch 0, the
    full task (62 classes, all jitter and backgrounds) from batch ``ramp`` on, linear between."""
    return 1.0 if ramp <= 0 else min(1.0, index / ramp)


def glyph_batch(seed: int, index: int, batch_size: int, size: int = 32,
                ramp: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``index`` of the stream drawn with ``seed``: ``(uint8 B x 3 x size x size, int64 B)``.

    ``ramp``: batches of the curriculum (:func:`difficulty_at`); 0 draws the full task.
    """
    rng = np.random.default_rng([seed, index])
    difficulty = difficulty_at(index, ramp)
    classes = 36 if difficulty < 0.5 else len(CHARACTERS)  # lower case joins half-way up the ramp
    labels = rng.integers(0, classes, size=batch_size)
    images = np.stack([render_glyph(rng, int(label), size, difficulty) for label in labels])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
