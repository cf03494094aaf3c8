"""ANP (adversarial neuron pruning): neurons that a small adversarial perturbation of their weights
turns into backdoor behaviour are the backdoor's; learn which by optimising a soft mask under such
perturbations on clean data, then prune the neurons whose mask falls low.

Wu and Wang, "Adversarial Neuron Perturbation Exposes Backdoors in Deep Neural Networks",
NeurIPS 2021 (arXiv:2110.14430).

What is implemented (a neuron = one channel of a BatchNorm layer with affine weights):

- Each neuron k of a BN layer with weight ``g_k`` and bias ``b_k`` gets a mask ``m_k`` in [0, 1]
  (starting at 1) and perturbations ``d_k, e_k`` in [-eps, eps]; the layer then computes
  ``(m_k + d_k) * g_k * xhat + (1 + e_k) * b_k`` (a forward hook on the layer applies this to its
  output, which is exact: ``g_k * xhat = out - b_k``).
- Per step, on a batch of clean images (random flips): the perturbations are drawn uniformly in
  [-eps, eps], then take ``anp_steps`` signed-gradient ascent steps of size ``eps / anp_steps`` on
  the cross-entropy (FGSM-like; clipped back to [-eps, eps]); then the mask takes one SGD step
  (``mask_lr``, momentum 0.9) on ``alpha * CE(mask only) + (1 - alpha) * CE(mask and perturbations)``
  and is clipped to [0, 1]. The layers run in training mode (batch statistics, whole batches only)
  on a copy of the model, so the defended model's weights and BN statistics are untouched. (A plain,
  unsigned gradient step of that size barely moves the perturbations: they stay at their random
  start.)
- Pruning: every neuron whose mask ends below ``threshold`` gets BN weight and bias 0 in the
  defended model (it outputs 0, and 0 after the activation). No fine-tuning follows (as in the paper).
  ``final["pruned_neurons"]`` counts them; the learned mask values are kept as the artefact
  ``anp_mask`` (all BN layers concatenated in model order).

Defaults (CIFAR-10 fastnet demo model, the defender's 20% clean split of 10,000 images): the paper's
eps 0.4, alpha 0.2, mask lr 0.2, one perturbation step and threshold 0.2, but 500 mask steps of 64
images instead of 2,000 of 128 (a mask step runs three forward and backward passes -- two for the
mask, one for the perturbation -- but computes no weight gradients; measured, 500 steps cost about
1.3 times the 4 passes (628 steps) of ``ft``). Measured on the demo model (CA 72.9%, ASR 96.8%; 336 BN neurons): the neurons
ranked lowest by the mask are the backdoor's -- pruning the lowest 20 leaves the ASR at 96%, the
lowest 30 brings it to 15-18% at a cost of 2-5 points of clean accuracy (live test subset), the
lowest 60 to 0-6% (-4 to -7 points). After 500 steps 35 masks (nearly all in the last conv block)
are below 0.2, past that transition: CA 68.8%, ASR 5.8%; after 200 steps of 128 images only 19
were (ASR unchanged). On a GPU use the paper's 2,000 steps.

Needs: a clean labelled fraction of the training distribution (the clean-data budget); no access
to the poisoned training set or to the trigger."""
from __future__ import annotations

import copy
import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..data import augment
from ..device import amp_dtype as pick_amp
from ..errors import ConfigError
from ..metrics import autocast_ctx
from ..train import Progress, TrainConfig, TrainResult
from .base import Defense


def mask_layers(model) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers with affine weights, in model order: their channels are ANP's neurons."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]


class NeuronPerturbation:
    """Masks and multiplicative perturbations of every BN neuron of ``model``, applied by forward
    hooks. ``perturb`` switches the perturbations on and off (the masks always apply)."""

    def __init__(self, model, eps: float):
        self.bns = mask_layers(model)
        if not self.bns:
            raise ConfigError("anp needs a model with BatchNorm layers (fastnet, resnet18)")
        dev = self.bns[0].weight.device
        self.eps = float(eps)
        self.masks = [torch.ones(bn.num_features, device=dev, requires_grad=True) for bn in self.bns]
        self.dw = [torch.zeros(bn.num_features, device=dev, requires_grad=True) for bn in self.bns]
        self.db = [torch.zeros(bn.num_features, device=dev, requires_grad=True) for bn in self.bns]
        self.perturb = False
        self.hooks = [bn.register_forward_hook(self._hook(k)) for k, bn in enumerate(self.bns)]

    def _hook(self, k: int):
        def hook(bn, inputs, out):
            shape = (1, -1) + (1,) * (out.dim() - 2)
            b = bn.bias.view(shape).to(out.dtype)
            scale = self.masks[k] + self.dw[k] if self.perturb else self.masks[k]
            shift = 1 + self.db[k] if self.perturb else 1
            shift = shift.view(shape).to(out.dtype) if torch.is_tensor(shift) else shift
            return (out - b) * scale.view(shape).to(out.dtype) + b * shift
        return hook

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None = None) -> None:
        """Draw the perturbations uniformly in [-eps, eps]."""
        for t in self.dw + self.db:
            t.copy_((torch.rand(t.shape, generator=generator, device=t.device) * 2 - 1) * self.eps)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def mask_vector(self) -> torch.Tensor:
        return torch.cat([m.detach() for m in self.masks])


