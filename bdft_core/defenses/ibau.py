"""I-BAU (implicit backdoor adversarial unlearning): a minimax problem on clean data. The inner
problem finds one *universal* perturbation that, added to every clean image, raises the loss the
most (a backdoor trigger is such a perturbation); the outer problem trains the model to classify
the perturbed images correctly. The gradient of the outer loss takes into account that the inner
solution moves with the weights (an implicit hypergradient).

Zeng, Chen, Park, Mao, Jin and Jia, "Adversarial Unlearning of Backdoors via Implicit Hypergradient",
ICLR 2022 (arXiv:2110.03735).

What is implemented, precisely (images in [0, 1]; ``L(theta, delta)`` = mean cross-entropy of the
model on ``clip(x + delta, 0, 1)`` over a batch of clean images with their true labels):

1. ``rounds`` rounds. Each starts from ``delta = 0`` and solves the inner problem
   ``max_{||delta|| <= radius} L`` approximately by ``inner_steps`` steps of projected gradient ascent,
   each on a fresh clean batch (so ``delta`` is universal), model in eval mode. L2 ball (default):
   step ``inner_lr * radius * g / ||g||_2``; Linf ball: step ``inner_lr * radius * sign(g)``.
2. Then ``outer_steps`` Adam steps on the model (constant ``lr``), each on a fresh clean batch, with
   the round's ``delta`` held fixed; BatchNorm layers keep their running statistics (every image
   carries the same ``delta``: batch statistics would drag the running ones towards the perturbed
   data). The outer loss is the cross-entropy of the batch with its true labels where a ``share`` of
   the images carries ``delta`` and the rest is clean. ``share = 1`` is the paper's objective
   ``L(theta, delta*)``; on the demo model it cost 15-25 points of clean accuracy (the model learns
   to resist a generic universal perturbation of that size), ``share = 0.5`` 1-3 points, for the
   same ASR. Adam rather than SGD: the first perturbed losses are large (~30 nats) and SGD steps
   on them diverged.
3. Hypergradient. ``delta*`` is treated as a fixed point of the projected-ascent map
   ``F(delta, theta) = P(delta + hyper_eta * grad_delta L(theta, delta))`` (P the projection on the
   ball, differentiated by autograd). By the implicit function theorem
   ``d delta*/d theta = (I - dF/d delta)^-1 dF/d theta``, so the gradient of the outer loss is
   ``grad_theta L + (dF/d theta)^T (I - dF/d delta)^-T grad_delta L``. The inverse is approximated by
   the first ``hyper_k`` terms of its Neumann series, ``sum_{j<k} (dF/d delta^T)^j grad_delta L``
   (a K-step fixed-point iteration; conjugate gradient, the other usual way to approximate this
   inverse, is not implemented). Each term costs one Hessian-vector product in ``delta`` (double
   backward); ``hyper_k = 0`` drops the implicit term (plain alternating adversarial training),
   ``hyper_k = 1`` keeps only its first term (no Hessian-vector product). The inner objective in ``F``
   is the cross-entropy of the batch's perturbed images.
   Simplifications: the inverse is truncated, not converged (the series need not converge: the
   inner problem is not concave, ``dF/ddelta`` can have eigenvalues above 1); ``F`` is evaluated on
   the outer step's batch while ``delta*`` was found on other batches; the inner solve is itself
   inexact (a few ascent steps).

Defaults (CIFAR-10 fastnet demo model, the defender's 20% clean split of 10,000 images, 2-core CPU):
3 rounds of 10 ascent + 25 model steps (2,400 perturbed images in all); an L2 radius
of 3, which can hold a small patch trigger at full contrast (a 3x3 white patch on a mid-grey image
has L2 norm ~2.6): 10 ascent steps find a perturbation that sends every clean image to the BadNets
target. Measured on the demo model (CA 72.9%, ASR 96.8%): CA 70-71%, ASR 10-12% with
``hyper_k`` 0, 1 or 2 (the implicit term made no measurable difference there); ``hyper_k = 5`` (or
``hyper_eta = 1``) slowed the unlearning (ASR 62% / 24%), as the truncated series grows. The default
``hyper_k = 2`` costs about 2.5 times ``hyper_k = 0`` per model step.

Needs: a clean labelled fraction of the training distribution (the clean-data budget); no access
to the poisoned training set or to the trigger."""
from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from ..data import augment
from ..device import amp_dtype as pick_amp
from ..errors import ConfigError
from ..metrics import autocast_ctx
from ..schedules import Constant
from ..train import Progress, TrainConfig, TrainResult
from .base import Defense


