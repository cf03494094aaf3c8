"""Neural Cleanse: reverse-engineer, for every class, the smallest trigger that sends clean images to
it; a class whose trigger is abnormally small is a backdoor target; unlearn the reversed trigger.

Wang, Yao, Shan, Li, Viswanath, Zheng and Zhao, "Neural Cleanse: Identifying and Mitigating Backdoor
Attacks in Neural Networks", IEEE Symposium on Security and Privacy (S&P) 2019
(doi:10.1109/SP.2019.00031).

1. Reverse engineering. For each class k, a mask ``m`` (1, H, W) and a pattern ``p`` (C, H, W), both
   in [0, 1] as ``(tanh(w) + 1) / 2`` of free variables, are optimised with Adam (betas 0.5, 0.9, as
   in the authors' code) on the defender's clean images (a seeded subset of ``reverse_images``, those
   not of class k) so that ``model(x * (1 - m) + p * m) = k``, minimising ``CE + lambda * |m|_1``.
   ``lambda`` follows the paper's dynamic schedule, simplified: it starts at ``init_cost`` (the paper
   starts at 0 and switches to ``init_cost`` once a first trigger works), is multiplied by
   ``cost_multiplier`` after ``patience`` consecutive steps on which the trigger sends at least
   ``attack_threshold`` of its batch to k, and divided by ``cost_multiplier ** 1.5`` after
   ``patience`` consecutive failing steps. Kept: the smallest mask (L1) that worked on ``patience``
   batches in a row (the paper: whose success over an epoch reached the threshold).
   Budget adaptations (the paper optimises for thousands of steps with early stopping; here
   ``reverse_steps`` per class): the mask starts small (uniform in [0, ``mask_init``]) and grows the
   pixels that matter, instead of shrinking a random full-size mask, which within a few dozen steps
   ends in run-to-run different local minima; and ``restarts`` triggers are optimised side by side
   from different random starts, each on its share of every batch (same cost as one trigger on the
   whole batch), the smallest kept.
2. Detection. From the masks' L1 norms, the anomaly index of class k is
   ``|s_k - median(s)| / (1.4826 * MAD(s))`` (MAD: median absolute deviation; 1.4826 the consistency
   constant for normal data); classes below the median with an index above ``anomaly_threshold``
   (2, ~95% confidence, as in the paper) are flagged. The paper takes ``s`` = the L1 norms
   (``norm_scale="l1"``); the default here takes their logarithms (``norm_scale="log"``): on the
   CPU-sized CIFAR-10 fastnet (global max pooling, 2 epochs, BadNets) the clean classes' minimal
   triggers differ by a factor of about 3 (L1 about 2.5 to 7, bird 10 or more), so their MAD is a
   third of their median and even a target trigger of near-zero size scores only 1.5 to 2.7 on the
   paper's scale (10 runs with small-start masks, several settings and seeds: flagged in 4) although
   it was the smallest in every run, 4 to 10 times below the median; on the log scale (relative
   differences) the same runs give 2.7 to 6.1, the target flagged alone each time.
3. Mitigation by unlearning. If a class is flagged, the model is fine-tuned (SGD, constant ``lr``,
   as in FT) on the clean data where a share ``unlearn_share`` of the images carries the reversed
   trigger of a flagged class while keeping its true label (the paper: 20% stamped, one epoch). The
   stamped images are drawn afresh each step and stamped after the flip augmentation, so the trigger
   sits where it will at test time. If no class is flagged the model is left unchanged.

Defaults and CPU budget. 80 steps of 128 images per class (4 restarts of 32 images each) on a
2,000-image subset: about 100,000 image passes for CIFAR-10's 10 classes; then one epoch of
unlearning on the 20% clean split (10,000 images, 157 steps of 64 clean + 16 stamped). Measured on
the 2-core CPU while other jobs kept it busy (load about 3): reverse engineering 62 s and unlearning
17 s on one thread, 71 s and 26 s on two; 99 s in all through ``run_defense``, so an estimated
50-60 s on the idle machine (the attack training, 51 s idle, took 87 s under that load).

On the demo's BadNets fastnet the reversed target trigger is not the 3x3 white corner patch but one
saturated pixel (L1 about 0.5; the network max-pools its features over the image, so a single strong
pixel is enough), so unlearning it removes only part of the backdoor and the fine-tuning does much
of the rest: ASR 0.97 -> 0.24 after one epoch at lr 0.02 (the default; CA 0.73 -> 0.68), against
0.33 for the same fine-tuning without the trigger; at lr 0.01, 0.65 with the trigger and 0.72
without. On a GPU raise ``reverse_steps`` (and ``restarts``) for triggers closer to convergence.

Needs: a clean labelled fraction of the training distribution (the clean-data budget); no access
to the poisoned training set or to the trigger."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..data import augment
from ..device import amp_dtype as pick_amp
from ..errors import ConfigError
from ..metrics import autocast_ctx
from ..train import Progress, Trainer, TrainResult
from .base import Defense

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of the standard deviation for normal data


def anomaly_indices(norms) -> torch.Tensor:
    """The anomaly index of every entry of ``norms``: ``|x - median| / (1.4826 * MAD)`` (float64).
    The median is the usual one (the mean of the two middle values for an even count). A zero MAD
    gives index 0 for entries at the median and ``inf`` for the others."""
    x = torch.as_tensor(norms, dtype=torch.float64).reshape(-1).cpu()
    if len(x) == 0:
        return x
    med = torch.quantile(x, 0.5)
    dev = (x - med).abs()
    mad = MAD_CONSISTENCY * torch.quantile(dev, 0.5)
    if mad > 0:
        return dev / mad
    return torch.where(dev > 0, torch.full_like(dev, math.inf), torch.zeros_like(dev))


def flag_classes(norms, threshold: float = 2.0) -> tuple[list[int], torch.Tensor]:
    """Classes whose norm is below the median with an anomaly index above ``threshold``, and the
    index of every class. Non-finite norms (classes not reverse-engineered) are left out."""
    x = torch.as_tensor(norms, dtype=torch.float64).reshape(-1).cpu()
    ok = torch.isfinite(x)
    index = torch.full_like(x, math.nan)
    if int(ok.sum()) < 3:  # a median and a spread need a few classes
        return [], index
    index[ok] = anomaly_indices(x[ok])
    med = torch.quantile(x[ok], 0.5)
    flagged = [int(k) for k in torch.nonzero(ok & (x < med) & (index > threshold)).flatten()]
    return flagged, index


def most_anomalous_small(norms, index) -> float:
    """The largest anomaly index among the classes whose norm is below the median (0 when none)."""
    x = torch.as_tensor(norms, dtype=torch.float64).reshape(-1).cpu()
    ok = torch.isfinite(x) & ~torch.isnan(index)
    if int(ok.sum()) < 3:
        return 0.0
    small = ok & (x < torch.quantile(x[ok], 0.5))
    return float(index[small].max()) if bool(small.any()) else 0.0


def reversed_trigger_image(mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """What the reversed trigger adds to an image, for display: ``mask * pattern``, float (C, H, W)
    in [0, 1]. ``mask`` is (1, H, W) or (H, W); ``pattern`` (C, H, W)."""
    mask = torch.as_tensor(mask).float()
    pattern = torch.as_tensor(pattern).float()
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3 or pattern.dim() != 3 or mask.shape[-2:] != pattern.shape[-2:]:
        raise ConfigError(f"a mask (1, H, W) and a pattern (C, H, W) of the same size are needed, got "
                          f"{tuple(mask.shape)} and {tuple(pattern.shape)}")
    return (mask * pattern).clamp(0, 1)


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Float images (N, C, H, W) in [0, 1] with the trigger: ``x * (1 - m) + p * m``."""
    return x * (1 - mask) + pattern * mask


