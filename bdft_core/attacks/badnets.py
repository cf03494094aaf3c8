"""BadNets: a small visible patch stamped on the image.

Gu, Dolan-Gavitt and Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning Model
Supply Chain", arXiv:1708.06733, 2017."""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import MaskPatternAttack, image_to_pattern

POSITIONS = ("bottom_right", "bottom_left", "top_left", "top_right", "center")


class BadNets(MaskPatternAttack):
    """A ``size`` x ``size`` patch at ``position`` (a corner, "center", or explicit [row, col] of
    its top-left pixel), ``margin`` pixels from the border; the patch is ``pattern``: "white",
    "checkerboard" (white at its top-left pixel), "random" (seeded) or a user image."""

    name = "badnets"
    title = "BadNets (patch)"
    paper = "Gu et al. 2017, BadNets, arXiv:1708.06733"
    defaults = {"size": 3, "position": "bottom_right", "margin": 1, "pattern": "white"}
    choices = {"position": POSITIONS, "pattern": ("white", "checkerboard", "random")}
    image_param = "pattern"
    help = {"size": "side of the square patch, in pixels",
            "position": "where the patch sits: a corner, 'center', or [row, col] of its top-left pixel",
            "margin": "distance from the image border for corner positions, in pixels",
            "pattern": "what the patch looks like: 'white', 'checkerboard', 'random', or an image"}

    def setup(self):
        c, h, w = self.image_shape
        s = int(self.params["size"])
        margin = int(self.params["margin"])
        if s < 1:
            raise ConfigError(f"BadNets patch size must be at least 1 pixel, got {s}")
        if margin < 0:  # it was taken as 0 while the record kept the negative value
            raise ConfigError(f"BadNets margin must be 0 or more pixels from the edge, got {margin}")
        if s > min(h, w):
            raise ConfigError(f"BadNets patch of {s}x{s} pixels is larger than the {h}x{w} image")
        pos = self.params["position"]
        if isinstance(pos, str):
            if pos not in POSITIONS:
                raise ConfigError(f"unknown patch position {pos!r}: choose one of {', '.join(POSITIONS)} or [row, col]")
            margin = max(0, min(margin, (min(h, w) - s) // 2))
            r = {"top": margin, "bottom": h - s - margin}
            col = {"left": margin, "right": w - s - margin}
            if pos == "center":
                r0, c0 = (h - s) // 2, (w - s) // 2
            else:
                v, hz = pos.split("_")
                r0, c0 = r[v], col[hz]
        else:
            try:
                r0, c0 = (int(v) for v in pos)
            except (TypeError, ValueError):
                raise ConfigError(f"patch position must be a name or [row, col], got {pos!r}") from None
            if not (0 <= r0 <= h - s and 0 <= c0 <= w - s):
                raise ConfigError(f"a {s}x{s} patch at row {r0}, column {c0} does not fit in the {h}x{w} image")
        self.box = (r0, c0, s)
        patch = self._patch(c, s)
        self.mask = torch.zeros(1, h, w)
        self.mask[:, r0:r0 + s, c0:c0 + s] = 1.0
        self.pattern = torch.zeros(c, h, w)
        self.pattern[:, r0:r0 + s, c0:c0 + s] = patch

    def _patch(self, c: int, s: int) -> torch.Tensor:
        p = self.params["pattern"]
        if isinstance(p, str) and p == "white":
            return torch.ones(c, s, s)
        if isinstance(p, str) and p == "checkerboard":
            i = torch.arange(s)
            return ((i[:, None] + i[None, :]) % 2 == 0).float().expand(c, s, s).clone()
        if isinstance(p, str) and p == "random":
            return torch.rand(c, s, s, generator=self._generator)
        if isinstance(p, str) and not any(p.lower().endswith(e) for e in (".png", ".jpg", ".jpeg", ".bmp", ".webp")):
            raise ConfigError(f"unknown patch pattern {p!r}: 'white', 'checkerboard', 'random' or an image")
        return image_to_pattern(p, c, (s, s))
