"""Models. Every model takes float images in [0, 1] (N, C, H, W), normalises them itself (so
attacks and attributions work in pixel space), and exposes ``features`` (image -> embedding) and
``classifier`` (embedding -> logits), which fine-tuning "last layer only" and the later paradigms use.

- ``fastnet``: a small, fast convnet in the spirit of airbench (Keller Jordan's CIFAR-10 speed
  runs): a frozen whitening 2x2 convolution initialised from the data, then three blocks of
  conv-pool-BN-GELU-conv-BN-GELU. Sized for live demos on a CPU.
- ``resnet18``: the pre-activation ResNet-18 for 32x32 inputs (He et al. 2016, "Identity Mappings
  in Deep Residual Networks"), for fidelity with the literature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


class InputNorm(nn.Module):
    """Per-channel standardisation with statistics stored as buffers (saved with the weights)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.full((1, channels, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, channels, 1, 1), 0.25))

    @torch.no_grad()
    def fit(self, x_uint8: torch.Tensor) -> None:
        x = x_uint8[:10000].float() / 255.0
        self.mean.copy_(x.mean(dim=(0, 2, 3)).view(1, -1, 1, 1))
        self.std.copy_(x.std(dim=(0, 2, 3)).clamp_min(1e-3).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class BackdoorModel(nn.Module):
    """Common interface: ``forward = classifier(features(x))``; ``fit_data`` sets data-dependent
    initialisation (input statistics, whitening) before training from scratch."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = InputNorm(channels)
        self.body: nn.Module
        self.classifier: nn.Linear

    def features(self, x):
        return self.body(self.norm(x))

    def forward(self, x):
        return self.classifier(self.features(x))

    def fit_data(self, x_uint8: torch.Tensor) -> None:
        self.norm.fit(x_uint8)

    def whitening_parameters(self) -> list[nn.Parameter]:
        """Parameters of a data-initialised input layer that train only early on (see
        ``TrainConfig.whiten_bias_epochs``); none for most models."""
        return []


def _conv_block(ci: int, co: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(ci, co, 3, padding=1, bias=False), nn.MaxPool2d(2, ceil_mode=True), nn.BatchNorm2d(co), nn.GELU(),
        nn.Conv2d(co, co, 3, padding=1, bias=False), nn.BatchNorm2d(co), nn.GELU())


class FastNet(BackdoorModel):
    def __init__(self, num_classes: int, channels: int = 3, widths=(24, 48, 96), pool: str = "max"):
        super().__init__(channels)
        w0 = 2 * channels * 4
        whiten = nn.Conv2d(channels, w0, 2, padding=0, bias=True)
        whiten.weight.requires_grad_(False)
        blocks, ci = [], w0
        for co in widths:
            blocks.append(_conv_block(ci, co))
            ci = co
        if pool not in ("max", "avg"):
            raise ConfigError(f"fastnet pool must be 'max' or 'avg', got {pool!r}")
        gpool = nn.AdaptiveMaxPool2d(1) if pool == "max" else nn.AdaptiveAvgPool2d(1)
        self.body = nn.Sequential(whiten, nn.GELU(), *blocks, gpool, nn.Flatten())
        self.classifier = nn.Linear(ci, num_classes)
        for m in self.modules():  # identity-like init of the square convs (airbench's "dirac" init)
            if isinstance(m, nn.Conv2d) and m is not whiten and m.in_channels == m.out_channels:
                with torch.no_grad():
                    torch.nn.init.dirac_(m.weight[: m.in_channels]).add_(torch.randn_like(m.weight) * 0.02)

    @property
    def whiten(self) -> nn.Conv2d:
        return self.body[0]

    def whitening_parameters(self) -> list[nn.Parameter]:
        return [self.whiten.bias]

    @torch.no_grad()
    def fit_data(self, x_uint8: torch.Tensor, eps: float = 5e-4) -> None:
        """Set input statistics, then the whitening filters from the covariance of 2x2 patches."""
        super().fit_data(x_uint8)
        x = self.norm(x_uint8[:5000].to(self.norm.mean.device).float() / 255.0)  # data and model may differ in device
        c = x.shape[1]
        patches = x.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, c * 4).double()
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        evals, evecs = torch.linalg.eigh(cov)
        # patch vectors are ordered (C, kh, kw), so each scaled eigenvector reshapes to one filter
        filt = (evecs.T / torch.sqrt(evals + eps)[:, None]).reshape(c * 4, c, 2, 2).float()
        self.whiten.weight.copy_(torch.cat([filt, -filt], 0))
        self.whiten.bias.zero_()


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, ci: int, co: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(ci)
        self.conv1 = nn.Conv2d(ci, co, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(co)
        self.conv2 = nn.Conv2d(co, co, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(ci, co, 1, stride, bias=False) if stride != 1 or ci != co else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class PreActResNet18(BackdoorModel):
    def __init__(self, num_classes: int, channels: int = 3, width: int = 64):
        super().__init__(channels)
        layers, ci = [nn.Conv2d(channels, width, 3, 1, 1, bias=False)], width
        for i, (co, stride) in enumerate([(width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)]):
            layers += [PreActBlock(ci, co, stride), PreActBlock(co, co, 1)]
            ci = co
        layers += [nn.BatchNorm2d(ci), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(ci, num_classes)


MODELS = {
    "fastnet": (FastNet, "small fast convnet (airbench-style), for live demos on a CPU"),
    "resnet18": (PreActResNet18, "pre-activation ResNet-18, the literature's standard; slow on a CPU"),
}


def model_names() -> list[str]:
    return list(MODELS)


def build_model(name: str, num_classes: int, channels: int = 3, **kw) -> BackdoorModel:
    key = str(name).strip().lower()
    if key not in MODELS:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    return MODELS[key][0](num_classes=num_classes, channels=channels, **kw)
