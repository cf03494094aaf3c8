"""Shadow-model membership inference: the attacker trains models of its own ("shadow models") on data
it knows the membership of, learns from their outputs what a training image looks like to such a
model, and applies that to the target model.

Shokri, Stronati, Song and Shmatikov, "Membership Inference Attacks against Machine Learning
Models", IEEE S&P 2017 (arXiv:1610.05820).

Here, for speed: ``n_shadow_models`` models of the target's architecture (``ctx.build_model()``),
each trained briefly on a random half of ``n_pool`` images from the attacker's pool
(``ctx.shadow_x``), the other half held out. One attack classifier for all classes (Shokri trains one
per class): a logistic regression on the sorted softmax vector and its logarithm (label-free, as in
Salem et al.'s "ML-Leaks", NDSS 2019, arXiv:1806.01246), fitted on the shadow models' in/out
outputs. It then scores the target's members and non-members: ROC AUC (headline; 0.5 = nothing
leaks), advantage max(TPR - FPR), and accuracy at the 0.5 decision threshold.

The shadows are trained with the evaluated model's label smoothing (``ctx.train_label_smoothing``,
read from the run's training settings): smoothing changes what a member's output looks like (a
capped top probability, a flat tail), and a classifier fitted on shadows trained otherwise can rank
the target's members below its non-members.

The shadow models and the classifier depend on the data only, so they are trained once per context
and shared by every model evaluated (their time appears in ``evaluate``'s ``shared_seconds``).
Shadow models trained on a few hundred images overfit more than a target trained on tens of
thousands, so the classifier learns an exaggerated member signature; the AUC is then a conservative
(low) estimate, but it ranks models consistently, which is what a sequela comparison needs.

Defaults (2 shadows, 500 in + 500 out each, 16 epochs): 16,000 image-passes of training, done once,
about 25 s for fastnet on an idle 2-core CPU; on CIFAR-10 the shadows reach about 0.65 training and
0.38 held-out accuracy, and the classifier an AUC of about 0.59 on their own in/out images.

Needs: outputs of the model (black box), and data from the same distribution (the shadow pool)."""
from __future__ import annotations

import time

import torch

from ..errors import ConfigError
from .base import Axis, advantage, fit, log_softmax_outputs, roc_auc, seeded


def attack_features(log_probs: torch.Tensor) -> torch.Tensor:
    """Label-free features of each output: the softmax sorted high to low, and its log (clamped)."""
    lp = log_probs.float().sort(dim=1, descending=True).values
    return torch.cat([lp.exp(), lp.clamp_min(-30.0)], dim=1)


