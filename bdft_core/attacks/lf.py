"""LF: a smooth, low-frequency additive trigger.

After Zeng, Park, Mosbach, Huang and Jia, "Rethinking the Backdoor Attacks' Triggers: A Frequency
Perspective", ICCV 2021, arXiv:2104.03413. The paper optimises a universal perturbation under a
low-pass constraint; here the trigger is seeded Gaussian noise low-pass filtered in the 2-D
Fourier domain (only frequencies with |k_y|, |k_x| <= ``cutoff`` kept) and scaled to a maximum
amplitude ``eps``: smooth, hard to see, and free of the high-frequency artefacts detectors use."""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Attack


def low_pass(noise: torch.Tensor, cutoff: int) -> torch.Tensor:
    """Keep only the Fourier components with |k_y| <= cutoff and |k_x| <= cutoff (per channel)."""
    _, h, w = noise.shape
    f = torch.fft.fft2(noise.double())
    ky = torch.fft.fftfreq(h, d=1.0 / h).abs()
    kx = torch.fft.fftfreq(w, d=1.0 / w).abs()
    keep = (ky[:, None] <= cutoff) & (kx[None, :] <= cutoff)
    return torch.fft.ifft2(f * keep).real


class LF(Attack):
    """``clip(x + trigger)`` with a fixed smooth trigger of maximum magnitude ``eps``."""

    name = "lf"
    title = "LF (low-frequency)"
    paper = "Zeng et al. 2021, ICCV, arXiv:2104.03413"
    defaults = {"eps": 0.1, "cutoff": 3}
    help = {"eps": "largest change of any pixel, as a fraction of the pixel range",
            "cutoff": "highest spatial frequency kept (periods across the image); lower is smoother"}

    def setup(self):
        c, h, w = self.image_shape
        eps, cut = float(self.params["eps"]), int(self.params["cutoff"])
        if not 0.0 < eps <= 1.0:
            raise ConfigError(f"LF eps must be in (0, 1], got {eps}")
        if not 1 <= cut <= min(h, w) // 2:
            raise ConfigError(f"LF cutoff must be between 1 and {min(h, w) // 2} for {h}x{w} images, got {cut}")
        noise = torch.randn(c, h, w, generator=self._generator, dtype=torch.float64)
        smooth = low_pass(noise, cut)
        self.trigger = (smooth * (eps / smooth.abs().max())).float()

    def apply(self, x):
        return (x + self.trigger.to(x.device, x.dtype)).clamp(0, 1)