def project(delta: torch.Tensor, norm: str, radius: float) -> torch.Tensor:
    """``delta`` projected on the ball ``||delta|| <= radius`` (differentiable)."""
    if norm == "linf":
        return delta.clamp(-radius, radius)
    n = delta.flatten().norm(p=2)
    return delta * torch.clamp(radius / (n + 1e-12), max=1.0)


def perturbed_loss(model, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, amp=None) -> torch.Tensor:
    """Mean cross-entropy of ``model`` on ``clip(x + delta, 0, 1)`` (x float in [0, 1])."""
    dev = x.device
    with autocast_ctx(dev, amp):
        out = model((x + delta).clamp(0.0, 1.0))
    return F.cross_entropy(out.float(), y)


def ascent_step(model, x, y, delta: torch.Tensor, norm: str, radius: float, step: float, amp=None) -> torch.Tensor:
    """One projected gradient-ascent step of the universal perturbation ``delta`` (shape (C, H, W))
    on the batch ``(x, y)``; returns the new ``delta`` (detached, inside the ball)."""
    d = delta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(perturbed_loss(model, x, y, d, amp), d)
    with torch.no_grad():
        if norm == "linf":
            d = d + step * radius * g.sign()
        else:
            d = d + step * radius * g / (g.flatten().norm(p=2) + 1e-12)
        return project(d, norm, radius)