class LogisticRegression:
    """Binary logistic regression (standardised inputs, L2 penalty), fitted with L-BFGS in torch."""

    def __init__(self, l2: float = 1e-3, iters: int = 200):
        self.l2, self.iters = float(l2), int(iters)

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> "LogisticRegression":
        x, y = x.double().cpu(), y.double().cpu()
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - self.mean) / self.std
        self.w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        self.b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([self.w, self.b], lr=1.0, max_iter=self.iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ self.w + self.b, y)
            loss = loss + self.l2 * (self.w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.w, self.b = self.w.detach(), self.b.detach()
        return self

    def decision(self, x: torch.Tensor) -> torch.Tensor:
        """Logit of "member" (higher = more likely a member)."""
        return ((x.double().cpu() - self.mean) / self.std) @ self.w + self.b


class ShadowMIA(Axis):
    name = "shadow_mia"
    title = "Membership inference (shadow models)"
    paper = "Shokri et al. 2017, Membership Inference Attacks against ML Models, IEEE S&P (arXiv:1610.05820)"
    meaning = ("How well an attacker who trained look-alike models of its own recognises the model's "
               "training images from its outputs.")
    unit = "AUC"
    range = (0.5, 1.0)
    defaults = {"n": 1000, "n_shadow_models": 2, "n_pool": 1000, "epochs": 16.0, "lr": 0.1, "batch_size": 128,
                "label_smoothing": None}
    help = {"n": "target members and non-members scored (each)",
            "n_shadow_models": "shadow models trained (each on a different random half of the pool)",
            "n_pool": "attacker's images used for the shadow models (half in, half out, per model)",
            "epochs": "passes of each shadow model over its half",
            "lr": "peak learning rate of the shadow models (warm-up then linear decay)",
            "batch_size": "images per shadow training step",
            "label_smoothing": ("label smoothing of the shadow training; None: as the evaluated model was trained "
                                "(ctx.train_label_smoothing; bdft's attack runs use 0.2)")}
    needs_model_factory = True

    def validate(self):
        self._positive_int("n", "n_shadow_models", "n_pool", "batch_size")
        self._positive("epochs", "lr")
        if int(self.params["n_pool"]) < 4:
            raise ConfigError(f"{self.name}: n_pool must be at least 4 images, got {self.params['n_pool']}")
        ls = self.params["label_smoothing"]
        if ls is not None and not (isinstance(ls, (int, float)) and 0 <= float(ls) < 1):
            raise ConfigError(f"{self.name}: label_smoothing must be in [0, 1), got {self.params['label_smoothing']}")

    def _smoothing(self, ctx) -> float:
        ls = self.params["label_smoothing"]
        return float(ctx.train_label_smoothing if ls is None else ls)

    def _key(self, ctx):
        p = self.params
        return ("shadow_mia", int(p["n_shadow_models"]), int(p["n_pool"]), float(p["epochs"]), float(p["lr"]),
                int(p["batch_size"]), self._smoothing(ctx))

    def is_prepared(self, ctx) -> bool:
        return self._key(ctx) in ctx.cache

    def prepare(self, ctx, stop=None, progress=None) -> float:
        key = self._key(ctx)
        if key in ctx.cache:
            return 0.0
        t0 = time.perf_counter()
        p = self.params
        g = ctx.generator("shadow_mia")
        n_pool = min(int(p["n_pool"]), len(ctx.shadow_y))
        if n_pool < 4:
            raise ConfigError(f"{self.name}: the shadow pool has {len(ctx.shadow_y)} images; at least 4 are needed")
        x_pool, y_pool = ctx.shadow_x[:n_pool], ctx.shadow_y[:n_pool]
        k = int(p["n_shadow_models"])
        feats, labels, shadow_acc = [], [], []
        amp = ctx.autocast_dtype()
        for i in range(k):
            if stop is not None and stop.is_set():
                break
            perm = torch.randperm(n_pool, generator=g).to(x_pool.device)
            half = n_pool // 2
            idx_in, idx_out = perm[:half], perm[half:2 * half]
            with seeded(ctx.seed * 7919 + i, ctx.device):  # the shadow model's initialisation
                m = ctx.build_model()
            sub = None if progress is None else (
                lambda f, msg, i=i: progress((i + f) / k, f"shadow model {i + 1}/{k}: {msg}"))
            fit(m, x_pool[idx_in], y_pool[idx_in], epochs=float(p["epochs"]), lr=float(p["lr"]),
                batch_size=int(p["batch_size"]), seed=ctx.seed + i, label_smoothing=self._smoothing(ctx),
                amp_dtype=amp, stop=stop, progress=sub, what="shadow training")
            lp_in = log_softmax_outputs(m, x_pool[idx_in])
            lp_out = log_softmax_outputs(m, x_pool[idx_out])
            shadow_acc.append(((lp_in.argmax(1) == y_pool[idx_in].to(lp_in.device)).float().mean().item(),
                               (lp_out.argmax(1) == y_pool[idx_out].to(lp_out.device)).float().mean().item()))
            feats += [attack_features(lp_in).cpu(), attack_features(lp_out).cpu()]
            labels += [torch.ones(half), torch.zeros(half)]
        if not feats:  # stopped before any shadow model
            return time.perf_counter() - t0
        x, y = torch.cat(feats), torch.cat(labels)
        clf = LogisticRegression().fit(x, y)
        s = clf.decision(x)
        ctx.cache[key] = {"clf": clf, "shadow_auc": roc_auc(s[y == 1], s[y == 0]),
                          "shadow_train_acc": sum(a for a, _ in shadow_acc) / len(shadow_acc),
                          "shadow_test_acc": sum(b for _, b in shadow_acc) / len(shadow_acc),
                          "n_shadow_models": len(shadow_acc), "label_smoothing": self._smoothing(ctx),
                          "seconds": time.perf_counter() - t0}
        return ctx.cache[key]["seconds"]

    def compute(self, model, ctx, stop=None, progress=None):
        shared = ctx.cache.get(self._key(ctx))
        if shared is None:  # stopped while preparing
            return None, {"skipped": "stopped before the shadow models were trained"}
        n = int(self.params["n"])
        lp_in, lp_out = ctx.log_probs(model, "members", n), ctx.log_probs(model, "nonmembers", n)
        clf = shared["clf"]
        s_in, s_out = clf.decision(attack_features(lp_in)), clf.decision(attack_features(lp_out))
        auc = roc_auc(s_in, s_out)
        acc = 0.5 * ((s_in > 0).double().mean().item() + (s_out <= 0).double().mean().item())
        raw = {"auc": auc, "advantage": advantage(s_in, s_out), "balanced_accuracy": acc,
               "predicted_members_in": (s_in > 0).double().mean().item(),
               "predicted_members_out": (s_out > 0).double().mean().item(),
               **{k: v for k, v in shared.items() if k not in ("clf", "seconds")},
               "shared_seconds": shared["seconds"], "n_members": len(lp_in), "n_nonmembers": len(lp_out)}
        return auc, raw
