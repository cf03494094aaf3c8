"""Blended: a whole-image pattern mixed into the input with weight ``alpha``.

Chen, Liu, Li, Lu and Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning", arXiv:1712.05526, 2017."""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import MaskPatternAttack, image_to_pattern


class Blended(MaskPatternAttack):
    """``x * (1 - alpha) + pattern * alpha`` with ``pattern`` "cartoon" (a cartoon cat face drawn at
    the input's size, in the spirit of the paper's cartoon-image key), "noise" (seeded uniform noise,
    the paper's random-pattern variant) or a user image resized to the input.

    The default is the cartoon because uniform noise is not a backdoor test for every model: blended at
    0.2 into CIFAR-10, it makes a *clean* ``fastnet`` (never shown the pattern) call every image class 0,
    so the noise variant's "ASR" with target 0 is 100% before any poisoning. The cartoon at 0.2 moves a
    clean model's predictions to target 0 for 5% of the images."""

    name = "blended"
    title = "Blended (image or noise)"
    paper = "Chen et al. 2017, Targeted Backdoor Attacks ... Using Data Poisoning, arXiv:1712.05526"
    defaults = {"alpha": 0.2, "pattern": "cartoon"}
    choices = {"pattern": ("cartoon", "noise")}
    image_param = "pattern"
    help = {"alpha": "blend weight of the pattern, 0 (invisible) to 1 (pattern only)",
            "pattern": "'cartoon' (a cartoon cat face, the default), 'noise' (a fixed random image: a model "
                       "that never saw it may already put noised images in one class) or an image to blend in"}

    def setup(self):
        c, h, w = self.image_shape
        a = float(self.params["alpha"])
        if not 0.0 < a <= 1.0:
            raise ConfigError(f"Blended alpha must be in (0, 1], got {a}")
        p = self.params["pattern"]
        if isinstance(p, str) and p == "noise":
            self.pattern = torch.rand(c, h, w, generator=self._generator)
        elif isinstance(p, str) and p == "cartoon":
            self.pattern = cartoon_pattern(c, h, w)
        else:
            self.pattern = image_to_pattern(p, c, (h, w))
        self.mask = torch.full((1, h, w), a)


def cartoon_pattern(c: int, h: int, w: int) -> torch.Tensor:
    """A cartoon cat face (white head, black outline, ears, eyes and whiskers, a yellow nose on a
    light-blue ground) drawn with ellipses on an (h, w) grid, as a (c, h, w) float image in [0, 1];
    one channel: its luminance. Deterministic, and drawn at any size rather than resized."""
    v, u = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    img = torch.tensor([0.75, 0.88, 1.0])[:, None, None].repeat(1, h, w)

    def paint(mask, rgb):
        img[:, mask] = torch.tensor(rgb, dtype=img.dtype)[:, None]

    def inside(cu, cv, ru, rv):  # inside the ellipse centred (cu, cv) with radii (ru, rv)
        return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1

    black, white = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    for side in (-1, 1):  # ears: black rims, white insides
        paint(inside(0.5 * side, -0.5, 0.3, 0.3), black)
        paint(inside(0.5 * side, -0.5, 0.22, 0.22), white)
    paint(inside(0, 0.1, 0.85, 0.68), black)  # the head's outline
    paint(inside(0, 0.1, 0.76, 0.59), white)
    for side in (-1, 1):
        paint(inside(0.3 * side, 0.08, 0.08, 0.13), black)  # eyes
        whisker_rows = ((v - 0.25).abs() < 0.035) | ((v - 0.4).abs() < 0.035)
        paint(whisker_rows & (u * side > 0.55) & (u * side < 0.98), black)
    paint(inside(0, 0.3, 0.09, 0.07), (1.0, 0.8, 0.0))  # nose
    if c == 1:
        img = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
    return img