@torch.no_grad()
def prune(model, masks: list[torch.Tensor], threshold: float) -> int:
    """Zero the BN weight and bias of every neuron whose mask is below ``threshold``; returns how many."""
    bns = mask_layers(model)
    if len(bns) != len(masks):
        raise ConfigError(f"anp: {len(masks)} masks for {len(bns)} BatchNorm layers")
    n = 0
    for bn, m in zip(bns, masks):
        off = m.to(bn.weight.device) < threshold
        bn.weight[off] = 0.0
        bn.bias[off] = 0.0
        n += int(off.sum())
    return n


class ANP(Defense):
    name = "anp"
    title = "ANP (adversarial neuron pruning)"
    paper = "Wu and Wang 2021, Adversarial Neuron Perturbation, NeurIPS (arXiv:2110.14430)"
    needs = "clean labelled data (the clean-data budget); no poisoned data, no trigger"
    defaults = {"eps": 0.4, "alpha": 0.2, "mask_lr": 0.2, "anp_steps": 1, "threshold": 0.2, "mask_steps": 500,
                "batch_size": 64}
    help = {"eps": "bound of the multiplicative perturbation of each neuron's BN weight and bias",
            "alpha": "trade-off: weight of the unperturbed loss (1 - alpha: the perturbed one)",
            "mask_lr": "learning rate of the neuron masks (SGD, momentum 0.9)",
            "anp_steps": "gradient-ascent steps on the perturbation per mask step",
            "threshold": "neurons whose mask ends below this are pruned (BN weight and bias set to 0)",
            "mask_steps": "mask optimisation steps (one batch each)", "batch_size": "images per step"}

    def validate(self):
        super().validate()
        p = self.params
        if not (0.0 <= float(p["eps"]) < 1.0):
            raise ConfigError(f"anp: eps must be in [0, 1) (a relative perturbation of the BN weights), got {p['eps']}")
        if not 0.0 <= float(p["alpha"]) <= 1.0:
            raise ConfigError(f"anp: alpha must be in [0, 1], got {p['alpha']}")
        if not float(p["mask_lr"]) > 0:
            raise ConfigError(f"anp: mask_lr must be positive, got {p['mask_lr']}")
        if int(p["anp_steps"]) < 1 or float(p["anp_steps"]) != int(p["anp_steps"]):
            raise ConfigError(f"anp: anp_steps must be a whole number >= 1, got {p['anp_steps']}")
        if not 0.0 <= float(p["threshold"]) <= 1.0:
            raise ConfigError(f"anp: threshold must be in [0, 1] (masks live there), got {p['threshold']}")
        if int(p["mask_steps"]) < 1 or float(p["mask_steps"]) != int(p["mask_steps"]):
            raise ConfigError(f"anp: mask_steps must be a whole number >= 1, got {p['mask_steps']}")

    def total_steps(self, n_clean: int) -> int:
        return int(self.params["mask_steps"])

    def has_schedule(self) -> bool:
        return False

    def learn_masks(self, model, x_clean, y_clean, cfg: TrainConfig, on_step=None, stop=None):
        """Optimise the masks on a copy of ``model``; returns (per-layer masks, steps done)."""
        p = self.params
        dev = next(model.parameters()).device
        work = copy.deepcopy(model)
        for q in work.parameters():
            q.requires_grad_(False)
        if cfg.channels_last:
            work.to(memory_format=torch.channels_last)
        work.train()
        pert = NeuronPerturbation(work, float(p["eps"]))
        opt = torch.optim.SGD(pert.masks, lr=float(p["mask_lr"]), momentum=0.9)
        amp = pick_amp(dev, cfg.amp)
        gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        eps, alpha, k_steps = float(p["eps"]), float(p["alpha"]), int(p["anp_steps"])
        n = len(y_clean)
        bs = min(int(p["batch_size"]), n)
        total = int(p["mask_steps"])
        step = 0

        def loss_on(xb, yb):
            with autocast_ctx(dev, amp):
                out = work(xb)
            return F.cross_entropy(out.float(), yb)

        try:
            while step < total and not (stop is not None and stop.is_set()):
                perm = torch.randperm(n, device=dev, generator=gen)
                for i in range(0, n - bs + 1, bs):  # whole batches only (the layers use batch statistics)
                    if step >= total or (stop is not None and stop.is_set()):
                        break
                    idx = perm[i:i + bs]
                    xb = augment(x_clean[idx], flip=cfg.flip, translate=cfg.translate, generator=gen) \
                        if (cfg.flip or cfg.translate) else x_clean[idx]
                    xb = xb.float().div_(255.0)
                    if cfg.channels_last:
                        xb = xb.contiguous(memory_format=torch.channels_last)
                    yb = y_clean[idx]
                    if eps > 0:  # the worst perturbation near a random start
                        pert.reset(gen)
                        pert.perturb = True
                        for _ in range(k_steps):
                            grads = torch.autograd.grad(loss_on(xb, yb), pert.dw + pert.db)
                            with torch.no_grad():
                                for t, g in zip(pert.dw + pert.db, grads):
                                    t.add_(g.sign(), alpha=eps / k_steps).clamp_(-eps, eps)
                        loss = (1 - alpha) * loss_on(xb, yb) if alpha < 1 else 0.0
                        pert.perturb = False
                        if alpha > 0:
                            loss = loss + alpha * loss_on(xb, yb)
                    else:  # no perturbation: both terms are the plain loss
                        pert.perturb = False
                        loss = loss_on(xb, yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        for m in pert.masks:
                            m.clamp_(0.0, 1.0)
                    step += 1
                    if on_step is not None:
                        on_step(step, float(loss.detach()), len(idx))
        finally:
            pert.remove()
        return [m.detach().clone() for m in pert.masks], step

    def apply(self, model, x_clean, y_clean, evaluator=None, callbacks=None, stop=None, seed: int = 0, **train_over):
        t0 = time.perf_counter()
        p = self.params
        if len(y_clean) == 0:
            raise ConfigError("anp needs clean images (the clean-data budget is empty)")
        callbacks = list(callbacks or [])
        cfg = TrainConfig(**{"epochs": 1.0, "batch_size": int(p["batch_size"]), "lr": float(p["mask_lr"]), "flip": True,
                             "translate": 0, "seed": seed, **train_over}).validate()
        dev = next(model.parameters()).device
        ev_kw = {"amp_dtype": pick_amp(dev, cfg.amp), "channels_last": cfg.channels_last}
        total = int(p["mask_steps"])
        res = TrainResult(total_steps=total)
        seen = 0

        def fire(event, prog):
            for ev, fn in callbacks:
                if ev == event:
                    fn(prog)

        def point(event, step, loss, metrics):
            el = time.perf_counter() - t0
            prog = Progress(event, step, total, 0.0, loss, float(p["mask_lr"]), el, seen / el if el > 0 else 0.0,
                            metrics.get("clean_acc"), metrics.get("asr"))
            if metrics.get("clean_acc") is not None or metrics.get("asr") is not None:
                res.history.append({k: v for k, v in dataclasses.asdict(prog).items() if k != "event"})
            return prog

        if evaluator is not None:
            fire("on_step", point("start", 0, float("nan"), evaluator(model, live=True, **ev_kw)))

        last_loss = float("nan")

        def on_step(step, loss, nb):
            nonlocal seen, last_loss
            seen += nb
            last_loss = loss
            if any(ev == "on_batch" for ev, _ in callbacks):
                el = time.perf_counter() - t0
                fire("on_batch", Progress("batch", step, total, 0.0, loss, float(p["mask_lr"]), el,
                                          seen / el if el > 0 else 0.0))

        masks, steps = self.learn_masks(model, x_clean, y_clean, cfg, on_step=on_step, stop=stop)
        mask_s = time.perf_counter() - t0
        n_pruned = prune(model, masks, float(p["threshold"]))
        model.eval()
        res.steps = steps
        res.stopped = steps < total
        final = evaluator(model, **ev_kw) if evaluator is not None else {"clean_acc": None, "asr": None}
        fire("on_epoch_end", point("stop" if res.stopped else "end", steps, last_loss,
                                   evaluator(model, live=True, **ev_kw) if evaluator is not None else {}))
        mask = torch.cat(masks).cpu()
        res.final = {**final, "pruned_neurons": n_pruned, "neurons": int(mask.numel()),
                     "mask_below_0.5": int((mask < 0.5).sum()), "mask_seconds": mask_s}
        res.artefacts = {"anp_mask": mask}
        res.seconds = time.perf_counter() - t0
        res.images_per_s = seen / mask_s if mask_s > 0 else 0.0
        return res
