"""What every attack shares: parameters with defaults, target labels, poisoning a training set,
the triggered test set used for ASR, and a rendering of the trigger for display.

Images inside an attack are float tensors in [0, 1], shape (N, C, H, W); datasets are stored as
uint8, so :meth:`Attack.apply_uint8` rounds the triggered images back to uint8 exactly as a
poisoned image file would be saved. Subclasses implement :meth:`apply` (and, for attacks that
poison differently, :meth:`poison`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import ConfigError, check_numbers

MODES = ("all_to_one", "all_to_all")


IMAGE_DESCRIPTION = "<{} image>"  # how a run's record names a setting given as an image object


def is_image_description(v) -> bool:
    """Whether a recorded setting is only the description of an image object (not rebuildable)."""
    return isinstance(v, str) and v.startswith("<") and v.endswith(" image>")


@dataclass
class PoisonedSet:
    """A training set after poisoning: a copy of the images and labels, with the indices changed."""

    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,)
    poison_idx: torch.Tensor  # indices whose image carries the trigger (labels changed for dirty-label attacks)
    noise_idx: torch.Tensor  # indices modified without a label change (WaNet's noise mode); often empty


class Attack:
    """Base class. ``params`` holds the attack's own settings, validated against ``defaults``."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    choices: ClassVar[dict[str, tuple]] = {}  # the allowed values of string settings, for front ends
    image_param: ClassVar[str | None] = None  # the setting that also takes a user image (a path)
    help: ClassVar[dict[str, str]] = {}
    clean_label: ClassVar[bool] = False  # True: poisons target-class images and keeps their labels
    # True: the trigger is learned from the data by fit_to (a generator), so it cannot be drawn before
    # training; front ends say so instead of previewing an untrained trigger
    preview_needs_fit: ClassVar[bool] = False

    def __init__(self, image_shape, num_classes: int, target: int = 0, mode: str = "all_to_one", seed: int = 0,
                 **params):
        if len(image_shape) != 3:
            raise ConfigError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = int(num_classes)
        if mode not in MODES:
            raise ConfigError(f"unknown target mode {mode!r}: choose 'all_to_one' or 'all_to_all'")
        self.mode = mode
        if mode == "all_to_one" and not (0 <= int(target) < self.num_classes):
            raise ConfigError(f"target label {target} is outside 0..{self.num_classes - 1}")
        self.target = int(target)
        self.seed = int(seed)
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ConfigError(f"{self.name} has no parameter(s) {', '.join(sorted(unknown))}; "
                              f"it takes {', '.join(self.defaults) or 'none'}")
        check_numbers(self.name, self.defaults, params)
        self.params = {**self.defaults, **params}
        self._generator = torch.Generator().manual_seed(self.seed)
        self.setup()

    @classmethod
    def get_default_config(cls) -> dict[str, Any]:
        return dict(cls.defaults)

    # -- to implement ------------------------------------------------------------------------
    def setup(self) -> None:
        """Validate ``self.params`` and build fixed tensors (mask, pattern, grid) on the CPU."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger: float (N, C, H, W) in [0, 1] -> triggered float images in [0, 1]."""
        raise NotImplementedError

    def fit_to(self, data) -> None:
        """Data-dependent setup, called once with the whole :class:`~bdft_core.data.ImageData` before
        any poisoning or test set (a trigger generator trained on the data, a surrogate model for
        adversarial perturbations). Must be deterministic given the seed; most attacks need none."""

    # -- shared ------------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return self.image_shape[0]

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this attack (JSON-friendly)."""
        def plain(v):  # an image given as an array/tensor/PIL object is described, not embedded
            if v is None or isinstance(v, (bool, int, float, str)):
                return v
            if isinstance(v, (list, tuple)) and all(isinstance(e, (int, float)) for e in v):
                return list(v)
            return IMAGE_DESCRIPTION.format(type(v).__name__)

        params = {k: plain(v) for k, v in self.params.items()}
        return {"name": self.name, "target": self.target, "mode": self.mode, "seed": self.seed, "params": params}

    def apply_uint8(self, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
        """:meth:`apply` on uint8 images, rounded back to uint8 (in batches to bound memory)."""
        out = torch.empty_like(x)
        for i in range(0, len(x), batch):
            xf = x[i:i + batch].float().div_(255.0)
            out[i:i + batch] = self.apply(xf).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        return out

    def target_of(self, y: torch.Tensor) -> torch.Tensor:
        """The label the backdoor should produce for true label(s) ``y``."""
        if self.mode == "all_to_one":
            return torch.full_like(y, self.target)
        return (y + 1) % self.num_classes

    def eligible(self, y: torch.Tensor) -> torch.Tensor:
        """Which training images may be poisoned (bool mask)."""
        if self.clean_label and self.mode == "all_to_one":
            return y == self.target
        if self.mode == "all_to_one":
            return y != self.target
        return torch.ones_like(y, dtype=torch.bool)

    def poison(self, x: torch.Tensor, y: torch.Tensor, rate: float, splits) -> PoisonedSet:
        """Poison ``round(rate * N)`` training images (capped at the eligible pool), chosen by
        ``splits`` so that they avoid the defender's clean data where possible."""
        rate = check_rate(rate)
        elig = self.eligible(y.cpu())
        n = min(int(round(rate * len(y))), int(elig.sum()))
        idx = splits.poison_indices(n, elig).to(x.device)
        xp, yp = x.clone(), y.clone()
        if n:
            xp[idx] = self.apply_uint8(x[idx])
            if not (self.clean_label and self.mode == "all_to_one"):
                yp[idx] = self.target_of(y[idx])
        return PoisonedSet(xp, yp, idx, idx[:0])

    def test_set(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ASR set: test images whose true label is not the target, triggered, with the labels
        the backdoor should produce."""
        keep = y != self.target if self.mode == "all_to_one" else torch.ones_like(y, dtype=torch.bool)
        xs, ys = x[keep], y[keep]
        return self.apply_uint8(xs), self.target_of(ys)

    def render(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """For display: clean images, triggered images and their difference, as float (N, C, H, W);
        clean and poisoned in [0, 1], residual = poisoned - clean in [-1, 1]."""
        xf = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        p = self.apply_uint8((xf * 255).round().to(torch.uint8)).float() / 255.0
        return {"clean": xf, "poisoned": p, "residual": p - xf}


class MaskPatternAttack(Attack):
    """Triggers of the form ``x * (1 - mask) + pattern * mask`` (patch and blend alike);
    subclasses set ``self.mask`` (1, H, W) or (C, H, W) and ``self.pattern`` (C, H, W)."""

    mask: torch.Tensor
    pattern: torch.Tensor

    def apply(self, x):
        m = self.mask.to(x.device, x.dtype)
        p = self.pattern.to(x.device, x.dtype)
        return x * (1 - m) + p * m


def check_rate(rate: float) -> float:
    try:
        r = float(rate)
    except (TypeError, ValueError):
        raise ConfigError(f"poison rate must be a number in [0, 1], got {rate!r}") from None
    if not 0.0 <= r <= 1.0:
        raise ConfigError(f"poison rate must be in [0, 1], got {rate}")
    return r


def image_to_pattern(img, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """A user trigger image (path, PIL image, uint8/float array or tensor H,W[,C] / C,H,W) as a
    float (C, H, W) tensor in [0, 1], resized to ``size`` = (H, W). Where a 3-D shape fits both
    layouts (a 3x3 RGB patch is 3 x 3 x 3), an array is read as H,W,C (numpy's and PIL's layout) and
    a tensor as C,H,W (torch's)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if isinstance(img, (str, bytes)) or hasattr(img, "read") or hasattr(img, "__fspath__"):
        try:
            with Image.open(img) as im:
                im.load()
                img = im.copy()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ConfigError(f"the trigger image could not be read as an image ({exc})") from exc
    if isinstance(img, Image.Image):
        if img.width * img.height > 4096 * 4096:
            raise ConfigError(f"trigger image is too large ({img.width}x{img.height}); use at most 4096x4096")
        img = img.convert("RGB" if channels == 3 else "L").resize((size[1], size[0]), Image.BILINEAR)
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        return arr.permute(2, 0, 1).contiguous() if arr.ndim == 3 else arr[None]
    is_tensor = isinstance(img, torch.Tensor)
    if not is_tensor and not isinstance(img, (np.ndarray, list, tuple)):  # {"a": 1} from a command line, say
        raise ConfigError(f"a trigger image is a path to a PNG/JPEG file or an array of pixels, got {img!r:.80}")
    try:
        t = torch.as_tensor(img if is_tensor else np.asarray(img))
    except (TypeError, ValueError) as exc:  # ragged lists, text inside
        raise ConfigError(f"a trigger image given as pixels must be a regular array of numbers ({exc})") from None
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if t.ndim == 2:
        t = t[None]
    elif t.ndim == 3 and t.shape[-1] in (1, 3) and not (is_tensor and t.shape[0] in (1, 3)):
        t = t.permute(2, 0, 1)
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise ConfigError(f"trigger image must be H x W, H x W x C or C x H x W, got shape {tuple(t.shape)}")
    if t.min() < 0 or t.max() > 1:
        raise ConfigError("trigger image values must lie in [0, 1] (float) or 0..255 (uint8)")
    if t.shape[0] != channels:
        t = t.mean(0, keepdim=True) if channels == 1 else t.expand(3, -1, -1)
    if tuple(t.shape[1:]) != tuple(size):
        t = torch.nn.functional.interpolate(t[None], size=size, mode="bilinear", align_corners=False)[0]
    return t.clamp(0, 1).contiguous()
