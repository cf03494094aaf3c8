"""WaNet: an imperceptible warping of the whole image, with a "noise mode" that teaches the
model to ignore random warps so that only the exact trigger warp activates the backdoor.

Nguyen and Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021,
arXiv:2102.10369."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Attack, PoisonedSet, check_rate


class WaNet(Attack):
    """A fixed smooth warping field: a random ``grid_size`` x ``grid_size`` field of 2-D offsets,
    normalised to mean absolute value 1, upsampled (bicubic) to the image and scaled by
    ``strength / H`` (in grid_sample's [-1, 1] coordinates). In noise mode ``cross_ratio`` times as
    many further training images get the warp plus per-image random noise, labels kept.

    Default strength is 1.0, twice the paper's 0.5 for CIFAR-10: our demo trains for 2 epochs, in
    which s = 0.5 reaches ASR 0.84 and s = 1.0 reaches 0.97 (measured, README). Set 0.5 for the
    paper's setting with longer training."""

    name = "wanet"
    title = "WaNet (warping)"
    paper = "Nguyen & Tran 2021, ICLR, arXiv:2102.10369"
    defaults = {"grid_size": 4, "strength": 1.0, "grid_rescale": 1.0, "noise_mode": True, "cross_ratio": 2.0}
    help = {"grid_size": "number of control points per side of the warping field (k); smaller is smoother",
            "strength": "warping strength (s); larger is easier to learn and easier to see",
            "grid_rescale": "extra scale on the warp",
            "noise_mode": "also train on randomly warped images with their true labels (the paper's noise mode)",
            "cross_ratio": "noise-mode images per poisoned image"}

    def setup(self, noise_grid: torch.Tensor | None = None):
        c, h, w = self.image_shape
        k = int(self.params["grid_size"])
        s = float(self.params["strength"])
        if not 2 <= k <= min(h, w):
            raise ConfigError(f"WaNet grid size must be between 2 and {min(h, w)}, got {k}")
        if s < 0:
            raise ConfigError(f"WaNet strength must be non-negative, got {s}")
        if float(self.params["cross_ratio"]) < 0:
            raise ConfigError("WaNet cross_ratio must be non-negative")
        if noise_grid is None:
            ins = torch.rand(1, 2, k, k, generator=self._generator) * 2 - 1
            ins = ins / ins.abs().mean()
            noise_grid = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        self.noise_grid = noise_grid  # (1, H, W, 2): (x, y) offsets before scaling
        ys = torch.linspace(-1, 1, h)
        xs = torch.linspace(-1, 1, w)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        self.identity_grid = torch.stack((gx, gy), dim=2)[None]  # (1, H, W, 2) in (x, y) order
        scale = s * float(self.params["grid_rescale"]) / h
        self.grid = (self.identity_grid + scale * self.noise_grid).clamp(-1, 1)

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        grid = grid.to(x.device, x.dtype)
        if grid.shape[0] == 1:
            grid = grid.expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True).clamp(0, 1)

    def apply(self, x):
        return self._warp(x, self.grid)

    def apply_noisy(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger warp plus a per-image random perturbation of the grid (noise mode)."""
        n, _, h, w = x.shape
        rnd = (torch.rand(n, h, w, 2, generator=self._generator) * 2 - 1).to(x.device)
        return self._warp(x, (self.grid.to(x.device) + rnd / h).clamp(-1, 1))

    def poison(self, x, y, rate, splits):
        rate = check_rate(rate)
        base = super().poison(x, y, rate, splits)
        if not self.params["noise_mode"] or len(base.poison_idx) == 0:
            return base
        n_noise = int(round(float(self.params["cross_ratio"]) * len(base.poison_idx)))
        taken = torch.zeros(len(y), dtype=torch.bool)
        taken[base.poison_idx.cpu()] = True
        order = splits.order().flip(0)
        free = order[~taken[order]][:n_noise].to(x.device)
        if len(free):
            xf = x[free].float() / 255.0
            base.x[free] = self.apply_noisy(xf).mul(255).round().clamp(0, 255).to(torch.uint8)
        return PoisonedSet(base.x, base.y, base.poison_idx, free)
