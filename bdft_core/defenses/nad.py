"""NAD (neural attention distillation): fine-tune a copy of the poisoned model on the clean data (the
teacher), then train the poisoned model (the student) on the clean data with cross-entropy plus a term
that pulls its attention maps at a few intermediate layers onto the teacher's.

Li, Lyu, Koren, Lyu, Li and Ma, "Neural Attention Distillation: Erasing Backdoor Triggers from Deep
Neural Networks", ICLR 2021 (arXiv:2101.05930).

What is implemented:

- Teacher: a deep copy of the poisoned model fine-tuned with SGD at a constant ``teacher_lr`` for
  ``teacher_epochs`` passes over the clean data (the paper's "fine-tune a few epochs").
- Attention map of an activation ``A`` (N, C, H, W): ``a = mean_c |A_c|^p`` (p = 2 in the paper),
  flattened to (N, H*W) and L2-normalised per image.
- Loss of the student: ``CE + beta * sum_l mean_n ||a_s^l(x_n) - a_t^l(x_n)||_2`` -- the paper's
  equation (the L2 norm of the difference, averaged over the batch). The authors' released code uses
  the mean *squared* difference instead, so its betas (500 - 5000) are not comparable with ``beta``
  here. The teacher is frozen and in eval mode; the term rides on the trainer's ``extra_loss`` hook
  (forward hooks capture the student's activations during its normal forward pass; the teacher runs
  on the same augmented batch).
- Layers: the outputs of the last ``layers`` *stages* of ``model.body`` (a stage is a run of
  consecutive conv blocks -- children of ``body`` that hold a Conv2d -- with the same output shape;
  its last block is hooked). fastnet: the three conv blocks; PreActResNet-18: the ends of
  layer2, layer3 and layer4 (the choice of the usual ResNet reimplementations of NAD).

Defaults (CIFAR-10 fastnet demo model, the defender's 20% clean split of 10,000 images): the
paper fine-tunes its teacher and student for 10 + 20 epochs on 5% of the data; on a 2-core CPU
that is far beyond a minute, so both phases are short (1 + 2 passes; a student step also runs the
teacher forward, so NAD costs about as much as 4 passes of plain fine-tuning), and the teacher's
learning rate is higher than the student's, so that the teacher has already lost most of the
backdoor after one pass (with lr 0.01 plain fine-tuning needs 4 passes to halve the ASR).
Measured on the demo model (CA 72.9%, ASR 96.8%): teacher CA 63.6%, ASR 24.8%; NAD (the student)
CA 70.0%, ASR 25.8% -- it keeps more clean accuracy than its teacher; beta 15: CA 67.8%, ASR 21.7%;
plain fine-tuning (``ft``, 4 passes at lr 0.01) for comparison: CA 71.3%, ASR 50.3%.

Needs: a clean labelled fraction of the training distribution (the clean-data budget); no access
to the poisoned training set or to the trigger."""
from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..device import amp_dtype as pick_amp
from ..errors import ConfigError
from ..schedules import Constant
from ..train import Progress, TrainResult, Trainer
from .base import Defense


