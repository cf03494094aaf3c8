"""Spectral Signatures: in each labelled class, poisoned samples leave a trace along the top singular
direction of the (centred) penultimate-layer features; the samples projecting furthest along it are
removed and the model is retrained from scratch without them.

Tran, Li and Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018 (arXiv:1811.00636).

Per class ``c`` with features ``R`` (n_c x d, from the poisoned model's ``features``): centre the rows,
take the top right singular vector ``v`` of the centred matrix, score each sample by ``(R_i . v)^2``,
and remove the ``1.5 * eps * n_c`` highest-scoring samples of every class (the paper's rule, ``eps``
an upper bound on the share of poisoned samples). Then a fresh model is trained on what is left with
the attack run's training settings (same epochs, schedule, augmentation), so the defense costs one
training run plus one forward pass over the training set.

About ``eps``: the method assumes poisoned samples are a minority of their labelled class (the
paper poisons 5% or 10% of one class). With all-to-one attacks the lab's default poison rate (10% of
the whole CIFAR-10 training set) makes the poisoned images half of the target class. Measured on the
demo's BadNets model (fastnet, 2 epochs): the score's top of the target class is almost all poison
(1000 of the top 1000, 1488 of the top 1500), but below that it mixes (top 5000: 53% poison), since a
squared projection cannot tell two halves of a class apart; the default removes 1.5 * 0.1 of every
class, 7498 images holding 1488 of the 5000 poisoned (recall 0.30), and the retrained model keeps the
backdoor (ASR 0.97, CA 0.69 against the poisoned model's 0.73). In the paper's regime it works: with
1% of the training set poisoned (500 images, 9% of the target class; ASR 0.83, CA 0.74) the default
removes 442 of the 500 (recall 0.88) and the retrained model has ASR 0.07, CA 0.70 (15% of every
class is gone). Set ``eps`` to the share of a class you expect poisoned; for majority-poisoned
classes use Activation Clustering instead.

This module also holds what both data cleansers (Spectral Signatures, Activation Clustering) share:
:func:`penultimate_features`, :func:`retrain_without` and the :class:`DataCleanser` base class.

Needs: the poisoned training set (the defender trains the model); no clean-data budget, no trigger."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import fields, replace

import torch

from ..device import amp_dtype as pick_amp
from ..errors import ConfigError
from ..metrics import autocast_ctx
from ..train import TrainConfig, Trainer, TrainResult
from .base import Defense, PoisonedTraining

NEEDS_POISONED = ("the poisoned training set (the defender trains the model itself); no clean-data budget, "
                  "no trigger")


def require_poisoned(name: str, poisoned) -> PoisonedTraining:
    if poisoned is None:
        raise ConfigError(f"{name} needs the poisoned training set (it cleans the training data and retrains): "
                          "run it through run_defense on a standalone attack run, or pass poisoned=PoisonedTraining")
    return poisoned


@torch.no_grad()
@torch.no_grad()
def eval_batches(model, x_uint8: torch.Tensor, fn, batch: int = 1024, stop=None, amp: str = "auto"):
    """``fn(model, x_float, i)`` on each batch of ``x_uint8`` (starting at index ``i``) in eval mode,
    under the device's autocast (``amp`` as in TrainConfig), concatenated (float32, on the model's
    device); the model's mode is restored. None if ``stop`` was set meanwhile."""
    dev = next(model.parameters()).device
    amp = pick_amp(dev, amp)
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(x_uint8), batch):
            if stop is not None and stop.is_set():
                return None
            xb = x_uint8[i:i + batch].to(dev).float().div_(255.0).contiguous(memory_format=torch.channels_last)
            with autocast_ctx(dev, amp):
                out.append(fn(model, xb, i).float())
    finally:
        model.train(was)
    return torch.cat(out) if out else None


def penultimate_features(model, x_uint8: torch.Tensor, batch: int = 1024, stop=None,
                         amp: str = "auto") -> torch.Tensor | None:
    """``model.features`` of every image (float32, (N, d), on the model's device), in eval mode; None
    if ``stop`` was set meanwhile."""
    if len(x_uint8) == 0:
        return torch.empty(0, 0, device=next(model.parameters()).device)
    return eval_batches(model, x_uint8, lambda m, xb, i: m.features(xb).flatten(1), batch, stop, amp)


def spectral_scores(feats: torch.Tensor) -> torch.Tensor:
    """Tran et al.'s outlier score of each row: the squared projection of the centred row onto the
    top right singular vector of the centred matrix (float64 for exactness)."""
    r = feats.double()
    r = r - r.mean(0, keepdim=True)
    if len(r) < 2:
        return torch.zeros(len(r), dtype=torch.float64, device=feats.device)
    _, _, vh = torch.linalg.svd(r, full_matrices=False)
    return (r @ vh[0]) ** 2


