"""What every sequela axis shares: the data an evaluation works with (:class:`SequelaContext`),
the :class:`Axis` base class, and the small numerical tools the axes use (ROC AUC, membership
advantage, a brief training loop, softmax outputs cached per model state).

"Backdoor sequela" (Sha, He, Berrang, Humbert and Zhang, "Fine-Tuning Is All You Need to Mitigate
Backdoor Attacks", arXiv:2212.09067, 2022) is how a model's vulnerability to *other* attacks changes
once its backdoor has been removed. Each axis measures one such vulnerability on one model; compare a
poisoned model with its defended versions (and a clean model) on the same context to see the sequela.

Every axis reports a headline ``value`` oriented so that HIGHER = MORE VULNERABLE, the raw numbers
behind it (``raw``), and its wall time (``seconds``)."""
from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError

ProgressFn = Callable[[float, str], None]  # progress(fraction done in [0, 1], what is happening)


# --------------------------------------------------------------------------------------------
# The evaluation's data
# --------------------------------------------------------------------------------------------

@dataclass
class SequelaContext:
    """The data every axis works with, the same for every model compared. Images are uint8
    (N, C, H, W), labels int64 (N,); all on ``device`` (or movable there).

    - ``members_x/y``: images the model was trained on (for an attack run: training images that are
      neither poisoned nor in the defender's clean split, so a defense's fine-tuning did not see them).
    - ``nonmembers_x/y``: images from the same distribution the model never saw (test images).
    - ``shadow_x/y``: a pool disjoint from both and from ``x_test`` (another part of the test set): the
      outside attacker's own data, for shadow models, stealing queries and re-injection samples.
    - ``x_test/y_test``: held-out images for accuracy-type measures (adversarial examples,
      calibration, the stolen copy's fidelity, re-injection ASR).
    - ``attack``: the run's attack object (``apply_uint8``, ``target_of``), for backdoor re-injection;
      None when there is none (that axis then reports no value).
    - ``new_model``: builds a fresh, untrained model of the same architecture, fitted to the data
      (input statistics), on ``device``: the shadow and stolen copies.
    """

    members_x: torch.Tensor
    members_y: torch.Tensor
    nonmembers_x: torch.Tensor
    nonmembers_y: torch.Tensor
    shadow_x: torch.Tensor
    shadow_y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    attack: Any = None
    new_model: Callable[[], torch.nn.Module] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    amp: str = "auto"  # autocast for the training/gradient loops: "auto" (bf16 where fast), "bf16", "off"
    num_classes: int | None = None  # None: from the labels
    # how the evaluated model was trained, for shadow models that should resemble it: label smoothing
    # changes the shape of a model's outputs on its members (bdft's attack training uses 0.2)
    train_label_smoothing: float = 0.0
    cache: dict = field(default_factory=dict, repr=False)  # what axes share (shadow models)
    # model outputs: per model object (weakly held, so a freed model's entry goes with it and a new
    # object at the same address cannot inherit it), then per state of its weights and split
    outputs: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.num_classes is None:
            ys = [y for y in (self.members_y, self.nonmembers_y, self.shadow_y, self.y_test) if len(y)]
            self.num_classes = int(max(int(y.max()) for y in ys)) + 1 if ys else 2

    def validate(self) -> "SequelaContext":
        pairs = {"members": (self.members_x, self.members_y), "nonmembers": (self.nonmembers_x, self.nonmembers_y),
                 "shadow": (self.shadow_x, self.shadow_y), "test": (self.x_test, self.y_test)}
        for name, (x, y) in pairs.items():
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ConfigError(f"sequela: {name} images must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
            if len(x) != len(y):
                raise ConfigError(f"sequela: {len(x)} {name} images but {len(y)} labels")
        for name in ("members", "nonmembers", "test"):
            if len(pairs[name][1]) < 2:
                raise ConfigError(f"sequela: at least 2 {name} images are needed, got {len(pairs[name][1])}")
        return self

    def build_model(self) -> torch.nn.Module:
        """A fresh model of the evaluated architecture (shadow models, stolen copies)."""
        if self.new_model is None:
            raise ConfigError("sequela: this axis trains a model of its own, but the context has no new_model")
        return self.new_model().to(self.device)

    def generator(self, salt: str) -> torch.Generator:
        """A CPU generator seeded from the context's seed and ``salt`` (one per axis, so that axes
        draw independently and the draws are the same for every model)."""
        return torch.Generator().manual_seed(int(self.seed) * 1_000_003 + zlib.crc32(salt.encode()))

    def sizes(self) -> dict[str, int]:
        return {"members": len(self.members_y), "nonmembers": len(self.nonmembers_y), "shadow": len(self.shadow_y),
                "test": len(self.y_test)}

    def autocast_dtype(self):
        from ..device import amp_dtype

        return amp_dtype(self.device, self.amp)

    # -- model outputs, cached per model state -------------------------------------------------
    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return {"members": (self.members_x, self.members_y), "nonmembers": (self.nonmembers_x, self.nonmembers_y),
                    "shadow": (self.shadow_x, self.shadow_y), "test": (self.x_test, self.y_test)}[which]
        except KeyError:
            raise ConfigError(f"sequela: unknown split {which!r}") from None

    def clear_outputs(self) -> None:
        """Forget the cached model outputs (kept: the shared shadow models)."""
        self.outputs.clear()

    def log_probs(self, model, which: str, n: int | None = None) -> torch.Tensor:
        """Log-softmax outputs (float32, no autocast: exact enough for ranking scores) of ``model``
        on the first ``n`` images of a split, computed once per model state and remembered."""
        x, _ = self.split(which)
        n = len(x) if n is None else min(int(n), len(x))
        # keyed by the object too: a wrapper's settings (a temperature, say) are not in its state; by
        # a weak reference, not id(), since a freed wrapper's id is soon another object's
        per_model = self.outputs.setdefault(model, {})
        key = (state_key(model), which)
        have = per_model.get(key)
        if have is None or len(have) < n:  # compute only the images not yet seen
            start = 0 if have is None else len(have)
            more = log_softmax_outputs(model, x[start:n])
            have = more if have is None else torch.cat([have, more])
            per_model[key] = have
        return have[:n]


@contextlib.contextmanager
def seeded(seed: int, device=None):
    """Seed torch's global generators for the block (a fresh model's initialisation), restoring the
    caller's random state afterwards."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(int(seed))
        yield


def state_key(model) -> str:
    """A hash of a model's architecture and weights (outputs are cached under it, so a model changed
    in place is never served stale outputs)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(model).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def log_softmax_outputs(model, x_uint8: torch.Tensor, batch: int = 500, amp_dtype=None) -> torch.Tensor:
    """Log-softmax of ``model`` on uint8 images, in eval mode (the mode is restored), float32."""
    from ..metrics import autocast_ctx

    was = model.training
    model.eval()
    dev = model_device(model)
    out = []
    try:
        for i in range(0, len(x_uint8), batch):
            xb = x_uint8[i:i + batch].to(dev).float().div_(255.0)
            with autocast_ctx(dev, amp_dtype):
                out.append(F.log_softmax(model(xb).float(), dim=1))
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.empty(0, device=dev)


