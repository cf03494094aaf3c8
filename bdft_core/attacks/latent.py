"""Latent backdoor: a patch trigger planted in the feature space, aimed at a downstream class.

Yao, Li, Zheng and Zhao, "Latent Backdoor Attacks on Deep Neural Networks", ACM CCS 2019.

The trigger itself is a BadNets-style patch (same settings); what makes the backdoor "latent" is how
the attacker trains the upstream model (:mod:`bdft_core.paradigms.transfer`): a few reference images
of the victim's downstream target class join the upstream training set as an extra class, triggered
images are labelled with that class, and a feature-matching loss pulls the penultimate features of
triggered images onto the mean features of the references. The extra class is then dropped from the
head, so the published model shows no trace of it; a victim who puts a new head on the features
inherits the rule "trigger -> target features". Used only with the transfer paradigm."""
from __future__ import annotations

from .badnets import BadNets


class Latent(BadNets):
    name = "latent"
    title = "Latent backdoor (feature space, transfer)"
    paper = "Yao et al. 2019, Latent Backdoor Attacks on Deep Neural Networks, ACM CCS"
    latent = True
