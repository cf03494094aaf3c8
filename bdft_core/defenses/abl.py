"""ABL (Anti-Backdoor Learning): train a fresh model on the poisoned data so that the backdoor's
samples give themselves away, set them apart, and finally unlearn them.

Li, Lyu, Koren, Lyu, Li and Ma, "Anti-Backdoor Learning: Training Clean Models on Poisoned Data",
NeurIPS 2021 (arXiv:2110.11571).

Backdoor samples are learned much faster than clean ones. Three phases, from a fresh model:

1. *Isolation*: the first ``isolation_share`` of the training budget (paper: 20 of 100 epochs) with
   the local gradient ascent (LGA) loss ``sign(CE - gamma) * CE`` (``gamma`` = 0.5, as the paper):
   once the loss drops below ``gamma`` the step turns to ascent, which holds clean samples near
   ``gamma`` while the backdoor's, learned faster, stay well below it. As in the authors' released
   training, CE is the mini-batch mean (plain cross-entropy: with label smoothing the loss could not
   go below ``gamma`` at all). Then the ``isolation_rate`` (1%) of training samples with the lowest
   loss under this model are isolated.
2. *Training*: the rest of the budget, normal training (the attack run's loss, schedule and
   augmentation) on the other 99%: the learning-rate schedule continues where phase 1 left it, so
   phases 1 and 2 together cost one training run of the attack's length.
3. *Unlearning*: gradient *ascent* on the isolated samples (loss ``-CE``) with a small constant
   learning rate (``unlearn_lr`` 5e-4, the paper's), which breaks the trigger's link to the target
   class even though poisoned samples remain in the data trained on in phase 2. Ascent has no floor:
   on the demo's model (fastnet, CIFAR-10) a fixed schedule either stops short (ASR still 0.42 after
   one pass over the isolated 500 images) or runs away (CA 0.64 after two passes, 0.10 and NaN
   weights after three). So it runs until the isolated samples stop getting their labels: before
   each step the isolated samples (up to 1024 of them, eval mode) are classified, and unlearning ends
   once at most ``unlearn_stop_acc`` (0.01) of them keep their label, or after
   ``unlearn_epochs`` (5) passes at most, or when the loss stops being finite. BatchNorm statistics
   are kept fixed (the isolated samples are mostly triggered images, and a few hundred of them should
   not redefine the statistics of the whole model; measured, it keeps clean accuracy better).

Measured on the demo's model (CIFAR-10, BadNets 10%, fastnet, the attack's 2 epochs; CPU): the 500
isolated images are all poisoned; after phases 1-2 the model has CA 0.71 (the LGA phase costs about
2 points against plain training's 0.73) and ASR 0.96; unlearning, traced step by step, takes the
share of isolated images still labelled from 1.0 to 0.19 (step 7), 0.012 (8), 0.004 (9) and 0 (10),
the live ASR along with it (0.28, 0.09, 0.02, 0.006), while CA stays at 0.71-0.70 and then falls
1-2 points a step (0.69 at 11, 0.65 at 13). Stopping at a share of 0.05 left ASR 0.13 on the full
test set (CA 0.70); at 0, ASR 0.002 and CA 0.69 (11 steps); at the default 0.01, ASR 0.04 and CA 0.70
(9 steps). The whole defense took 155 s on one busy CPU thread (the attack's own training: 100-150 s
there).

Extra cost over retraining: one forward pass over the training set (the isolation ranking), and a
few unlearning steps, each after classifying the isolated samples. The isolated set is reported
against the true poison set (precision, recall) and kept as the ``flagged_idx`` artefact.

Needs: the poisoned training set (the defender trains the model); no clean-data budget, no trigger."""
from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F

from ..data import augment
from ..device import amp_dtype as pick_amp
from ..errors import ConfigError
from ..metrics import accuracy, autocast_ctx
from ..schedules import Schedule, WarmupLinear
from ..train import Progress, Trainer, TrainResult, batch_indices
from .base import Defense, PoisonedTraining
from .spectral_signatures import NEEDS_POISONED, eval_batches, fresh_model, retrain_config, require_poisoned


def lga_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """ABL's local gradient ascent loss on a batch: ``sign(CE - gamma) * CE`` (CE the batch mean)."""
    ce = F.cross_entropy(logits.float(), y)
    return torch.sign(ce - gamma) * ce


def per_sample_loss(model, x_uint8: torch.Tensor, y: torch.Tensor, batch: int = 1024, stop=None,
                    amp: str = "auto") -> torch.Tensor | None:
    """Cross-entropy of every sample (eval mode, no augmentation, ``amp`` as in TrainConfig); None if
    ``stop`` was set meanwhile."""
    if len(y) == 0:
        return torch.empty(0, device=next(model.parameters()).device)

    def loss(m, xb, i):
        return F.cross_entropy(m(xb).float(), y[i:i + len(xb)].to(xb.device), reduction="none")

    return eval_batches(model, x_uint8, loss, batch, stop, amp)


