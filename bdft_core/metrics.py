"""Clean accuracy (CA) and attack success rate (ASR), computed in batches on the model's device.

CA: share of clean test images classified correctly. ASR: share of triggered test images whose
true label is not the target that are classified as the target (the attack's label for them)."""
from __future__ import annotations

import contextlib

import torch


def autocast_ctx(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict(model, x_uint8: torch.Tensor, batch: int = 1024, amp_dtype=None, channels_last: bool = True) -> torch.Tensor:
    """Predicted labels for uint8 images, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    try:
        for i in range(0, len(x_uint8), batch):
            xb = x_uint8[i:i + batch].to(dev, non_blocking=True).float().div_(255.0)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast_ctx(dev, amp_dtype):
                out.append(model(xb).argmax(1))
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=dev)


def accuracy(model, x_uint8, y, **kw) -> float:
    """Share of ``x`` classified as ``y`` (CA on clean data; ASR on a triggered set with target labels)."""
    if len(y) == 0:
        return float("nan")
    return (predict(model, x_uint8, **kw) == y.to(next(model.parameters()).device)).float().mean().item()


class Evaluator:
    """Holds the clean test set and the attack's triggered test set; measures CA and ASR on all of
    them, or on a fixed seeded subset of ``live_samples`` images for the live curves."""

    def __init__(self, x_test, y_test, x_bd=None, y_bd=None, live_samples: int = 2000, seed: int = 0):
        self.x_test, self.y_test, self.x_bd, self.y_bd = x_test, y_test, x_bd, y_bd
        g = torch.Generator().manual_seed(seed)
        self._live = torch.randperm(len(y_test), generator=g)[:live_samples].to(y_test.device)
        self._live_bd = (torch.randperm(len(y_bd), generator=g)[:live_samples].to(y_bd.device)
                         if y_bd is not None else None)

    def __call__(self, model, live: bool = False, **kw) -> dict[str, float | None]:
        if live:
            ca = accuracy(model, self.x_test[self._live], self.y_test[self._live], **kw)
            asr = (accuracy(model, self.x_bd[self._live_bd], self.y_bd[self._live_bd], **kw)
                   if self.y_bd is not None else None)
        else:
            ca = accuracy(model, self.x_test, self.y_test, **kw)
            asr = accuracy(model, self.x_bd, self.y_bd, **kw) if self.y_bd is not None else None
        return {"clean_acc": ca, "asr": asr}

    @property
    def live_sizes(self) -> tuple[int, int]:
        return len(self._live), (len(self._live_bd) if self._live_bd is not None else 0)
