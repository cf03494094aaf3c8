"""Blended: a whole-image pattern mixed into the input with weight ``alpha``.

Chen, Liu, Li, Lu and Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning", arXiv:1712.05526, 2017."""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import MaskPatternAttack, image_to_pattern


class Blended(MaskPatternAttack):
    """``x * (1 - alpha) + pattern * alpha`` with ``pattern`` "noise" (seeded uniform noise, as in
    the paper's random-pattern variant) or a user image resized to the input."""

    name = "blended"
    title = "Blended (image or noise)"
    paper = "Chen et al. 2017, Targeted Backdoor Attacks ... Using Data Poisoning, arXiv:1712.05526"
    defaults = {"alpha": 0.2, "pattern": "noise"}
    choices = {"pattern": ("noise",)}
    image_param = "pattern"
    help = {"alpha": "blend weight of the pattern, 0 (invisible) to 1 (pattern only)",
            "pattern": "'noise' (a fixed random image) or an image to blend in"}

    def setup(self):
        c, h, w = self.image_shape
        a = float(self.params["alpha"])
        if not 0.0 < a <= 1.0:
            raise ConfigError(f"Blended alpha must be in (0, 1], got {a}")
        p = self.params["pattern"]
        if isinstance(p, str) and p == "noise":
            self.pattern = torch.rand(c, h, w, generator=self._generator)
        else:
            self.pattern = image_to_pattern(p, c, (h, w))
        self.mask = torch.full((1, h, w), a)
