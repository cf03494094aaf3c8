"""Calibration: does the model's confidence match how often it is right? Expected calibration error
(ECE) with equal-width confidence bins.

Guo, Pleiss, Sun and Weinberger, "On Calibration of Modern Neural Networks", ICML 2017
(arXiv:1706.04599).

ECE = sum over bins b of |B_b| / n * |accuracy(B_b) - mean confidence(B_b)|, where a prediction's
confidence is its largest softmax probability and bin b holds confidences in (b/15, (b+1)/15]
(a confidence of exactly 0 goes to the first bin). ``raw`` also has the maximum calibration error
(MCE, the worst bin), the accuracy, the mean confidence and overconfidence = confidence - accuracy.

Not an attack: a miscalibrated model's confidence misleads whoever relies on it (and confidence
gaps are what membership inference feeds on); higher ECE = worse, so it sits on the radar with the
attacks, on a fixed 0..0.3 scale.

Needs: outputs on labelled test images."""
from __future__ import annotations

import torch

from .base import Axis


def calibration_errors(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """ECE, MCE, accuracy and mean confidence of softmax ``probs`` (N, C) against labels ``y``."""
    probs = torch.as_tensor(probs, dtype=torch.float64).cpu()
    y = torch.as_tensor(y).cpu().long()
    conf, pred = probs.max(1)
    hit = (pred == y).double()
    n = len(y)
    # bin b = (b/n_bins, (b+1)/n_bins]: ceil(conf * n_bins) - 1, with 0 in the first bin
    b = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    ece, mce = 0.0, 0.0
    for k in range(n_bins):
        m = b == k
        cnt = int(m.sum())
        if cnt == 0:
            continue
        gap = abs(hit[m].mean().item() - conf[m].mean().item())
        ece += cnt / n * gap
        mce = max(mce, gap)
    acc, mc = hit.mean().item(), conf.mean().item()
    return {"ece": ece, "mce": mce, "accuracy": acc, "mean_confidence": mc, "overconfidence": mc - acc,
            "n": n, "n_bins": n_bins}


class Calibration(Axis):
    name = "calibration"
    title = "Miscalibration (ECE)"
    paper = "Guo et al. 2017, On Calibration of Modern Neural Networks, ICML (arXiv:1706.04599)"
    meaning = "How far the model's confidence is from how often it is actually right (expected calibration error)."
    unit = "ECE"
    range = (0.0, 0.3)
    defaults = {"n_bins": 15, "n_eval": 2000}
    help = {"n_bins": "equal-width confidence bins", "n_eval": "test images"}

    def validate(self):
        self._positive_int("n_bins", "n_eval")

    def compute(self, model, ctx, stop=None, progress=None):
        n = int(self.params["n_eval"])
        lp = ctx.log_probs(model, "test", n)
        raw = calibration_errors(lp.exp(), ctx.y_test[: len(lp)], int(self.params["n_bins"]))
        return raw["ece"], raw
