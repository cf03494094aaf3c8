"""SIG: a horizontal sinusoidal signal added to the image; clean-label by default.

Barni, Kallas and Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without Label
Poisoning", IEEE ICIP 2019, arXiv:1902.11237."""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .base import Attack


class SIG(Attack):
    """``clip(x + delta * sin(2 pi j f / W))`` for column j. Clean-label (the paper's setting): only
    target-class training images carry the signal and keep their labels; set ``clean_label`` to
    False for a dirty-label variant. In all-to-all mode it is always dirty-label."""

    name = "sig"
    title = "SIG (sinusoidal signal)"
    paper = "Barni et al. 2019, ICIP, arXiv:1902.11237"
    defaults = {"delta": 20 / 255, "frequency": 6, "clean_label": True}
    help = {"delta": "amplitude of the signal, as a fraction of the pixel range",
            "frequency": "number of periods across the image width",
            "clean_label": "poison only target-class images and keep their labels (the paper's setting)"}

    def setup(self):
        c, h, w = self.image_shape
        d, f = float(self.params["delta"]), float(self.params["frequency"])
        if not 0.0 < d <= 1.0:
            raise ConfigError(f"SIG delta must be in (0, 1], got {d}")
        if f <= 0:
            raise ConfigError(f"SIG frequency must be positive, got {f}")
        j = torch.arange(w, dtype=torch.float64)
        row = d * torch.sin(2 * math.pi * j * f / w)
        self.signal = row.float().expand(c, h, w).clone()

    @property
    def clean_label(self):  # type: ignore[override]
        return bool(self.params["clean_label"])

    def apply(self, x):
        return (x + self.signal.to(x.device, x.dtype)).clamp(0, 1)