def _to_free(v: torch.Tensor) -> torch.Tensor:
    """The free variable w with (tanh(w) + 1) / 2 = v."""
    return torch.atanh((v * 2 - 1).clamp(-0.999, 0.999))


def _from_free(w: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(w) + 1) / 2


class NeuralCleanse(Defense):
    name = "neural_cleanse"
    title = "Neural Cleanse (reverse-engineer + unlearn)"
    paper = "Wang et al. 2019, Neural Cleanse, IEEE S&P"
    needs = "clean labelled data (the clean-data budget); no poisoned data, no trigger"
    defaults = {"reverse_steps": 80, "reverse_batch": 128, "restarts": 4, "reverse_images": 2000, "reverse_lr": 0.1,
                "mask_init": 0.1, "init_cost": 1e-2, "cost_multiplier": 1.5, "patience": 5, "attack_threshold": 0.99,
                "anomaly_threshold": 2.0, "norm_scale": "log", "unlearn_share": 0.2, "lr": 0.02, "epochs": 1.0,
                "min_steps": 60, "batch_size": 64, "momentum": 0.9, "weight_decay": 5e-4}
    help = {"reverse_steps": "optimisation steps per class when reverse-engineering its trigger",
            "reverse_batch": "clean images per reverse-engineering step (shared among the restarts)",
            "restarts": "triggers optimised side by side per class from different random starts; the smallest is kept",
            "mask_init": "the mask starts uniform in [0, mask_init] (small: grow the pixels that matter)",
            "reverse_images": "clean images used for reverse engineering (a seeded subset of the clean data)",
            "reverse_lr": "Adam learning rate of the mask and pattern",
            "init_cost": "starting weight lambda of the mask's L1 norm",
            "cost_multiplier": "lambda is multiplied by this when the trigger works, divided by its 1.5th power "
                               "when not",
            "patience": "consecutive steps that must succeed (or fail) before lambda changes",
            "attack_threshold": "share of a batch the trigger must send to the class to count as working",
            "anomaly_threshold": "anomaly index above which a class with a small mask is flagged (paper: 2)",
            "norm_scale": "'log': the anomaly index on the logarithms of the masks' L1 norms; 'l1': on the norms "
                          "(the paper)",
            "unlearn_share": "share of unlearning images stamped with the reversed trigger (true labels kept)",
            "lr": "unlearning learning rate (constant)", "epochs": "unlearning passes over the clean data",
            "min_steps": "run at least this many unlearning steps (small budgets)",
            "batch_size": "clean images per unlearning step", "momentum": "SGD momentum",
            "weight_decay": "L2 weight decay"}

    def validate(self):
        super().validate()
        p = self.params

        def num(k):
            try:
                v = float(p[k])
            except (TypeError, ValueError):
                raise ConfigError(f"neural_cleanse: {k} must be a number, got {p[k]!r}") from None
            if not math.isfinite(v):
                raise ConfigError(f"neural_cleanse: {k} must be finite, got {p[k]!r}")
            return v

        for k in ("reverse_steps", "reverse_batch", "restarts", "patience"):
            if num(k) < 1 or num(k) != int(num(k)):
                raise ConfigError(f"neural_cleanse: {k} must be a whole number >= 1, got {p[k]!r}")
        if num("reverse_images") < 1 or num("reverse_images") != int(num("reverse_images")):
            raise ConfigError("neural_cleanse: reverse_images must be a whole number >= 1, "
                              f"got {p['reverse_images']!r}")
        if int(num("restarts")) > int(num("reverse_batch")):
            raise ConfigError(f"neural_cleanse: restarts ({p['restarts']}) cannot exceed reverse_batch "
                              f"({p['reverse_batch']}): each restart needs at least one image per step")
        if not 0 < num("mask_init") <= 1:
            raise ConfigError(f"neural_cleanse: mask_init must be in (0, 1], got {p['mask_init']!r}")
        if not num("reverse_lr") > 0:
            raise ConfigError(f"neural_cleanse: reverse_lr must be positive, got {p['reverse_lr']!r}")
        if not num("init_cost") > 0:
            raise ConfigError(f"neural_cleanse: init_cost (lambda) must be positive, got {p['init_cost']!r}")
        if not num("cost_multiplier") > 1:
            raise ConfigError(f"neural_cleanse: cost_multiplier must be greater than 1, got {p['cost_multiplier']!r}")
        if not 0 < num("attack_threshold") <= 1:
            raise ConfigError(f"neural_cleanse: attack_threshold must be in (0, 1], got {p['attack_threshold']!r}")
        if not num("anomaly_threshold") > 0:
            raise ConfigError(f"neural_cleanse: anomaly_threshold must be positive, got {p['anomaly_threshold']!r}")
        if p["norm_scale"] not in ("log", "l1"):
            raise ConfigError(f"neural_cleanse: norm_scale must be 'log' or 'l1', got {p['norm_scale']!r}")
        if not 0 < num("unlearn_share") < 1:
            raise ConfigError(f"neural_cleanse: unlearn_share must be in (0, 1), got {p['unlearn_share']!r}")
        if num("momentum") < 0 or num("weight_decay") < 0 or num("min_steps") < 0:
            raise ConfigError("neural_cleanse: momentum, weight_decay and min_steps must be >= 0")

    def detection_scale(self, l1: torch.Tensor) -> torch.Tensor:
        """The numbers the anomaly index is computed on: the masks' L1 norms ("l1", as in the paper)
        or their logarithms ("log", the default)."""
        if self.params["norm_scale"] == "log":
            return torch.as_tensor(l1, dtype=torch.float64).clamp_min(1e-6).log()
        return torch.as_tensor(l1, dtype=torch.float64)

    # --- step 1: reverse engineering -------------------------------------------------------------
    def reverse_class(self, model, x: torch.Tensor, y: torch.Tensor, k: int, generator: torch.Generator,
                      on_step=None, stop=None, amp=None) -> dict:
        """Reverse-engineer the trigger of class ``k`` on float images ``x`` (N, C, H, W) in [0, 1]
        with labels ``y``: ``restarts`` triggers optimised side by side (each on its own share of
        every batch, with its own lambda), the smallest kept. Returns ``mask`` (1, H, W), ``pattern``
        (C, H, W), ``l1``, ``success`` (the share of its batch the kept trigger sent to k), ``steps``
        and ``complete``. ``on_step(loss, n_images)`` is called after each step; ``stop`` ends the
        loop early."""
        p = self.params
        dev = x.device
        _, c, h, w = x.shape
        pool = torch.nonzero(y != k).flatten()
        if len(pool) == 0:  # only images of class k: use them all
            pool = torch.arange(len(y), device=dev)
        r = int(p["restarts"])
        b = max(1, min(int(p["reverse_batch"]), len(pool)) // r)  # images per trigger per step
        thr, mult, patience = float(p["attack_threshold"]), float(p["cost_multiplier"]), int(p["patience"])
        w_m = _to_free(torch.rand(r, 1, h, w, device=dev, generator=generator) * float(p["mask_init"]))
        w_p = _to_free(torch.rand(r, c, h, w, device=dev, generator=generator))
        w_m.requires_grad_(True)
        w_p.requires_grad_(True)
        opt = torch.optim.Adam([w_m, w_p], lr=float(p["reverse_lr"]), betas=(0.5, 0.9))
        cost = torch.full((r,), float(p["init_cost"]), device=dev)
        up = torch.zeros(r, dtype=torch.long, device=dev)
        down = torch.zeros(r, dtype=torch.long, device=dev)
        streak = torch.zeros(r, dtype=torch.long, device=dev)  # consecutive batches the trigger worked on
        best_l1 = torch.full((r,), math.inf, device=dev)
        best_mask, best_pattern = torch.zeros(r, 1, h, w, device=dev), torch.zeros(r, c, h, w, device=dev)
        best_success = torch.zeros(r, device=dev)
        target = torch.full((r * b,), int(k), dtype=torch.long, device=dev)
        steps = 0
        mask = pattern = success = l1 = None
        for steps in range(1, int(p["reverse_steps"]) + 1):
            if stop is not None and stop.is_set():
                steps -= 1
                break
            idx = pool[torch.randint(len(pool), (r * b,), device=dev, generator=generator)]
            mask, pattern = _from_free(w_m), _from_free(w_p)
            xb = stamp(x[idx].view(r, b, c, h, w), mask[:, None], pattern[:, None]).view(r * b, c, h, w)
            with autocast_ctx(dev, amp):
                out = model(xb.contiguous(memory_format=torch.channels_last))
            out = out.float()
            ce = F.cross_entropy(out, target, reduction="none").view(r, b).mean(1)
            l1 = mask.sum(dim=(1, 2, 3))
            loss = (ce + cost * l1).sum()  # the triggers are independent: one backward pass for all
            w_m.grad, w_p.grad = torch.autograd.grad(loss, [w_m, w_p])
            opt.step()
            with torch.no_grad():
                success = (out.argmax(1) == k).float().view(r, b).mean(1)
                ok = success >= thr
                streak = torch.where(ok, streak + 1, 0)
                # the smallest mask so far that worked on `patience` batches in a row (the paper keeps the
                # smallest mask whose attack success over a whole epoch reached the threshold)
                better = (streak >= patience) & (l1 < best_l1)
                best_l1 = torch.where(better, l1, best_l1)
                best_mask[better], best_pattern[better] = mask[better], pattern[better]
                best_success[better] = success[better]
                # the paper's dynamic lambda: raise it while the trigger works, lower it while it fails
                up, down = torch.where(ok, up + 1, 0), torch.where(ok, 0, down + 1)
                raise_, lower = up >= patience, down >= patience
                cost = torch.where(raise_, cost * mult, torch.where(lower, cost / mult ** 1.5, cost))
                up, down = torch.where(raise_, 0, up), torch.where(lower, 0, down)
            if on_step is not None:
                on_step(float(loss.detach()) / r, r * b)
        if mask is None:  # stopped before the first step
            return {"mask": torch.full((1, h, w), math.nan), "pattern": torch.full((c, h, w), math.nan),
                    "l1": math.nan, "success": math.nan, "steps": 0, "complete": False}
        found = torch.isfinite(best_l1)
        if found.any():
            j = int(best_l1.argmin())
            keep = best_mask[j], best_pattern[j], float(best_l1[j]), float(best_success[j])
        else:  # no trigger reached the threshold: the one that came closest, as it ended
            j = int(success.argmax())
            keep = mask[j].detach(), pattern[j].detach(), float(l1[j].detach()), float(success[j])
        return {"mask": keep[0].cpu(), "pattern": keep[1].cpu(), "l1": keep[2], "success": keep[3], "steps": steps,
                "complete": steps == int(p["reverse_steps"]), "found": bool(found.any())}

    # --- the whole defense -----------------------------------------------------------------------
    def apply(self, model, x_clean, y_clean, evaluator=None, callbacks=None, stop=None, seed: int = 0, **train_over):
        t0 = time.perf_counter()
        p = self.params
        callbacks = list(callbacks or [])
        dev = next(model.parameters()).device
        num_classes = int(model.classifier.out_features)
        n_clean = len(y_clean)
        if n_clean == 0:
            raise ConfigError("neural_cleanse needs clean images (the clean-data budget is empty)")
        steps_per_class = int(p["reverse_steps"])
        n_reverse = num_classes * steps_per_class
        n_unlearn = self.total_steps(n_clean)
        total = n_reverse + n_unlearn
        amp = pick_amp(dev, train_over.get("amp", "auto"))
        res = TrainResult(total_steps=total)

        def fire(event, prog):
            for ev, fn in callbacks:
                if ev == event:
                    fn(prog)

        def point(event, step, loss=float("nan"), metrics=None):
            el = time.perf_counter() - t0
            m = metrics or {}
            prog = Progress(event, step, total, 0.0, loss, float(p["reverse_lr"]), el, 0.0, m.get("clean_acc"),
                            m.get("asr"))
            if m.get("clean_acc") is not None or m.get("asr") is not None:
                res.history.append({"step": step, "total_steps": total, "epoch": 0.0, "loss": loss,
                                    "lr": prog.lr, "elapsed_s": el, "images_per_s": 0.0,
                                    "clean_acc": m.get("clean_acc"), "asr": m.get("asr")})
            return prog

        if evaluator is not None:
            fire("on_step", point("start", 0, metrics=evaluator(model, live=True, amp_dtype=amp, channels_last=True)))

        # step 1: reverse-engineer one trigger per class, the model frozen in eval mode
        g = torch.Generator(device=dev).manual_seed(int(seed) + 17)
        sub = torch.randperm(n_clean, device=dev, generator=g)[:int(p["reverse_images"])]
        x_rev = x_clean[sub].float().div_(255.0)
        y_rev = y_clean[sub].to(dev)
        _, c, h, w = x_clean.shape
        was_training = model.training
        model.eval()
        model.to(memory_format=torch.channels_last)
        masks = torch.full((num_classes, 1, h, w), math.nan)
        patterns = torch.full((num_classes, c, h, w), math.nan)
        l1 = torch.full((num_classes,), math.nan, dtype=torch.float64)
        ran = torch.zeros(num_classes, dtype=torch.bool)
        success = [math.nan] * num_classes
        done = 0
        seen = 0
        t_rev = time.perf_counter()

        def on_step(loss, n):
            nonlocal done, seen
            done += 1
            seen += n
            if any(ev == "on_batch" for ev, _ in callbacks):
                el = time.perf_counter() - t0
                fire("on_batch", Progress("reverse", done, total, 0.0, loss, float(p["reverse_lr"]), el,
                                          seen / max(1e-9, time.perf_counter() - t_rev)))

        req = [q.requires_grad for q in model.parameters()]
        for q in model.parameters():
            q.requires_grad_(False)  # only the mask and pattern get gradients
        try:
            for k in range(num_classes):
                if stop is not None and stop.is_set():
                    break
                r = self.reverse_class(model, x_rev, y_rev, k, g, on_step=on_step, stop=stop, amp=amp)
                masks[k], patterns[k], success[k] = r["mask"], r["pattern"], r["success"]
                if r["complete"]:
                    ran[k] = True
                    # a class whose trigger never reached attack_threshold has no trigger to compare: as
                    # in the paper it stays out of the anomaly statistic and is never flagged (its
                    # closest try often has the smallest mask, which would otherwise look anomalous)
                    l1[k] = r["l1"] if r["found"] else math.inf
        finally:
            for q, rg in zip(model.parameters(), req):
                q.requires_grad_(rg)
            model.train(was_training)
        reverse_s = time.perf_counter() - t_rev
        complete = bool(ran.all())

        # step 2: MAD outlier detection on the masks' L1 norms (on a log scale by default, see above)
        flagged, index = flag_classes(self.detection_scale(l1), float(p["anomaly_threshold"]))
        index_l1 = flag_classes(l1)[1]  # the paper's index, on the norms themselves, reported alongside
        worst, worst_l1 = most_anomalous_small(l1, index), most_anomalous_small(l1, index_l1)

        # step 3: unlearning with the flagged classes' reversed triggers, true labels kept
        unlearn_s = 0.0
        stopped = stop is not None and stop.is_set()
        steps = done
        if flagged and not stopped:
            t_un = time.perf_counter()
            tr_res = self._unlearn(model, x_clean, y_clean, masks[flagged].to(dev), patterns[flagged].to(dev),
                                   evaluator, callbacks, stop, seed, done, total, t0, train_over)
            unlearn_s = time.perf_counter() - t_un
            res.history.extend(tr_res.history)
            res.final = dict(tr_res.final)
            steps += tr_res.steps
            stopped = tr_res.stopped
            res.images_per_s = tr_res.images_per_s
        else:
            if evaluator is not None:
                res.final = evaluator(model, live=False, amp_dtype=amp, channels_last=True)
                live = evaluator(model, live=True, amp_dtype=amp, channels_last=True)
                fire("on_epoch_end", point("end", done, metrics=live))
            else:
                res.final = {"clean_acc": None, "asr": None}
            if not stopped:
                fire("on_batch", Progress("end", total, total, 0.0, float("nan"), float(p["reverse_lr"]),
                                          time.perf_counter() - t0, 0.0))
                steps = total
        res.steps = steps
        res.stopped = bool(stopped) or not complete
        res.seconds = time.perf_counter() - t0
        if not res.images_per_s:
            res.images_per_s = seen / max(1e-9, reverse_s)
        res.final = {**res.final, "flagged_classes": flagged, "anomaly_index": worst, "anomaly_index_l1": worst_l1,
                     "unlearned": bool(flagged) and unlearn_s > 0,
                     "mask_l1": [float(v) for v in l1], "anomaly_indices": [float(v) for v in index],
                     "trigger_success": [float(s) for s in success], "reversed_classes": int(torch.isfinite(l1).sum()),
                     "reverse_s": reverse_s, "unlearn_s": unlearn_s}
        res.artefacts = {"masks": masks, "patterns": patterns, "mask_l1": l1.float(),
                         "flagged": torch.tensor(flagged, dtype=torch.int64)}
        self.flagged = flagged
        model.eval()  # as every defense leaves it, also when nothing was flagged (no unlearning ran)
        return res

    def _unlearn(self, model, x_clean, y_clean, masks, patterns, evaluator, callbacks, stop, seed, offset, total, t0,
                 train_over) -> TrainResult:
        """Fine-tune with the reversed triggers stamped on a share of the images (true labels)."""
        p = self.params
        cfg = self.train_config(seed, len(y_clean), **train_over)
        cfg.eval_at_start = False  # evaluated before reverse engineering, and unchanged since
        share = float(p["unlearn_share"])
        bs = min(int(cfg.batch_size), len(y_clean))
        n_st = max(1, round(bs * share / (1 - share)))  # stamped images next to each batch of clean ones
        weight = n_st / bs  # (bs * CE_clean + n_st * CE_stamped) / bs: each image counts alike
        n = len(y_clean)

        def unlearn_loss(m, step, gen):
            idx = torch.randint(n, (n_st,), device=x_clean.device, generator=gen)
            xb = x_clean[idx]
            if cfg.flip or cfg.translate:
                xb = augment(xb, flip=cfg.flip, translate=cfg.translate, generator=gen)
            j = torch.randint(len(masks), (n_st,), device=x_clean.device, generator=gen)
            xb = stamp(xb.float().div_(255.0), masks[j], patterns[j])
            if cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            return weight * F.cross_entropy(m(xb).float(), y_clean[idx])

        tr = Trainer(model, x_clean, y_clean, cfg, schedule=self.schedule(), evaluator=evaluator, stop=stop,
                     extra_loss=unlearn_loss)
        t_start = time.perf_counter() - t0

        def shifted(fn):  # one progress bar and one step axis across both phases
            def call(prog: Progress):
                fn(Progress(prog.event, prog.step + offset, total, prog.epoch, prog.loss, prog.lr,
                            prog.elapsed_s + t_start, prog.images_per_s, prog.clean_acc, prog.asr))
            return call

        for event, fn in callbacks:
            tr.add_callback(event, shifted(fn))
        out = tr.run()
        for row in out.history:
            row["step"] = row["step"] + offset
            row["total_steps"] = total
            row["elapsed_s"] = row["elapsed_s"] + t_start
        return out