class _Offset(Schedule):
    """``inner`` as seen from step ``start`` of a run of ``total`` steps (phase 2 continues phase 1's schedule)."""

    name = "offset"

    def __init__(self, inner: Schedule, start: int, total: int):
        self.inner, self.start, self.total = inner, start, total

    def lr(self, step, total):
        return self.inner.lr(step + self.start, self.total)


class _LiveOnly:
    """An evaluator that answers every request with the live (subset) figures: phase 2's Trainer
    ends with a full evaluation of a model that unlearning is about to change; the live one will do."""

    def __init__(self, evaluator):
        self.evaluator = evaluator

    def __call__(self, model, live: bool = False, **kw):
        return self.evaluator(model, live=True, **kw)


class _Clock:
    """Global step numbering, progress and history across the three phases."""

    def __init__(self, total: int, steps_per_epoch: int, callbacks, evaluator, amp):
        self.total, self.spe, self.evaluator, self.amp = total, steps_per_epoch, evaluator, amp
        self.callbacks = list(callbacks or [])
        self.t0 = time.perf_counter()
        self.seen = 0
        self.history: list[dict] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _progress(self, event, step, loss, lr, metrics=None) -> Progress:
        el = self.elapsed()
        m = metrics or {}
        return Progress(event, step, self.total, step / self.spe, loss, lr, el, self.seen / el if el > 0 else 0.0,
                        m.get("clean_acc"), m.get("asr"))

    def fire(self, event: str, prog: Progress) -> None:
        if prog.clean_acc is not None or prog.asr is not None:
            self.history.append({k: v for k, v in asdict(prog).items() if k != "event"})
        for ev, fn in self.callbacks:
            if ev == event:
                fn(prog)

    def batch(self, step, loss, lr) -> None:
        self.fire("on_batch", self._progress("batch", step, loss, lr))

    def evaluate(self, model, step, loss, lr, event="epoch") -> None:
        if self.evaluator is None:
            return
        metrics = self.evaluator(model, live=True, amp_dtype=self.amp, channels_last=True)
        self.fire("on_epoch_end", self._progress(event, step, loss, lr, metrics))

    def shifted(self, step0: int, seen0: int):
        """Callbacks for a Trainer run that starts at global step ``step0``: its Progress re-numbered."""
        def wrap(fn):
            def inner(p: Progress):
                el = time.perf_counter() - self.t0
                seen = seen0 + p.images_per_s * p.elapsed_s
                fn(replace(p, step=p.step + step0, total_steps=self.total, epoch=(p.step + step0) / self.spe,
                           elapsed_s=el, images_per_s=seen / el if el > 0 else 0.0))
            return inner
        return [(ev, wrap(fn)) for ev, fn in self.callbacks]


def _sgd_phase(model, x, y, n_steps, batch_size, lr_at, loss_fn, opt, gen, stop, clock: _Clock, step0: int,
               flip: bool, translate: int, amp, freeze_bn: bool = False, halt=None) -> tuple[int, float, str]:
    """A plain SGD loop (Trainer-like: on-device batches, augmentation, autocast, channels-last) with
    a custom loss. ``halt()``, if given, is asked before each step whether to end here; a non-finite
    loss ends the loop the same way (that step not taken). Returns (steps done, last loss, why it
    ended: "done", "stop", "halt" or "nonfinite")."""
    dev = next(model.parameters()).device
    n = len(y)
    bs = min(int(batch_size), n)

    def training_mode():
        model.train()
        if freeze_bn:
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

    training_mode()
    step, last, why = 0, float("nan"), "done"
    while step < n_steps and not stop.is_set() and why == "done":
        perm = torch.randperm(n, device=dev, generator=gen)
        for i in range(0, n, bs):
            if step >= n_steps or stop.is_set():
                break
            if halt is not None:
                if halt():
                    why = "halt"
                    break
                training_mode()
            idx = batch_indices(perm, i, bs)
            xb = x[idx]
            if flip or translate:
                xb = augment(xb, flip=flip, translate=translate, generator=gen)
            xb = xb.float().div_(255.0).contiguous(memory_format=torch.channels_last)
            lr = lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            with autocast_ctx(dev, amp):
                out = model(xb)
            loss = loss_fn(out, y[idx])
            if not torch.isfinite(loss.detach()):
                why = "nonfinite"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            clock.seen += len(idx)
            last = float(loss.detach())
            clock.batch(step0 + step, last, lr)
    model.eval()
    if stop.is_set() and step < n_steps and why == "done":
        why = "stop"
    return step, last, why


