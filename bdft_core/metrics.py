"""Clean accuracy (CA) and attack success rate (ASR), computed in batches on the model's device.

CA: share of clean test images classified correctly. ASR: share of triggered test images whose
true label is not the target that are classified as the target (the attack's label for them)."""
from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict

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
    them, or on a fixed seeded subset of ``live_samples`` images for the live curves.

    Results are remembered per model *state* (a hash of its architecture, parameters and
    buffers, plus the evaluation settings), so the same weights are never evaluated twice: a full
    evaluation also yields the live figures (the live subsets are part of the full sets), and a
    defense that starts from a copy of an already-evaluated model reuses them for its start."""

    def __init__(self, x_test, y_test, x_bd=None, y_bd=None, live_samples: int = 2000, seed: int = 0,
                 cache_size: int = 8):
        self.x_test, self.y_test, self.x_bd, self.y_bd = x_test, y_test, x_bd, y_bd
        g = torch.Generator().manual_seed(seed)
        self._live = torch.randperm(len(y_test), generator=g)[:live_samples].to(y_test.device)
        self._live_bd = (torch.randperm(len(y_bd), generator=g)[:live_samples].to(y_bd.device)
                         if y_bd is not None else None)
        self._cache: OrderedDict[str, dict] = OrderedDict()  # state key -> {"live": ..., "full": ...}
        self._cache_size = cache_size
        self.evaluated_images = 0  # images actually run through a model (cache hits cost nothing)

    @staticmethod
    def _state_key(model, kw) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(repr(model).encode())  # the architecture too (e.g. max vs average pooling holds no weights)
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        h.update(repr(sorted(kw.items())).encode())
        return h.hexdigest()

    def _hit(self, key: str) -> dict:
        entry = self._cache.setdefault(key, {})
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return entry

    def __call__(self, model, live: bool = False, **kw) -> dict[str, float | None]:
        entry = self._hit(self._state_key(model, kw))
        which = "live" if live else "full"
        if which in entry:
            return dict(entry[which])
        if live:
            self.evaluated_images += len(self._live) + (len(self._live_bd) if self._live_bd is not None else 0)
            ca = accuracy(model, self.x_test[self._live], self.y_test[self._live], **kw)
            asr = (accuracy(model, self.x_bd[self._live_bd], self.y_bd[self._live_bd], **kw)
                   if self.y_bd is not None else None)
            entry["live"] = {"clean_acc": ca, "asr": asr}
        else:
            self.evaluated_images += len(self.y_test) + (len(self.y_bd) if self.y_bd is not None else 0)
            hit = predict(model, self.x_test, **kw) == self.y_test.to(next(model.parameters()).device)
            ca = _mean(hit)
            live = {"clean_acc": _mean(hit[self._live.to(hit.device)]), "asr": None}
            asr = None
            if self.y_bd is not None:
                hit_bd = predict(model, self.x_bd, **kw) == self.y_bd.to(hit.device)
                asr = _mean(hit_bd)
                live["asr"] = _mean(hit_bd[self._live_bd.to(hit.device)])
            entry["full"] = {"clean_acc": ca, "asr": asr}
            entry.setdefault("live", live)
        return dict(entry[which])

    @property
    def live_sizes(self) -> tuple[int, int]:
        return len(self._live), (len(self._live_bd) if self._live_bd is not None else 0)


def _mean(hit: torch.Tensor) -> float:
    return hit.float().mean().item() if len(hit) else float("nan")