def attention_map(act: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``mean over channels of |act|^p``, flattened and L2-normalised per sample: (N, H*W)."""
    a = act.float().abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(a, p=2, dim=1, eps=1e-12)


def attention_loss(act_s: torch.Tensor, act_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean over the batch of the L2 distance between the two attention maps."""
    return (attention_map(act_s, p) - attention_map(act_t, p)).norm(p=2, dim=1).mean()


def attention_layers(model, n: int, example: torch.Tensor) -> list[nn.Module]:
    """The modules whose outputs NAD distils: the last block of each of the last ``n`` stages of
    ``model.body`` (see the module docstring). The stages are found from the output shapes of one
    dry forward pass on ``example`` (float images in [0, 1] or uint8, (N, C, H, W))."""
    body = getattr(model, "body", model)
    blocks = [m for m in body.children()
              if any(True for _ in m.children()) and any(isinstance(c, nn.Conv2d) for c in m.modules())]
    if not blocks:
        raise ConfigError("nad needs a model whose body holds convolutional blocks (fastnet, resnet18)")
    shapes: dict[int, tuple] = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: shapes.__setitem__(k, tuple(o.shape[1:])))
             for k, b in enumerate(blocks)]
    was = model.training
    model.eval()
    try:
        x = example[:1]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        with torch.no_grad():
            model(x.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    ends = [b for k, b in enumerate(blocks) if k == len(blocks) - 1 or shapes.get(k) != shapes.get(k + 1)]
    return ends[-n:]


def _shifted(fn, step0: int, total: int, epoch0: float, t0: float):
    """A callback that reports a phase's progress as part of the whole defense."""
    def g(p: Progress):
        fn(dataclasses.replace(p, step=p.step + step0, total_steps=total, epoch=p.epoch + epoch0,
                               elapsed_s=p.elapsed_s + t0))
    return g


class NAD(Defense):
    name = "nad"
    title = "NAD (neural attention distillation)"
    paper = "Li et al. 2021, Neural Attention Distillation, ICLR (arXiv:2101.05930)"
    needs = "clean labelled data (the clean-data budget); no poisoned data, no trigger"
    defaults = {"teacher_epochs": 1.0, "teacher_lr": 0.03, "epochs": 2.0, "lr": 0.01, "beta": 5.0, "p": 2.0,
                "layers": 3, "min_steps": 60, "batch_size": 64, "momentum": 0.9, "weight_decay": 5e-4}
    help = {"teacher_epochs": "passes over the clean data fine-tuning the teacher (a copy of the poisoned model)",
            "teacher_lr": "teacher's fine-tuning learning rate (constant)",
            "epochs": "passes over the clean data training the student (the poisoned model) with distillation",
            "lr": "student's learning rate (constant)",
            "beta": "weight of the attention-distillation term (per layer; paper's L2-distance form)",
            "p": "attention map = mean over channels of |activation|^p",
            "layers": "how many stages' outputs are distilled (the last ones of the network)",
            "min_steps": "run at least this many steps per phase (small budgets)", "batch_size": "images per step",
            "momentum": "SGD momentum", "weight_decay": "L2 weight decay"}

    def validate(self):
        super().validate()
        p = self.params
        if not (float(p["teacher_epochs"]) > 0 and math.isfinite(float(p["teacher_epochs"]))):
            raise ConfigError(f"nad: teacher_epochs must be a positive number, got {p['teacher_epochs']}")
        if not float(p["teacher_lr"]) > 0:
            raise ConfigError(f"nad: teacher_lr must be positive, got {p['teacher_lr']}")
        if not (float(p["beta"]) >= 0 and math.isfinite(float(p["beta"]))):
            raise ConfigError(f"nad: beta must be a number >= 0, got {p['beta']}")
        if not float(p["p"]) > 0:
            raise ConfigError(f"nad: p (the attention map's exponent) must be positive, got {p['p']}")
        if int(p["layers"]) < 1 or float(p["layers"]) != int(p["layers"]):
            raise ConfigError(f"nad: layers must be a whole number >= 1, got {p['layers']}")

    def _steps(self, n_clean: int) -> tuple[int, int]:
        p = self.params
        spe = math.ceil(n_clean / min(int(p["batch_size"]), n_clean))
        teacher = max(float(p["teacher_epochs"]), int(p["min_steps"]) / spe)
        return max(1, math.ceil(teacher * spe)), max(1, math.ceil(self.epochs_for(n_clean) * spe))

    def total_steps(self, n_clean: int) -> int:
        """Teacher and student steps together."""
        return sum(self._steps(n_clean))

    def schedule_values(self, n_clean: int) -> list[float]:
        """The learning rate of every step: the teacher's, then the student's."""
        t, s = self._steps(n_clean)
        return [float(self.params["teacher_lr"])] * t + [float(self.params["lr"])] * s

    def teacher_config(self, seed: int, n_clean: int, **over):
        p = self.params
        spe = math.ceil(n_clean / min(int(p["batch_size"]), n_clean))
        epochs = max(float(p["teacher_epochs"]), int(p["min_steps"]) / spe)
        cfg = self.train_config(seed + 1, n_clean, **over)
        return dataclasses.replace(cfg, epochs=epochs, lr=float(p["teacher_lr"]), eval_at_start=False)

    def apply(self, model, x_clean, y_clean, evaluator=None, callbacks=None, stop=None, seed: int = 0, **train_over):
        p = self.params
        t_start = time.perf_counter()
        callbacks = list(callbacks or [])
        layers_s = attention_layers(model, int(p["layers"]), x_clean)
        pos = {id(m): k for k, m in enumerate(getattr(model, "body", model).children())}
        teacher = copy.deepcopy(model)
        layers_t = [list(getattr(teacher, "body", teacher).children())[pos[id(m)]] for m in layers_s]

        n = len(y_clean)
        t_cfg = self.teacher_config(seed, n, **train_over)
        s_cfg = dataclasses.replace(self.train_config(seed, n, **train_over), eval_at_start=False)
        bs = min(int(p["batch_size"]), n)
        spe = math.ceil(n / bs)
        total = self.total_steps(n)

        # the defended model's starting point, at step 0 of the whole defense
        res = TrainResult(total_steps=total)
        ev_kw = {"amp_dtype": pick_amp(next(model.parameters()).device, s_cfg.amp),
                 "channels_last": s_cfg.channels_last}
        if evaluator is not None:
            m0 = evaluator(model, live=True, **ev_kw)
            start = Progress("start", 0, total, 0.0, float("nan"), float(p["teacher_lr"]), 0.0, 0.0,
                             m0.get("clean_acc"), m0.get("asr"))
            res.history.append({k: v for k, v in dataclasses.asdict(start).items() if k != "event"})
            for event, fn in callbacks:
                if event == "on_step":
                    fn(start)

        # phase 1: the teacher (progress only; its curve is not the defended model's)
        tt = Trainer(teacher, x_clean, y_clean, t_cfg, schedule=Constant(float(p["teacher_lr"])), stop=stop)
        for event, fn in callbacks:
            if event == "on_batch":
                tt.add_callback(event, _shifted(fn, 0, total, 0.0, 0.0))
        t_res = tt.run()
        teacher.eval()
        for q in teacher.parameters():
            q.requires_grad_(False)
        self.teacher = teacher  # kept for inspection (tests, notebooks)
        t_seconds = time.perf_counter() - t_start
        res.steps = t_res.steps
        teacher_figs = evaluator(teacher, live=True, **ev_kw) if evaluator is not None else {}
        res.final = {"teacher_steps": t_res.steps}
        if teacher_figs:
            res.final.update({"teacher_clean_acc": teacher_figs.get("clean_acc"),
                              "teacher_asr": teacher_figs.get("asr")})

        if t_res.stopped:  # stopped while the teacher trained: the defended model is unchanged
            res.stopped = True
            res.final = {**(evaluator(model, **ev_kw) if evaluator is not None else {}), **res.final}
            res.seconds = time.perf_counter() - t_start
            model.eval()
            return res

        # phase 2: the student, with the attention term
        acts_s: dict[int, torch.Tensor] = {}
        acts_t: dict[int, torch.Tensor] = {}
        batch: dict[str, torch.Tensor] = {}
        # during training steps only (the evaluations run in eval mode): the student's input and activations
        hooks = [model.register_forward_pre_hook(lambda m, a: batch.__setitem__("x", a[0]) if m.training else None)]
        for k, m in enumerate(layers_s):
            hooks.append(m.register_forward_hook(
                lambda mod, i, o, k=k: acts_s.__setitem__(k, o) if mod.training else None))
        for k, m in enumerate(layers_t):
            hooks.append(m.register_forward_hook(lambda mod, i, o, k=k: acts_t.__setitem__(k, o)))
        beta, pw = float(p["beta"]), float(p["p"])

        def distil(m, step, gen):
            with torch.no_grad():
                teacher(batch["x"])
            loss = sum(attention_loss(acts_s[k], acts_t[k].detach(), pw) for k in range(len(layers_s)))
            acts_s.clear()
            acts_t.clear()
            return beta * loss

        ts = Trainer(model, x_clean, y_clean, s_cfg, schedule=self.schedule(), evaluator=evaluator, stop=stop,
                     extra_loss=distil if beta > 0 else None)
        for event, fn in callbacks:
            ts.add_callback(event, _shifted(fn, t_res.steps, total, t_res.steps / spe, t_seconds))
        try:
            s_res = ts.run()
        finally:
            for h in hooks:
                h.remove()
        for row in s_res.history:
            res.history.append({**row, "step": row["step"] + t_res.steps, "total_steps": total,
                                "epoch": row["epoch"] + t_res.steps / spe, "elapsed_s": row["elapsed_s"] + t_seconds})
        res.steps = t_res.steps + s_res.steps
        res.stopped = s_res.stopped
        res.final = {**s_res.final, **res.final}
        res.seconds = time.perf_counter() - t_start
        res.images_per_s = (res.steps * bs) / res.seconds if res.seconds > 0 else 0.0
        return res