# --------------------------------------------------------------------------------------------
# Scores -> ROC numbers
# --------------------------------------------------------------------------------------------

def _as_1d(s) -> torch.Tensor:
    return torch.as_tensor(s, dtype=torch.float64).detach().reshape(-1).cpu()


def roc_auc(scores_in, scores_out) -> float:
    """Area under the ROC curve of a score where higher means "member" (positive): the probability
    that a random positive scores above a random negative, ties counting one half (Mann-Whitney U).
    0.5 = no better than chance; 1.0 = perfect separation."""
    a, b = _as_1d(scores_in), _as_1d(scores_out)
    if len(a) == 0 or len(b) == 0:
        raise ConfigError("roc_auc needs at least one positive and one negative score")
    allv = torch.cat([a, b])
    vals, inverse, counts = torch.unique(allv, sorted=True, return_inverse=True, return_counts=True)
    # average 1-based rank of each distinct value: ranks before it + (count + 1) / 2
    before = torch.cumsum(counts, 0) - counts
    avg_rank = before.double() + (counts.double() + 1) / 2
    rank_sum_pos = avg_rank[inverse[: len(a)]].sum().item()
    u = rank_sum_pos - len(a) * (len(a) + 1) / 2
    return float(u / (len(a) * len(b)))


def roc_curve(scores_in, scores_out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(FPR, TPR, thresholds) for the rule "member if score >= threshold", one point per distinct
    score, starting at (0, 0) (threshold +inf)."""
    a, b = _as_1d(scores_in), _as_1d(scores_out)
    allv = torch.cat([a, b])
    lab = torch.cat([torch.ones(len(a), dtype=torch.float64), torch.zeros(len(b), dtype=torch.float64)])
    order = torch.argsort(allv, descending=True, stable=True)
    v, lab = allv[order], lab[order]
    tp, fp = torch.cumsum(lab, 0), torch.cumsum(1 - lab, 0)
    last = torch.ones(len(v), dtype=torch.bool)  # the last position of each run of equal scores
    if len(v) > 1:
        last[:-1] = v[1:] != v[:-1]
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, tp[last] / max(1, len(a))])
    fpr = torch.cat([zero, fp[last] / max(1, len(b))])
    thr = torch.cat([torch.tensor([math.inf], dtype=torch.float64), v[last]])
    return fpr, tpr, thr


def advantage(scores_in, scores_out) -> float:
    """Membership advantage (Yeom et al. 2018): the largest TPR - FPR over all thresholds, i.e.
    the best threshold chosen in hindsight (an upper bound on what a threshold attacker reaches).
    0 = no information; 1 = perfect."""
    fpr, tpr, _ = roc_curve(scores_in, scores_out)
    return float((tpr - fpr).max().clamp_min(0).item())


# --------------------------------------------------------------------------------------------
# A brief training loop (shadow models, stolen copies)
# --------------------------------------------------------------------------------------------

def fit(model, x_uint8: torch.Tensor, target: torch.Tensor, epochs: float, lr: float, batch_size: int = 128,
        seed: int = 0, label_smoothing: float = 0.0, weight_decay: float = 5e-4, flip: bool = True, amp_dtype=None,
        stop: threading.Event | None = None, progress: ProgressFn | None = None, what: str = "training") -> dict:
    """Train ``model`` in place with SGD (Nesterov momentum 0.9), a warm-up/linear-decay schedule and
    random flips. ``target`` is int64 labels (N,) or soft labels, float (N, C) probabilities (then the
    loss is the cross-entropy against them, as in knockoff stealing). Returns steps, seconds, stopped."""
    from ..data import augment
    from ..metrics import autocast_ctx
    from ..schedules import WarmupLinear
    from ..train import batch_indices

    t0 = time.perf_counter()
    dev = model_device(model)
    x_uint8, target = x_uint8.to(dev), target.to(dev)
    n = len(x_uint8)
    bs = max(1, min(int(batch_size), n))
    steps_per_epoch = math.ceil(n / bs)
    total = max(1, math.ceil(float(epochs) * steps_per_epoch))
    sched = WarmupLinear(peak=float(lr), warmup=0.2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=sched.lr(0, total), momentum=0.9,
                          nesterov=True, weight_decay=weight_decay)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    soft = target.dtype.is_floating_point
    model.train()
    step = 0
    while step < total and not (stop is not None and stop.is_set()):
        perm = torch.randperm(n, device=dev, generator=gen)
        for i in range(0, n, bs):
            if step >= total or (stop is not None and stop.is_set()):
                break
            idx = batch_indices(perm, i, bs)
            xb = x_uint8[idx]
            if flip:
                xb = augment(xb, flip=True, translate=0, generator=gen)
            xb = xb.float().div_(255.0)
            for g in opt.param_groups:
                g["lr"] = sched.lr(step, total)
            with autocast_ctx(dev, amp_dtype):
                out = model(xb)
            out = out.float()
            if soft:
                loss = -(target[idx] * F.log_softmax(out, dim=1)).sum(1).mean()
            else:
                loss = F.cross_entropy(out, target[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if progress is not None:
                progress(step / total, f"{what}: step {step}/{total}")
    model.eval()
    return {"steps": step, "total_steps": total, "stopped": step < total, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------
# Axis base class
# --------------------------------------------------------------------------------------------

def _sub(progress: ProgressFn | None, lo: float, hi: float) -> ProgressFn | None:
    """A progress function mapping [0, 1] onto [lo, hi] of ``progress``."""
    if progress is None:
        return None
    return lambda f, msg="": progress(lo + (hi - lo) * min(1.0, max(0.0, float(f))), msg)


class Axis:
    """One vulnerability measured on one model. ``value`` is the headline number, oriented so that
    HIGHER = MORE VULNERABLE; ``range`` is the span used to place it on a radar chart (fixed, so that
    charts of different runs compare); ``raw`` holds the numbers behind it."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    meaning: ClassVar[str] = ""  # one plain sentence (hover text)
    unit: ClassVar[str] = ""  # what ``value`` is ("AUC", "success rate", ...)
    range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    defaults: ClassVar[dict[str, Any]] = {}
    choices: ClassVar[dict[str, tuple]] = {}  # the allowed values of string settings, for front ends
    help: ClassVar[dict[str, str]] = {}
    needs_model_factory: ClassVar[bool] = False  # trains models of its own (ctx.new_model)

    def __init__(self, **params):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ConfigError(f"sequela axis {self.name} has no parameter(s) {', '.join(sorted(unknown))}; "
                              f"it takes {', '.join(self.defaults) or 'none'}")
        self.params = {**self.defaults, **params}
        self.validate()

    @classmethod
    def get_default_config(cls) -> dict[str, Any]:
        return dict(cls.defaults)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}

    def _positive_int(self, *keys: str) -> None:
        for k in keys:
            v = self.params[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or int(v) < 1:
                raise ConfigError(f"{self.name}: {k} must be a whole number >= 1, got {v!r}")

    def _positive(self, *keys: str) -> None:
        for k in keys:
            v = self.params[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (float(v) > 0 and math.isfinite(float(v))):
                raise ConfigError(f"{self.name}: {k} must be a positive number, got {v!r}")

    def validate(self) -> None:
        """Check ``self.params``; raise ConfigError with a specific message."""

    # -- to implement --------------------------------------------------------------------------
    def prepare(self, ctx: SequelaContext, stop=None, progress: ProgressFn | None = None) -> float:
        """Work shared by every model evaluated on ``ctx`` (shadow models), done once and kept in
        ``ctx.cache``. Returns the seconds spent (0 when already done)."""
        return 0.0

    def is_prepared(self, ctx: SequelaContext) -> bool:
        """Whether :meth:`prepare` has nothing (left) to do on ``ctx``."""
        return True

    def compute(self, model, ctx: SequelaContext, stop=None, progress: ProgressFn | None = None
                ) -> tuple[float | None, dict]:
        """(value, raw) for ``model``; ``model`` must be left unchanged."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    def measure(self, model, ctx: SequelaContext, stop: threading.Event | None = None,
                progress: ProgressFn | None = None) -> dict:
        """``{"value", "raw", "seconds", "stopped"}`` for ``model`` on ``ctx`` (the shared work, if
        not yet done, is included in ``seconds``)."""
        t0 = time.perf_counter()
        was = model.training
        model.eval()
        try:
            split = 0.0 if self.is_prepared(ctx) else 0.5
            self.prepare(ctx, stop=stop, progress=_sub(progress, 0.0, split))
            value, raw = self.compute(model, ctx, stop=stop, progress=_sub(progress, split, 1.0))
        finally:
            model.train(was)
        if progress is not None:
            progress(1.0, f"{self.name}: done")
        stopped = bool(stop is not None and stop.is_set())
        return {"value": None if value is None else float(value), "raw": raw,
                "seconds": time.perf_counter() - t0, "stopped": stopped}