def hypergradient(model, params: list[torch.nn.Parameter], x, y, delta: torch.Tensor, norm: str, radius: float,
                  eta: float, k: int, amp=None, share: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The outer loss at ``delta`` and its implicit hypergradient for ``params`` (see the module
    docstring): ``grad_theta L_out + (dF/dtheta)^T sum_{j<k} (dF/ddelta^T)^j grad_delta L_out``.
    The first ``round(share * len(x))`` images (at least one) carry ``delta`` in the outer loss, the
    rest are clean; the fixed-point map ``F`` uses the perturbed ones."""
    n_p = min(len(x), max(1, round(share * len(x))))
    d = delta.detach().clone().requires_grad_(True)
    xin = (x[:n_p] + d).clamp(0.0, 1.0)
    if n_p < len(x):
        xin = torch.cat([xin, x[n_p:]])
    with autocast_ctx(x.device, amp):
        out = model(xin).float()
    loss = F.cross_entropy(out, y)
    if k <= 0:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss.detach(), [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]
    g_out = torch.autograd.grad(loss, [d] + params, retain_graph=True, allow_unused=True)
    g_d, g_th = g_out[0], g_out[1:]
    inner = loss if n_p == len(x) else F.cross_entropy(out[:n_p], y[:n_p])  # the inner objective
    (g_in,) = torch.autograd.grad(inner, d, create_graph=True)
    f = project(d + eta * g_in, norm, radius)  # the fixed-point map F(delta, theta)
    v = g_d.detach() if g_d is not None else torch.zeros_like(d)
    acc = v.clone()
    for _ in range(k - 1):  # v <- (dF/ddelta)^T v, accumulated: the truncated Neumann series
        (v,) = torch.autograd.grad(f, d, grad_outputs=v, retain_graph=True)
        acc = acc + v
    indirect = torch.autograd.grad(f, params, grad_outputs=acc, allow_unused=True)
    grads = []
    for p, gt, gi in zip(params, g_th, indirect):
        g = torch.zeros_like(p) if gt is None else gt.detach()
        if gi is not None:
            g = g + gi.detach()
        grads.append(g)
    return loss.detach(), grads


class IBAU(Defense):
    name = "i_bau"
    title = "I-BAU (implicit backdoor adversarial unlearning)"
    paper = "Zeng et al. 2022, Adversarial Unlearning of Backdoors via Implicit Hypergradient, ICLR (arXiv:2110.03735)"
    needs = "clean labelled data (the clean-data budget); no poisoned data, no trigger"
    defaults = {"rounds": 3, "inner_steps": 10, "outer_steps": 25, "norm": "l2", "radius": 3.0, "inner_lr": 0.25,
                "hyper_k": 2, "hyper_eta": 0.1, "share": 0.5, "lr": 1e-4, "batch_size": 64}
    help = {"rounds": "rounds of (find the universal perturbation, then unlearn it)",
            "inner_steps": "projected gradient-ascent steps (one clean batch each) finding the perturbation per round",
            "outer_steps": "model update steps (one clean batch each) per round",
            "norm": "ball of the universal perturbation: 'l2' or 'linf' (pixel units, images in [0, 1])",
            "radius": "radius of that ball (l2: e.g. 3; linf: e.g. 0.1)",
            "inner_lr": "ascent step as a share of the radius",
            "hyper_k": "Neumann-series terms of the implicit hypergradient (0: no implicit term)",
            "hyper_eta": "step size of the fixed-point map differentiated for the hypergradient",
            "share": "share of each outer batch that carries the perturbation (the rest stays clean)",
            "lr": "model learning rate (Adam, constant)", "batch_size": "images per step"}

    def validate(self):
        super().validate()
        p = self.params
        for key in ("rounds", "inner_steps", "outer_steps"):
            if int(p[key]) < 1 or float(p[key]) != int(p[key]):
                raise ConfigError(f"i_bau: {key} must be a whole number >= 1, got {p[key]}")
        if str(p["norm"]).lower() not in ("l2", "linf"):
            raise ConfigError(f"i_bau: norm must be 'l2' or 'linf', got {p['norm']!r}")
        if not (float(p["radius"]) > 0 and math.isfinite(float(p["radius"]))):
            raise ConfigError(f"i_bau: radius must be a positive number, got {p['radius']}")
        if str(p["norm"]).lower() == "linf" and float(p["radius"]) > 1:
            raise ConfigError(f"i_bau: an linf radius above 1 allows any image (pixels are in [0, 1]), "
                              f"got {p['radius']}")
        if not float(p["inner_lr"]) > 0:
            raise ConfigError(f"i_bau: inner_lr must be positive, got {p['inner_lr']}")
        if int(p["hyper_k"]) < 0 or float(p["hyper_k"]) != int(p["hyper_k"]):
            raise ConfigError(f"i_bau: hyper_k must be a whole number >= 0, got {p['hyper_k']}")
        if not 0.0 < float(p["share"]) <= 1.0:
            raise ConfigError(f"i_bau: share must be in (0, 1], got {p['share']}")
        if not (float(p["hyper_eta"]) > 0 and math.isfinite(float(p["hyper_eta"]))):
            raise ConfigError(f"i_bau: hyper_eta must be a positive number, got {p['hyper_eta']}")

    def total_steps(self, n_clean: int) -> int:
        p = self.params
        return int(p["rounds"]) * (int(p["inner_steps"]) + int(p["outer_steps"]))

    def has_schedule(self) -> bool:
        return False

    def apply(self, model, x_clean, y_clean, evaluator=None, callbacks=None, stop=None, seed: int = 0, **train_over):
        t0 = time.perf_counter()
        p = self.params
        n = len(y_clean)
        if n == 0:
            raise ConfigError("i_bau needs clean images (the clean-data budget is empty)")
        callbacks = list(callbacks or [])
        cfg = TrainConfig(**{"epochs": 1.0, "batch_size": int(p["batch_size"]), "lr": float(p["lr"]),
                             "flip": True, "translate": 0, "seed": seed, **train_over}).validate()
        dev = next(model.parameters()).device
        amp = pick_amp(dev, cfg.amp)
        ev_kw = {"amp_dtype": amp, "channels_last": cfg.channels_last}
        rounds, n_in, n_out = int(p["rounds"]), int(p["inner_steps"]), int(p["outer_steps"])
        norm, radius, k, eta = str(p["norm"]).lower(), float(p["radius"]), int(p["hyper_k"]), float(p["hyper_eta"])
        total = rounds * (n_in + n_out)
        bs = min(int(p["batch_size"]), n)
        res = TrainResult(total_steps=total)
        sched = Constant(float(p["lr"]))
        seen, step, last_loss = 0, 0, float("nan")
        stopped = lambda: stop is not None and stop.is_set()  # noqa: E731

        def fire(event, prog):
            for ev, fn in callbacks:
                if ev == event:
                    fn(prog)

        def point(event, metrics):
            el = time.perf_counter() - t0
            prog = Progress(event, step, total, step / total * rounds, last_loss, float(p["lr"]), el,
                            seen / el if el > 0 else 0.0, metrics.get("clean_acc"), metrics.get("asr"))
            if metrics.get("clean_acc") is not None or metrics.get("asr") is not None:
                res.history.append({k_: v for k_, v in dataclasses.asdict(prog).items() if k_ != "event"})
            return prog

        def batches(gen):  # endless shuffled clean batches, augmented, as float in [0, 1]
            while True:
                perm = torch.randperm(n, device=dev, generator=gen)
                for i in range(0, n - bs + 1, bs):
                    idx = perm[i:i + bs]
                    xb = x_clean[idx]
                    if cfg.flip or cfg.translate:
                        xb = augment(xb, flip=cfg.flip, translate=cfg.translate, generator=gen)
                    xb = xb.float().div_(255.0)
                    if cfg.channels_last:
                        xb = xb.contiguous(memory_format=torch.channels_last)
                    yield xb, y_clean[idx]

        def tick(loss, nb):
            nonlocal step, seen, last_loss
            step += 1
            seen += nb
            last_loss = loss
            if any(ev == "on_batch" for ev, _ in callbacks):
                el = time.perf_counter() - t0
                fire("on_batch", Progress("batch", step, total, step / total * rounds, loss, float(p["lr"]), el,
                                          seen / el if el > 0 else 0.0))

        if evaluator is not None:
            fire("on_step", point("start", evaluator(model, live=True, **ev_kw)))
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.Adam(params, lr=sched.lr(0, total))
        gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        data = batches(gen)
        delta = torch.zeros(x_clean.shape[1:], device=dev)
        deltas, inner_gain = [], []
        for r in range(rounds):
            if stopped():
                break
            # inner: the universal perturbation that hurts the current model most
            model.eval()
            delta = torch.zeros(x_clean.shape[1:], device=dev)
            first = None
            for _ in range(n_in):
                if stopped():
                    break
                xb, yb = next(data)
                if first is None:
                    with torch.no_grad():
                        first = (xb, yb, float(perturbed_loss(model, xb, yb, delta, amp)))
                delta = ascent_step(model, xb, yb, delta, norm, radius, float(p["inner_lr"]), amp)
                with torch.no_grad():
                    tick(float(perturbed_loss(model, xb, yb, delta, amp)), len(yb))
            if first is not None:
                with torch.no_grad():
                    inner_gain.append(float(perturbed_loss(model, first[0], first[1], delta, amp)) - first[2])
            deltas.append(delta.detach().cpu())
            # outer: unlearn it, with the implicit hypergradient; BatchNorm statistics stay frozen
            # (every image of a batch carries the same delta: batch statistics would shift the
            # running ones towards the perturbed data and cost clean accuracy)
            model.train()
            for mod in model.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    mod.eval()
            for _ in range(n_out):
                if stopped():
                    break
                xb, yb = next(data)
                loss, grads = hypergradient(model, params, xb, yb, delta, norm, radius, eta, k, amp, float(p["share"]))
                if torch.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads):
                    for q, g in zip(params, grads):
                        q.grad = g
                    opt.step()  # (a non-finite hypergradient skips the step)
                    opt.zero_grad(set_to_none=True)
                tick(float(loss), len(yb))
            model.eval()
            if evaluator is not None:
                last = r == rounds - 1 and not stopped()
                if last:
                    evaluator(model, **ev_kw)  # the final, full evaluation also gives this last live point
                fire("on_epoch_end", point("epoch" if not stopped() else "stop", evaluator(model, live=True, **ev_kw)))
        model.eval()
        res.steps = step
        res.stopped = step < total
        res.final = evaluator(model, **ev_kw) if evaluator is not None else {"clean_acc": None, "asr": None}
        if deltas:
            size = deltas[-1].flatten().norm(p=2 if norm == "l2" else float("inf"))
            res.final = {**res.final, "delta_norm": float(size),
                         "inner_loss_gain": inner_gain[-1] if inner_gain else float("nan")}
            res.artefacts = {"universal_perturbation": torch.stack(deltas)}
        res.seconds = time.perf_counter() - t0
        res.images_per_s = seen / res.seconds if res.seconds > 0 else 0.0
        return res
