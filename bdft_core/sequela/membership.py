"""Threshold membership inference: does the model treat the images it was trained on differently
from unseen ones? One score per image, "member" when the score is high; no shadow models.

- ``loss``: minus the cross-entropy on the true label (Yeom, Giacomelli, Fredrikson and Jha,
  "Privacy Risk in Machine Learning: Analyzing the Connection to Overfitting", IEEE CSF 2018,
  arXiv:1709.01604). The true-label confidence p_y ranks images exactly as the loss does (same AUC),
  so it is not listed separately.
- ``confidence``: the largest softmax probability (label-free; Salem et al., "ML-Leaks", NDSS 2019).
- ``entropy``: minus the prediction entropy (label-free).
- ``mentropy``: minus the modified entropy of Song and Mittal, "Systematic Evaluation of Privacy
  Risks of Machine Learning Models", USENIX Security 2021 (arXiv:2003.10595), which uses the label:
  Mentr = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i).

For each score: the ROC AUC (members vs non-members) and the membership advantage max(TPR - FPR)
with the best threshold in hindsight (an upper bound for a threshold attacker; Song and Mittal learn
class-wise thresholds on shadow data instead). Headline: the best AUC over the four scores (0.5 =
nothing leaks, 1 = every member recognised).

Needs: images the model was trained on (members) and unseen images of the same distribution;
outputs only (black box). Members are the attack run's clean training images outside the defender's
split, so a defended model is asked about the data of its original training."""
from __future__ import annotations

import torch

from .base import Axis, advantage, roc_auc

SIGNALS = ("loss", "confidence", "entropy", "mentropy")


def membership_scores(log_probs: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image scores (higher = more likely a member) from log-softmax outputs and true labels."""
    lp = log_probs.double()
    y = y.to(lp.device).long()
    p = lp.exp()
    lp_y = lp.gather(1, y[:, None]).squeeze(1)
    p_y = p.gather(1, y[:, None]).squeeze(1)
    ent = -(p * lp).sum(1)
    log_1mp = torch.log1p(-p.clamp(max=1 - 1e-15))  # log(1 - p_i)
    other = p * log_1mp
    other = other.sum(1) - other.gather(1, y[:, None]).squeeze(1)
    mentr = -(1 - p_y) * lp_y - other
    return {"loss": lp_y, "confidence": p.max(1).values, "entropy": -ent, "mentropy": -mentr}


class ThresholdMIA(Axis):
    name = "membership"
    title = "Membership inference (threshold)"
    paper = ("Yeom et al. 2018, Privacy Risk in ML, IEEE CSF (arXiv:1709.01604); Song & Mittal 2021, Systematic "
             "Evaluation of Privacy Risks of ML Models, USENIX Security (arXiv:2003.10595)")
    meaning = "How well an attacker tells the model's training images from unseen ones by its loss or confidence alone."
    unit = "AUC"
    range = (0.5, 1.0)
    defaults = {"n": 1000}
    help = {"n": "members and non-members scored (each)"}

    def validate(self):
        self._positive_int("n")

    def compute(self, model, ctx, stop=None, progress=None):
        n = int(self.params["n"])
        lp_in = ctx.log_probs(model, "members", n)
        lp_out = ctx.log_probs(model, "nonmembers", n)
        y_in, y_out = ctx.members_y[: len(lp_in)], ctx.nonmembers_y[: len(lp_out)]
        s_in, s_out = membership_scores(lp_in, y_in), membership_scores(lp_out, y_out)
        raw = {}
        for k in SIGNALS:
            raw[f"{k}_auc"] = roc_auc(s_in[k], s_out[k])
            raw[f"{k}_advantage"] = advantage(s_in[k], s_out[k])
        best = max(SIGNALS, key=lambda k: raw[f"{k}_auc"])
        acc_in = (lp_in.argmax(1).cpu() == y_in.cpu()).double().mean().item()
        acc_out = (lp_out.argmax(1).cpu() == y_out.cpu()).double().mean().item()
        raw.update({"best_signal": best, "auc": raw[f"{best}_auc"],
                    "advantage": max(raw[f"{k}_advantage"] for k in SIGNALS),
                    "train_acc": acc_in, "test_acc": acc_out, "generalization_gap": acc_in - acc_out,
                    "n_members": len(lp_in), "n_nonmembers": len(lp_out)})
        return raw["auc"], raw
