"""Adversarial examples: the share of correctly classified test images that a small L-infinity
perturbation turns into a mistake (untargeted, white box). Two axes:

- ``fgsm``: one step of size eps along the sign of the loss gradient. Goodfellow, Shlens and
  Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015 (arXiv:1412.6572).
- ``pgd``: projected gradient descent, a random start in the eps-ball then ``steps`` signed-gradient
  steps of ``step_size``, each projected back onto the ball and the [0, 1] image range. Madry et
  al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018 (arXiv:1706.06083).

Defaults: eps 8/255, 10 steps of 2/255 (the CIFAR-10 standard), on the first ``n`` = 500 test
images (those the model gets right are attacked; 500 keeps the ten PGD passes to seconds on a CPU).
Perturbations are in pixel space (models normalise inside) and stay float (not re-quantised to
uint8). Gradients are taken under the context's autocast (bf16 where fast: only their sign is
used); the success check runs in float32. Headline: success rate = flipped / attacked.

Needs: the weights (gradients; white box) and a few labelled test images."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..metrics import autocast_ctx
from .base import Axis, model_device


def _input_grad(model, x: torch.Tensor, y: torch.Tensor, amp) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with autocast_ctx(x.device, amp):
        out = model(x)
    loss = F.cross_entropy(out.float(), y)
    (g,) = torch.autograd.grad(loss, x)
    return g


def fgsm(model, x: torch.Tensor, y: torch.Tensor, eps: float, amp=None) -> torch.Tensor:
    """One signed-gradient step of size ``eps`` (float images in [0, 1]), clipped to [0, 1]."""
    return (x + eps * _input_grad(model, x, y, amp).sign()).clamp_(0, 1).detach()


def pgd(model, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int, random_start: bool = True,
        generator: torch.Generator | None = None, amp=None, stop=None) -> torch.Tensor:
    """L-infinity PGD (Madry et al.): maximise the cross-entropy within ||delta||_inf <= eps."""
    if random_start:
        noise = torch.rand(x.shape, generator=generator).to(x.device) * 2 - 1
        adv = (x + eps * noise).clamp(0, 1)
    else:
        adv = x.clone()
    for _ in range(int(steps)):
        if stop is not None and stop.is_set():
            break
        adv = adv + step_size * _input_grad(model, adv, y, amp).sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp_(0, 1).detach()
    return adv


class _AdversarialAxis(Axis):
    range = (0.0, 1.0)
    unit = "success rate"

    def validate(self):
        self._positive_int("n", "batch_size")
        self._positive("eps")
        if float(self.params["eps"]) > 1:
            raise ConfigError(f"{self.name}: eps is in [0, 1] pixel units (8/255 = 0.0314), got {self.params['eps']}")

    def perturb(self, model, x, y, ctx, g, stop) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, model, ctx, stop=None, progress=None):
        p = self.params
        n = min(int(p["n"]), len(ctx.y_test))
        lp = ctx.log_probs(model, "test", n)
        y_all = ctx.y_test[:n]
        right = torch.nonzero(lp.argmax(1).cpu() == y_all.cpu()).squeeze(1)
        dev = model_device(model)
        g = ctx.generator(self.name)
        flipped, max_delta, bs = 0, 0.0, int(p["batch_size"])
        attacked = 0
        for i in range(0, len(right), bs):
            if stop is not None and stop.is_set():
                break
            idx = right[i:i + bs]
            x = ctx.x_test[idx.to(ctx.x_test.device)].to(dev).float().div_(255.0)
            y = y_all[idx.to(y_all.device)].to(dev)
            adv = self.perturb(model, x, y, ctx, g, stop)
            with torch.no_grad():
                pred = model(adv).argmax(1)  # float32 check
            flipped += int((pred != y).sum())
            attacked += len(idx)
            max_delta = max(max_delta, float((adv - x).abs().max()) if len(idx) else 0.0)
            if progress is not None:
                progress(min(1.0, (i + bs) / max(1, len(right))), f"{self.name}: {attacked}/{len(right)} images")
        rate = flipped / attacked if attacked else 0.0
        clean_acc = len(right) / n if n else float("nan")
        raw = {"success_rate": rate, "n_images": n, "n_attacked": attacked, "n_flipped": flipped,
               "clean_acc": clean_acc, "robust_acc": clean_acc * (1 - rate), "max_perturbation": max_delta,
               "eps": float(p["eps"])}
        return rate, raw


class PGD(_AdversarialAxis):
    name = "pgd"
    title = "Adversarial examples (PGD)"
    paper = "Madry et al. 2018, Towards Deep Learning Models Resistant to Adversarial Attacks, ICLR (arXiv:1706.06083)"
    meaning = ("Share of correctly classified test images that an invisible perturbation (at most 8/255 per pixel, "
               "10 gradient steps) makes the model get wrong.")
    defaults = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "n": 500, "batch_size": 250, "random_start": True}
    help = {"eps": "largest change per pixel, in [0, 1] units (8/255 = 0.0314)",
            "step_size": "change per step, [0, 1] units", "steps": "gradient steps",
            "n": "test images considered (the correctly classified ones are attacked)",
            "batch_size": "images per gradient batch", "random_start": "start from a random point in the eps-ball"}

    def validate(self):
        super().validate()
        self._positive_int("steps")
        self._positive("step_size")

    def perturb(self, model, x, y, ctx, g, stop):
        p = self.params
        return pgd(model, x, y, float(p["eps"]), float(p["step_size"]), int(p["steps"]), bool(p["random_start"]),
                   generator=g, amp=ctx.autocast_dtype(), stop=stop)


class FGSM(_AdversarialAxis):
    name = "fgsm"
    title = "Adversarial examples (FGSM)"
    paper = "Goodfellow et al. 2015, Explaining and Harnessing Adversarial Examples, ICLR (arXiv:1412.6572)"
    meaning = ("Share of correctly classified test images that a single gradient-sign step of 8/255 per pixel makes "
               "the model get wrong.")
    defaults = {"eps": 8 / 255, "n": 500, "batch_size": 250}
    help = {"eps": "change per pixel, in [0, 1] units (8/255 = 0.0314)",
            "n": "test images considered (the correctly classified ones are attacked)",
            "batch_size": "images per gradient batch"}

    def perturb(self, model, x, y, ctx, g, stop):
        return fgsm(model, x, y, float(self.params["eps"]), amp=ctx.autocast_dtype())