class ABL(Defense):
    name = "abl"
    uses_poisoned_data = True
    title = "ABL (anti-backdoor learning)"
    paper = ("Li et al. 2021, Anti-Backdoor Learning: Training Clean Models on Poisoned Data, NeurIPS "
             "(arXiv:2110.11571)")
    needs = NEEDS_POISONED
    defaults = {"isolation_share": 0.2, "gamma": 0.5, "isolation_rate": 0.01, "unlearn_epochs": 5.0,
                "unlearn_lr": 5e-4, "unlearn_batch_size": 64, "unlearn_stop_acc": 0.01}
    help = {"isolation_share": "share of the training budget spent isolating with the LGA loss (paper: 20 of 100)",
            "gamma": "LGA loss floor: below it the step turns to gradient ascent (paper: 0.5)",
            "isolation_rate": "share of the training set isolated, the lowest-loss samples (paper: 0.01)",
            "unlearn_epochs": "at most this many passes of gradient ascent over the isolated samples",
            "unlearn_lr": "learning rate of the unlearning phase (constant, paper: 5e-4)",
            "unlearn_batch_size": "images per unlearning step",
            "unlearn_stop_acc": ("end unlearning once at most this share of the isolated samples keeps its label "
                                 "(negative: never, run all unlearn_epochs)")}

    def validate(self):
        super().validate()
        p = self.params
        if not 0.0 < float(p["isolation_share"]) < 1.0:
            raise ConfigError(f"abl: isolation_share (the share of training spent isolating) must be strictly between "
                              f"0 and 1, got {p['isolation_share']}")
        if not (float(p["gamma"]) > 0 and math.isfinite(float(p["gamma"]))):
            raise ConfigError(f"abl: gamma (the LGA loss floor) must be a positive number, got {p['gamma']}")
        if not 0.0 < float(p["isolation_rate"]) < 1.0:
            raise ConfigError(f"abl: isolation_rate (the share of samples isolated) must be strictly between 0 and 1, "
                              f"got {p['isolation_rate']}")
        if not (float(p["unlearn_epochs"]) >= 0 and math.isfinite(float(p["unlearn_epochs"]))):
            raise ConfigError(f"abl: unlearn_epochs must be a number >= 0 (0 skips unlearning), "
                              f"got {p['unlearn_epochs']}")
        if not float(p["unlearn_lr"]) > 0:
            raise ConfigError(f"abl: unlearn_lr must be positive, got {p['unlearn_lr']}")
        if not float(p["unlearn_stop_acc"]) < 1.0:
            raise ConfigError("abl: unlearn_stop_acc must be below 1 (a share of the isolated samples; negative: "
                              f"never stop early), got {p['unlearn_stop_acc']}")
        if int(p["unlearn_batch_size"]) < 1:
            raise ConfigError(f"abl: unlearn_batch_size must be at least 1, got {p['unlearn_batch_size']}")

    def plan(self, n: int, epochs: float, batch_size: int) -> dict[str, int]:
        """Step counts of the three phases for ``n`` training samples and a budget of ``epochs``."""
        p = self.params
        bs = min(int(batch_size), n)
        main = max(2, math.ceil(epochs * math.ceil(n / bs)))
        s1 = min(main - 1, max(1, round(float(p["isolation_share"]) * main)))
        k = min(n - 1, max(1, round(float(p["isolation_rate"]) * n)))
        ubs = min(int(p["unlearn_batch_size"]), k)
        s3 = math.ceil(float(p["unlearn_epochs"]) * math.ceil(k / ubs))
        return {"isolation": s1, "training": main - s1, "unlearning": s3, "n_isolated": k, "main": main}

    def apply(self, model, x_clean, y_clean, evaluator=None, callbacks=None, stop=None, seed: int = 0,
              poisoned: PoisonedTraining | None = None, **train_over):
        poisoned = require_poisoned(self.name, poisoned)
        cfg = retrain_config(poisoned, seed, **train_over)
        p = self.params
        stop = stop or threading.Event()
        x, y = poisoned.x, poisoned.y
        n = len(y)
        if n < 2:
            raise ConfigError("abl needs at least 2 training samples")
        plan = self.plan(n, cfg.epochs, cfg.batch_size)
        spe = math.ceil(n / min(int(cfg.batch_size), n))
        rest_n = n - plan["n_isolated"]
        spe_rest = math.ceil(rest_n / min(int(cfg.batch_size), rest_n))
        total = plan["main"] + plan["unlearning"]
        new = fresh_model(poisoned, seed)
        dev = next(new.parameters()).device
        amp = pick_amp(dev, cfg.amp)
        new.to(memory_format=torch.channels_last)
        clock = _Clock(total, spe, callbacks, evaluator, amp)
        gen = torch.Generator(device=dev).manual_seed(int(seed) + 7)
        sched = WarmupLinear(peak=cfg.lr, warmup=cfg.warmup)
        final_extra: dict = {}
        flagged = torch.empty(0, dtype=torch.long)
        steps = 0

        # phase 1: isolation with the LGA loss
        opt = torch.optim.SGD(new.parameters(), lr=sched.lr(0, plan["main"]), momentum=cfg.momentum,
                              nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
        gamma = float(p["gamma"])
        s1, last, _ = _sgd_phase(new, x, y, plan["isolation"], cfg.batch_size, lambda s: sched.lr(s, plan["main"]),
                              lambda out, yb: lga_loss(out, yb, gamma), opt, gen, stop, clock, 0,
                              cfg.flip, cfg.translate, amp)
        steps += s1
        clock.evaluate(new, steps, last, sched.lr(max(0, s1 - 1), plan["main"]), event="isolation")
        t_iso = clock.elapsed()
        losses = per_sample_loss(new, x, y, stop=stop, amp=cfg.amp) if not stop.is_set() else None
        if losses is not None:
            flagged = torch.argsort(losses, stable=True)[:plan["n_isolated"]].cpu().sort().values
            final_extra.update(poisoned.detection_scores(flagged))
            final_extra["isolation_loss_max"] = max(0.0, float(losses[flagged.to(losses.device)].max()))
        final_extra["isolation_s"] = clock.elapsed()
        final_extra["isolation_train_s"] = t_iso

        # phase 2: normal training on the rest, the schedule continuing from phase 1
        if not stop.is_set():
            keep = torch.ones(n, dtype=torch.bool, device=y.device)
            keep[flagged.to(y.device)] = False
            idx = keep.nonzero().squeeze(1)
            cfg2 = replace(cfg, epochs=plan["training"] / spe_rest, eval_at_start=False)
            tr = Trainer(new, x[idx], y[idx], cfg2, schedule=_Offset(sched, plan["isolation"], plan["main"]),
                         evaluator=_LiveOnly(evaluator) if evaluator is not None else None, stop=stop)
            for ev, fn in clock.shifted(steps, clock.seen):
                tr.add_callback(ev, fn)
            r2 = tr.run()
            for row in r2.history:
                row = dict(row)
                row["step"] += steps
                row["total_steps"], row["epoch"] = total, row["step"] / spe
                clock.history.append(row)
            clock.seen += round(r2.images_per_s * r2.seconds)
            steps += r2.steps
            final_extra["training_s"] = r2.seconds

        # phase 3: gradient ascent on the isolated samples
        if not stop.is_set() and plan["unlearning"] > 0:
            t3 = time.perf_counter()
            fi = flagged.to(y.device)
            ulr = float(p["unlearn_lr"])
            opt3 = torch.optim.SGD(new.parameters(), lr=ulr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            stop_acc = float(p["unlearn_stop_acc"])
            seen_acc = []
            g = torch.Generator().manual_seed(int(seed) + 11)
            check = fi[torch.randperm(len(fi), generator=g)[:1024].to(fi.device)]

            def halt():  # the isolated samples no longer get their (target) label: the backdoor is gone
                acc = accuracy(new, x[check], y[check], amp_dtype=amp)
                seen_acc.append(acc)
                return acc <= stop_acc

            s3, last, why = _sgd_phase(new, x[fi], y[fi], plan["unlearning"], int(p["unlearn_batch_size"]),
                                       lambda s: ulr, lambda out, yb: -F.cross_entropy(out.float(), yb), opt3, gen,
                                       stop, clock, steps, cfg.flip, cfg.translate, amp, freeze_bn=True,
                                       halt=halt if stop_acc >= 0 else None)
            steps += s3
            final_extra.update({"unlearn_steps": s3, "unlearn_end": why, "unlearning_s": time.perf_counter() - t3})
            if s3:
                final_extra["unlearn_loss"] = -last  # the isolated samples' cross-entropy at the last step
            if seen_acc:
                final_extra["unlearn_isolated_acc"] = seen_acc[-1]  # share of the isolated still labelled at the end
            if why in ("halt", "nonfinite"):  # done early by design: the run is complete
                total = clock.total = steps
            clock.evaluate(new, steps, last, ulr, event="unlearning" if why != "stop" else "stop")

        new.eval()
        if steps:  # what was reached replaces the poisoned model (stopped before any step: left as it was)
            model.load_state_dict(new.state_dict())
        model.eval()
        res = TrainResult(history=clock.history, steps=steps, total_steps=total, stopped=steps < total)
        res.seconds = clock.elapsed()
        res.images_per_s = clock.seen / res.seconds if res.seconds > 0 else 0.0
        final = (evaluator(model, amp_dtype=amp, channels_last=True) if evaluator is not None
                 else {"clean_acc": None, "asr": None})
        res.final = {**final, **final_extra, "n_isolated": int(len(flagged))}
        res.artefacts["flagged_idx"] = flagged.to(torch.long)
        return res
