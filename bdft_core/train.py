"""One training loop for attack training and for fine-tuning defenses.

Data stays on the training device as uint8 tensors; each step gathers a batch by index, augments
it there (flip + translate), and runs the model under autocast (bf16 on CUDA and on CPUs with
native bf16) in channels-last layout. No DataLoader, no per-image work.

The UI seam is callbacks (as in minGPT): ``trainer.add_callback("on_step", fn)`` and
``"on_epoch_end"`` (with CA/ASR), and ``"on_batch"`` (after every step, no evaluation: for progress
bars); each receives a :class:`Progress`. ``trainer.request_stop()`` (or setting the
``stop`` event passed in) ends training after the current step; what was reached is kept."""
from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .data import augment
from .device import amp_dtype as pick_amp
from .errors import ConfigError
from .metrics import Evaluator, _live_size, autocast_ctx
from .schedules import Schedule, WarmupLinear


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (units in comments)."""

    epochs: float = 10.0  # passes over the training data; fractions allowed
    batch_size: int = 512  # images per step
    lr: float = 0.4  # peak learning rate of the default schedule (SGD)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # L2 on all trainable weights, per step
    label_smoothing: float = 0.2
    warmup: float = 0.2  # share of steps spent warming up (default schedule)
    flip: bool = True  # random horizontal flips
    translate: int = 2  # random shifts, pixels
    eval_every: int = 0  # steps between live evaluations for on_step (0: only at epoch ends)
    # test images of each set per live evaluation (None: the evaluator's own, 2000 unless built otherwise;
    # final metrics always use the whole test sets)
    live_samples: int | None = None
    eval_at_start: bool = False  # also evaluate before the first step (defenses start from the attack's figures)
    amp: str = "auto"  # "auto" (bf16 where fast), "bf16", "off"
    channels_last: bool = True
    seed: int = 0
    sam_rho: float = 0.0  # sharpness-aware minimisation radius (0: plain SGD); FT-SAM uses it
    # epochs the model's whitening bias trains (fastnet's input layer, fixed afterwards as in airbench;
    # the backward pass then skips the first block's input gradient, ~1.3x faster steps). None:
    # throughout (the default everywhere: fixed during SFT, a BadNets model kept up to 10.7% ASR over
    # four seeds against at most 5.7% with the bias trained; README, "What we tried")
    whiten_bias_epochs: float | None = None

    def validate(self) -> "TrainConfig":
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"epochs must be a positive number, got {self.epochs}")
        if int(self.batch_size) < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.translate < 0:
            raise ConfigError(f"translate must be >= 0 pixels, got {self.translate}")
        if not self.sam_rho >= 0:
            raise ConfigError(f"sam_rho must be >= 0, got {self.sam_rho}")
        if self.live_samples is not None:
            _live_size(self.live_samples)
        if self.whiten_bias_epochs is not None and not self.whiten_bias_epochs >= 0:
            raise ConfigError(f"whiten_bias_epochs must be >= 0 (or None: throughout), got {self.whiten_bias_epochs}")
        return self


@dataclass
class Progress:
    """What a callback receives. ``clean_acc``/``asr`` are None when no evaluation ran at this point."""

    event: str
    step: int
    total_steps: int
    epoch: float
    loss: float
    lr: float
    elapsed_s: float
    images_per_s: float
    clean_acc: float | None = None
    asr: float | None = None

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.total_steps)

    @property
    def eta_s(self) -> float:
        return self.elapsed_s / self.fraction * (1 - self.fraction) if self.step else float("nan")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one row per evaluation
    steps: int = 0
    total_steps: int = 0
    stopped: bool = False
    seconds: float = 0.0
    images_per_s: float = 0.0
    final: dict = field(default_factory=dict)  # clean_acc, asr on the whole test sets
    # tensors a defense wants kept with its run (a reversed trigger, flagged sample indices);
    # saved next to the weights as artefacts.safetensors
    artefacts: dict = field(default_factory=dict)


def batch_indices(perm: torch.Tensor, i: int, bs: int) -> torch.Tensor:
    """The batch starting at ``i`` of a shuffled epoch, ``perm[i:i + bs]``, except that a last batch
    of a single image also takes its neighbour in ``perm``: BatchNorm in train mode cannot normalise
    one image whose maps have shrunk to 1x1 (fastnet on 8x8 digits, with 129 clean images in batches
    of 64), and one image gives noisy batch statistics anyway. Steps per epoch stay ``ceil(n / bs)``."""
    if bs > 1 and i > 0 and len(perm) - i == 1:
        i -= 1
    return perm[i:i + bs]


class Trainer:
    def __init__(self, model, x: torch.Tensor, y: torch.Tensor, config: TrainConfig | None = None,
                 schedule: Schedule | None = None, evaluator: Evaluator | None = None,
                 params: list[torch.nn.Parameter] | None = None, stop: threading.Event | None = None,
                 freeze_bn: bool = False, extra_loss: Callable | None = None):
        self.cfg = (config or TrainConfig()).validate()
        if len(y) == 0:
            raise ConfigError("no training images")
        self.model, self.x, self.y = model, x, y
        self.device = next(model.parameters()).device
        self.schedule = schedule or WarmupLinear(peak=self.cfg.lr, warmup=self.cfg.warmup)
        self.evaluator = evaluator
        self.params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        self.stop = stop or threading.Event()
        self.callbacks: dict[str, list[Callable[[Progress], None]]] = defaultdict(list)
        self.amp = pick_amp(self.device, self.cfg.amp)
        self.freeze_bn = freeze_bn  # keep BatchNorm statistics fixed (when only the head trains)
        # extra_loss(model, step, generator) -> scalar added to the cross-entropy (e.g. the latent
        # backdoor's feature-matching term); runs under the same autocast as the main forward pass
        self.extra_loss = extra_loss

    def add_callback(self, event: str, fn: Callable[[Progress], None]) -> None:
        if event not in ("on_step", "on_epoch_end", "on_batch"):
            raise ConfigError(f"unknown callback event {event!r}: use 'on_step', 'on_epoch_end' or 'on_batch'")
        self.callbacks[event].append(fn)

    def request_stop(self) -> None:
        self.stop.set()

    def _fire(self, event: str, prog: Progress) -> None:
        for fn in self.callbacks[event]:
            fn(prog)

    def _evaluate(self, live: bool) -> dict:
        if self.evaluator is None:
            return {"clean_acc": None, "asr": None}
        kw = {"live_samples": self.cfg.live_samples} if live and self.cfg.live_samples is not None else {}
        return self.evaluator(self.model, live=live, amp_dtype=self.amp, channels_last=self.cfg.channels_last, **kw)

    def _sam_second_pass(self, model, xb, yb, cfg) -> None:
        """Foret et al. 2021 (ICLR), "Sharpness-Aware Minimization": perturb the weights by
        ``rho * g / ||g||``, recompute the gradient there, and restore the weights; the optimiser then
        steps with that gradient."""
        params = [p for p in self.params if p.grad is not None]
        norm = torch.norm(torch.stack([p.grad.norm() for p in params])) + 1e-12
        eps = []
        with torch.no_grad():
            for p in params:
                e = p.grad * (cfg.sam_rho / norm)
                p.add_(e)
                eps.append(e)
        for p in params:
            p.grad = None
        with autocast_ctx(self.device, self.amp):
            out = model(xb)
        F.cross_entropy(out.float(), yb, label_smoothing=cfg.label_smoothing).backward()
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.sub_(e)

    def run(self) -> TrainResult:
        # Parameters this run does not train leave autograd for its duration (restored afterwards), so
        # the backward pass stops where the trained ones end: the head alone, for "last layer only".
        chosen = {id(p) for p in self.params}
        off = [p for p in self.model.parameters() if p.requires_grad and id(p) not in chosen]
        for p in off:
            p.requires_grad_(False)
        try:
            return self._run(off)
        finally:
            for p in off:
                p.requires_grad_(True)

    def _run(self, off: list) -> TrainResult:
        cfg, model = self.cfg, self.model
        n = len(self.y)
        bs = min(int(cfg.batch_size), n)
        steps_per_epoch = math.ceil(n / bs)
        total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(self.params, lr=self.schedule.lr(0, total), momentum=cfg.momentum,
                              nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        res = TrainResult(total_steps=total)
        whiten = [p for p in getattr(model, "whitening_parameters", list)() if p.requires_grad]
        whiten_until = (total if cfg.whiten_bias_epochs is None or not whiten
                        else min(total, math.ceil(cfg.whiten_bias_epochs * steps_per_epoch)))
        t0 = time.perf_counter()
        seen = 0
        loss_sum, loss_n = torch.zeros((), device=self.device), 0

        last_point = [-1]  # the step of the last curve point, so a stop there does not add it twice

        def progress(event, step, metrics):
            el = time.perf_counter() - t0
            nonlocal loss_sum, loss_n
            last_point[0] = step
            loss = (loss_sum / max(1, loss_n)).item() if loss_n else float("nan")
            row = Progress(event, step, total, step / steps_per_epoch, loss, opt.param_groups[0]["lr"], el,
                           seen / el if el > 0 else 0.0, metrics.get("clean_acc"), metrics.get("asr"))
            if metrics.get("clean_acc") is not None or metrics.get("asr") is not None:
                res.history.append({k: v for k, v in asdict(row).items() if k not in ("event",)})
            return row

        if cfg.eval_at_start and self.evaluator is not None:
            self._fire("on_step", progress("start", 0, self._evaluate(live=True)))
        model.train()
        if self.freeze_bn:
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        step = 0
        while step < total and not self.stop.is_set():
            perm = torch.randperm(n, device=self.device, generator=gen)
            for i in range(0, n, bs):
                if step >= total or self.stop.is_set():
                    break
                if step == whiten_until:  # from here on the whitening bias is fixed (restored after the run)
                    for p in whiten:
                        p.requires_grad_(False)
                    off.extend(whiten)
                idx = batch_indices(perm, i, bs)
                xb = self.x[idx]
                if cfg.flip or cfg.translate:
                    xb = augment(xb, flip=cfg.flip, translate=cfg.translate, generator=gen)
                xb = xb.float().div_(255.0)
                if cfg.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                for g in opt.param_groups:
                    g["lr"] = self.schedule.lr(step, total)
                with autocast_ctx(self.device, self.amp):
                    out = model(xb)
                loss = F.cross_entropy(out.float(), self.y[idx], label_smoothing=cfg.label_smoothing)
                if self.extra_loss is not None:
                    with autocast_ctx(self.device, self.amp):
                        loss = loss + self.extra_loss(model, step, gen).float()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.sam_rho > 0:  # SAM: step to the worst nearby weights, take the gradient there
                    self._sam_second_pass(model, xb, self.y[idx], cfg)
                opt.step()
                step += 1
                seen += len(idx)
                loss_sum += loss.detach()
                loss_n += 1
                epoch_end = step % steps_per_epoch == 0 or step == total
                if self.callbacks["on_batch"]:  # cheap progress (no evaluation) for progress bars
                    el = time.perf_counter() - t0
                    self._fire("on_batch", Progress("batch", step, total, step / steps_per_epoch,
                                                    float(loss.detach()), opt.param_groups[0]["lr"], el,
                                                    seen / el if el > 0 else 0.0))
                if cfg.eval_every and step % cfg.eval_every == 0 and not epoch_end:
                    self._fire("on_step", progress("step", step, self._evaluate(live=True)))
                    loss_sum.zero_()
                    loss_n = 0
                if epoch_end:
                    if step == total:  # the final, full evaluation also gives this last live point
                        self._evaluate(live=False)
                    self._fire("on_epoch_end", progress("epoch", step, self._evaluate(live=True)))
                    loss_sum.zero_()
                    loss_n = 0
        res.steps = step
        res.stopped = step < total
        if res.stopped and step % steps_per_epoch != 0 and last_point[0] != step:  # a last point where we stopped
            self._fire("on_epoch_end", progress("stop", step, self._evaluate(live=True)))
        res.seconds = time.perf_counter() - t0
        res.images_per_s = seen / res.seconds if res.seconds > 0 else 0.0
        res.final = self._evaluate(live=False)
        model.eval()
        return res