def retrain_config(poisoned: PoisonedTraining, seed: int, **train_over) -> TrainConfig:
    """The attack run's training settings with ``train_over`` (TrainConfig fields) applied."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(train_over) - names
    if unknown:
        raise ConfigError(f"unknown training setting(s) {', '.join(sorted(unknown))}; "
                          f"retraining takes TrainConfig fields ({', '.join(sorted(names))})")
    return replace(copy.deepcopy(poisoned.train), seed=int(seed), **train_over).validate()


def fresh_model(poisoned: PoisonedTraining, seed: int):
    """A new model from ``poisoned.new_model()``, its random initialisation seeded (the global RNG is
    left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return poisoned.new_model()


def retrain_without(poisoned: PoisonedTraining, flagged: torch.Tensor, evaluator=None, callbacks=None, stop=None,
                    seed: int = 0, **train_over) -> tuple[torch.nn.Module, TrainResult]:
    """Train a fresh model on the poisoned training set minus ``flagged`` (indices), with the attack
    run's settings (and ``train_over``), reporting through ``callbacks``. Returns (model, result)."""
    cfg = retrain_config(poisoned, seed, **train_over)
    keep = torch.ones(len(poisoned.y), dtype=torch.bool, device=poisoned.y.device)
    keep[torch.as_tensor(flagged, dtype=torch.long).to(keep.device)] = False
    if not bool(keep.any()):
        raise ConfigError("the detector flagged every training sample; nothing is left to retrain on "
                          "(lower the share removed)")
    idx = keep.nonzero().squeeze(1)
    new = fresh_model(poisoned, seed)
    tr = Trainer(new, poisoned.x[idx], poisoned.y[idx], cfg, evaluator=evaluator, stop=stop)
    for event, fn in (callbacks or []):
        tr.add_callback(event, fn)
    return new, tr.run()


class DataCleanser(Defense):
    """A defense that scores the poisoned training set with the poisoned model's features, removes
    what it flags, and retrains from scratch. Subclasses implement :meth:`detect`."""

    uses_poisoned_data = True
    needs = NEEDS_POISONED

    def detect(self, feats: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
        """Flagged sample indices (int64, sorted) and extra numbers for ``final``."""
        raise NotImplementedError

    def apply(self, model, x_clean, y_clean, evaluator=None, callbacks=None, stop=None, seed: int = 0,
              poisoned: PoisonedTraining | None = None, **train_over):
        poisoned = require_poisoned(self.name, poisoned)
        cfg = retrain_config(poisoned, seed, **train_over)  # bad overrides fail before the feature pass
        t0 = time.perf_counter()
        feats = penultimate_features(model, poisoned.x, stop=stop, amp=cfg.amp)
        if feats is None:  # stopped while scoring: the model is left as it was
            final = evaluator(model) if evaluator is not None else {}
            return TrainResult(stopped=True, seconds=time.perf_counter() - t0, final=dict(final))
        flagged, extra = self.detect(feats, poisoned.y, seed)
        flagged = flagged.to("cpu", torch.long).sort().values
        detect_s = time.perf_counter() - t0
        new, res = retrain_without(poisoned, flagged, evaluator=evaluator, callbacks=callbacks, stop=stop, seed=seed,
                                   **train_over)
        if res.steps:  # what the retraining reached replaces the poisoned model (none: left as it was)
            model.load_state_dict(new.state_dict())
        elif evaluator is not None:
            res.final = evaluator(model)
        model.eval()
        res.final = {**res.final, **poisoned.detection_scores(flagged), **extra, "detect_s": detect_s,
                     "retrain_s": res.seconds}
        res.artefacts["flagged_idx"] = flagged
        res.artefacts.update(getattr(self, "last_artefacts", {}))
        res.seconds = time.perf_counter() - t0
        return res


class SpectralSignatures(DataCleanser):
    name = "spectral_signatures"
    title = "Spectral Signatures"
    paper = "Tran, Li and Madry 2018, Spectral Signatures in Backdoor Attacks, NeurIPS (arXiv:1811.00636)"
    defaults = {"eps": 0.1, "removal_factor": 1.5}
    help = {"eps": "expected upper bound on the share of poisoned samples in a class (0..1); the paper's epsilon",
            "removal_factor": "remove removal_factor * eps of each class, highest outlier scores first (paper: 1.5)"}

    def validate(self):
        super().validate()
        p = self.params
        eps, factor = float(p["eps"]), float(p["removal_factor"])
        if not 0.0 < eps < 1.0:
            raise ConfigError(f"spectral_signatures: eps (the expected poisoned share of a class) must be in (0, 1), "
                              f"got {p['eps']}")
        if not (factor > 0 and math.isfinite(factor)):
            raise ConfigError(f"spectral_signatures: removal_factor must be a positive number, "
                              f"got {p['removal_factor']}")
        if eps * factor >= 1.0:
            raise ConfigError(f"spectral_signatures: removal_factor * eps = {eps * factor:g} would remove every "
                              "sample of each class; keep it below 1")

    def n_removed(self, n_class: int) -> int:
        """How many samples of a class of ``n_class`` are removed."""
        share = float(self.params["removal_factor"]) * float(self.params["eps"])
        return min(n_class, int(math.floor(share * n_class + 1e-9)))

    def detect(self, feats, labels, seed):
        labels = labels.to(feats.device)
        flagged = []
        for c in torch.unique(labels).tolist():
            idx = (labels == c).nonzero().squeeze(1)
            k = self.n_removed(len(idx))
            if k == 0:
                continue
            scores = spectral_scores(feats[idx])
            flagged.append(idx[torch.topk(scores, k).indices])
        out = torch.cat(flagged) if flagged else torch.empty(0, dtype=torch.long)
        return out, {}
