"""Model stealing (knockoff): query the model on images the attacker has, train a copy on its
answers, and measure how often the copy agrees with the model on unseen images (fidelity).

Orekondy, Schiele and Fritz, "Knockoff Nets: Stealing Functionality of Black-Box Models", CVPR 2019
(arXiv:1812.02766).

Here: ``budget`` queries, the first images of the attacker's pool (``ctx.shadow_x``: same
distribution, disjoint from the test images; Knockoff Nets also study queries from other
distributions); the copy is a fresh model of the same architecture (``ctx.build_model()``, the
same initialisation for every model evaluated), trained for ``epochs`` passes on the model's softmax
outputs (``labels="soft"``: cross-entropy against the posterior, as Knockoff Nets do) or on its
top-1 labels (``labels="hard"``: an API that returns labels only). Headline: fidelity, the share of
``n_eval`` test images where copy and model predict the same class (1/classes = chance); ``raw``
also has the copy's and the model's accuracy.

Defaults (2,000 queries, 4 epochs, fidelity on 1,000 test images): about 8,000 image-passes of
training per model, 10-25 s for fastnet on a 2-core CPU; the copy reaches about 0.45 accuracy and
0.5 fidelity on CIFAR-10. A longer training or a larger budget raises every model's fidelity; the
comparison between models (same queries, same initial copy) is what matters.

Needs: query access to the model (outputs only, black box) and unlabelled images of the domain."""
from __future__ import annotations

from ..errors import ConfigError
from .base import Axis, fit, log_softmax_outputs, seeded


class Stealing(Axis):
    name = "stealing"
    title = "Model stealing (knockoff)"
    paper = "Orekondy et al. 2019, Knockoff Nets: Stealing Functionality of Black-Box Models, CVPR (arXiv:1812.02766)"
    meaning = ("How closely a copy trained only on the model's answers to a few thousand queries imitates it "
               "(agreement on unseen images).")
    unit = "fidelity"
    range = (0.0, 1.0)
    defaults = {"budget": 2000, "labels": "soft", "epochs": 4.0, "lr": 0.1, "batch_size": 128, "n_eval": 1000}
    choices = {"labels": ("soft", "hard")}
    help = {"budget": "queries (images sent to the model)",
            "labels": "'soft': train on the softmax outputs; 'hard': on the top-1 labels only",
            "epochs": "passes of the copy's training over the queries",
            "lr": "peak learning rate of the copy (warm-up then linear decay)",
            "batch_size": "images per training step", "n_eval": "test images on which agreement is measured"}
    needs_model_factory = True

    def validate(self):
        self._positive_int("budget", "batch_size", "n_eval")
        self._positive("epochs", "lr")
        if self.params["labels"] not in self.choices["labels"]:
            raise ConfigError(f"{self.name}: labels must be 'soft' or 'hard', got {self.params['labels']!r}")

    def compute(self, model, ctx, stop=None, progress=None):
        p = self.params
        budget = min(int(p["budget"]), len(ctx.shadow_y))
        if budget < 1:
            return None, {"skipped": "the attacker's pool is empty"}
        xq = ctx.shadow_x[:budget]
        lp_q = log_softmax_outputs(model, xq, amp_dtype=ctx.autocast_dtype())  # the victim's answers
        target = lp_q.exp() if p["labels"] == "soft" else lp_q.argmax(1)
        with seeded(ctx.seed * 7919 + 101, ctx.device):  # the same initial copy for every model
            copy_model = ctx.build_model()
        res = fit(copy_model, xq, target, epochs=float(p["epochs"]), lr=float(p["lr"]),
                  batch_size=int(p["batch_size"]), seed=ctx.seed, amp_dtype=ctx.autocast_dtype(), stop=stop,
                  progress=None if progress is None else (lambda f, msg: progress(0.9 * f, msg)),
                  what="training the copy")
        n = min(int(p["n_eval"]), len(ctx.y_test))
        victim = ctx.log_probs(model, "test", n).argmax(1).cpu()
        copy_pred = log_softmax_outputs(copy_model, ctx.x_test[:n], amp_dtype=ctx.autocast_dtype()).argmax(1).cpu()
        y = ctx.y_test[:n].cpu()
        fidelity = (victim == copy_pred).double().mean().item()
        raw = {"fidelity": fidelity, "copy_acc": (copy_pred == y).double().mean().item(),
               "victim_acc": (victim == y).double().mean().item(), "queries": budget, "labels": p["labels"],
               "chance": 1.0 / max(1, int(ctx.num_classes)), "copy_steps": res["steps"],
               "copy_seconds": res["seconds"], "n_eval": n}
        return fidelity, raw
