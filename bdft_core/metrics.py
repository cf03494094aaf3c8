"""Clean accuracy (CA) and attack success rate (ASR), computed in batches on the model's device.

CA: share of clean test images classified correctly. ASR: share of triggered test images whose
true label is not the target that are classified as the target (the attack's label for them)."""
from __future__ import annotations

import contextlib
import copy
import hashlib
from collections import OrderedDict

import torch


def autocast_ctx(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict(model, x_uint8: torch.Tensor, batch: int = 1024, amp_dtype=None, channels_last: bool = True) -> torch.Tensor:
    """Predicted labels for uint8 images, in eval mode. Each module's mode is restored as it was, so
    BatchNorm layers a trainer holds in eval mode (fine-tuning the last layer only) stay there."""
    modes = [(m, m.training) for m in model.modules()]
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
        for m, mode in modes:
            m.training = mode
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=dev)


def accuracy(model, x_uint8, y, **kw) -> float:
    """Share of ``x`` classified as ``y`` (CA on clean data; ASR on a triggered set with target labels)."""
    if len(y) == 0:
        return float("nan")
    return (predict(model, x_uint8, **kw) == y.to(next(model.parameters()).device)).float().mean().item()


class Evaluator:
    """Holds the clean test set and the attack's triggered test set; measures CA and ASR on all of
    them, or on a fixed seeded subset of ``live_samples`` images of each for the live curves (the
    first ``n`` of one seeded permutation, so a smaller live set is part of a larger one).

    Results are remembered per model *state* (a hash of its architecture, parameters and
    buffers, plus the evaluation settings), so the same weights are never evaluated twice: a full
    evaluation also yields the live figures of any size (the live subsets are part of the full
    sets), and a defense that starts from a copy of an already-evaluated model reuses them for its
    start. :meth:`with_live_samples` gives a view with another live size that shares the cache."""

    def __init__(self, x_test, y_test, x_bd=None, y_bd=None, live_samples: int = 2000, seed: int = 0,
                 cache_size: int = 8):
        self.x_test, self.y_test, self.x_bd, self.y_bd = x_test, y_test, x_bd, y_bd
        g = torch.Generator().manual_seed(seed)
        self._perm = torch.randperm(len(y_test), generator=g).to(y_test.device)
        self._perm_bd = torch.randperm(len(y_bd), generator=g).to(y_bd.device) if y_bd is not None else None
        self.live_samples = _live_size(live_samples)
        # state key -> {"full": figures, "hits": (clean, triggered) per-image hits, ("live", n): figures}
        self._cache: OrderedDict[str, dict] = OrderedDict()
        self._cache_size = cache_size
        self._counter = [0]  # shared with views: images actually run through a model

    @property
    def evaluated_images(self) -> int:
        """Images actually run through a model (cache hits cost nothing), this evaluator and its views."""
        return self._counter[0]

    def with_live_samples(self, n: int | None) -> "Evaluator":
        """This evaluator with live evaluations on ``n`` images of each set (None: unchanged); the
        data, the cache and the image count are shared, so figures measured by one serve the other."""
        if n is None or _live_size(n) == self.live_samples:
            return self
        view = copy.copy(self)
        view.live_samples = _live_size(n)
        return view

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

    def __call__(self, model, live: bool = False, live_samples: int | None = None, **kw) -> dict[str, float | None]:
        """CA and ASR of ``model``: on the whole test sets, or with ``live`` on the live subsets
        (``live_samples`` images of each; None: this evaluator's size). ``kw``: :func:`predict`'s
        settings (``amp_dtype``, ``channels_last``)."""
        entry = self._hit(self._state_key(model, kw))
        if not live:
            if "full" not in entry:
                self._counter[0] += len(self.y_test) + (len(self.y_bd) if self.y_bd is not None else 0)
                hit = predict(model, self.x_test, **kw) == self.y_test.to(next(model.parameters()).device)
                hit_bd = (predict(model, self.x_bd, **kw) == self.y_bd.to(hit.device)) if self.y_bd is not None else None
                entry["hits"] = (hit, hit_bd)
                entry["full"] = {"clean_acc": _mean(hit), "asr": _mean(hit_bd) if hit_bd is not None else None}
            return dict(entry["full"])
        n = _live_size(live_samples) if live_samples is not None else self.live_samples
        idx, idx_bd = self._perm[:n], (self._perm_bd[:n] if self._perm_bd is not None else None)
        if ("live", n) not in entry:
            if "hits" in entry:  # the full pass already holds every live image's result
                hit, hit_bd = entry["hits"]
                entry[("live", n)] = {"clean_acc": _mean(hit[idx.to(hit.device)]),
                                      "asr": _mean(hit_bd[idx_bd.to(hit.device)]) if hit_bd is not None else None}
            else:
                self._counter[0] += len(idx) + (len(idx_bd) if idx_bd is not None else 0)
                ca = accuracy(model, self.x_test[idx], self.y_test[idx], **kw)
                asr = accuracy(model, self.x_bd[idx_bd], self.y_bd[idx_bd], **kw) if idx_bd is not None else None
                entry[("live", n)] = {"clean_acc": ca, "asr": asr}
        return dict(entry[("live", n)])

    @property
    def live_sizes(self) -> tuple[int, int]:
        """Images of the clean and the triggered test set in one live evaluation."""
        return len(self._perm[:self.live_samples]), len(self._perm_bd[:self.live_samples]) if self._perm_bd is not None else 0


def _live_size(n) -> int:
    """``n`` if it is a valid number of live-evaluation images, else a ConfigError."""
    from .errors import ConfigError

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"live_samples must be a whole number of images >= 1, got {n!r}")
    return n


def _mean(hit: torch.Tensor) -> float:
    return hit.float().mean().item() if len(hit) else float("nan")
