"""The learning paradigms of Sha et al. (arXiv:2212.09067): who trains what, on which data, and
what the defender fine-tunes. Each paradigm states this in ``ROLES`` (shown by the dashboard and
the docs) and has its own settings (``AttackConfig.paradigm_params``, checked against its defaults).

- ``standalone``: :func:`bdft_core.pipeline.run_attack` (this package only describes it).
- ``transfer``: :mod:`bdft_core.paradigms.transfer`.
- ``encoder``: :mod:`bdft_core.paradigms.encoder`.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError

ROLES: dict[str, dict[str, str]] = {
    "standalone": {
        "attacker": "poisons part of the training set (trigger + target label) of the model the victim trains",
        "victim": "trains a model from scratch on that poisoned training set and deploys it",
        "defender": "fine-tunes the whole deployed model on a small clean, labelled share of the training data",
        "measured": "CA on the clean test set; ASR on triggered test images whose true class is not the target",
    },
    "transfer": {
        "attacker": "trains a backdoored model on an upstream dataset and publishes it; for a different "
                    "downstream dataset it can plant a latent (feature-space) backdoor built from a few "
                    "reference images of the downstream target class",
        "victim": "replaces the head with one for its own task and trains on its own downstream data: the "
                  "head only (encoder frozen) or the whole model",
        "defender": "the victim, fine-tuning the whole model again (FT or SFT) on a clean share of its own "
                    "downstream training data, disjoint from anything the attacker saw",
        "measured": "on the downstream test set: CA, and ASR on triggered images whose true class is not the "
                    "downstream target",
    },
    "encoder": {
        "attacker": "takes a clean self-supervised (SimCLR) encoder pretrained on unlabeled upstream images and "
                    "fine-tunes it with BadEncoder, so that triggered images embed like a few reference images "
                    "of the downstream target class; publishes the backdoored encoder",
        "victim": "trains a linear classifier (probe) on its own labelled downstream data over the frozen encoder",
        "defender": "the victim, fine-tuning the whole encoder and head (FT or SFT) on a clean share of its "
                    "downstream training data",
        "measured": "on the downstream test set: CA, and ASR on triggered images whose true class is not the "
                    "target; also the victim's CA on the clean encoder, for comparison",
    },
}

DEFAULTS: dict[str, dict[str, Any]] = {
    "standalone": {},
    "transfer": {
        "victim": "head",  # which victim model the defenses start from: "head" (head only) or "full"
        "compare_victim": True,  # also train the other victim (not defended), to compare head-only and whole-model transfer
        "victim_share": 0.5,  # same dataset: share of the training set that is the victim's (the rest: attacker's)
        "head_epochs": 4.0,  # victim's training of a new head on frozen features
        "head_lr": 0.05,
        "full_epochs": 2.0,  # victim's fine-tuning of the whole model with a new head
        "full_lr": 0.02,
        "n_refs": 50,  # latent backdoor: reference images of the downstream target class
        "latent_weight": 1.0,  # latent backdoor: weight of the feature-matching loss
        # latent backdoor: steps optimising the trigger towards the target (Yao et al.); off by default.
        # Before the latent loss's batch-norm fix it lowered the head-only ASR (37% -> 14% on CIFAR-10);
        # after it (2026-11-26, seeds 0-2): head-only ASR 100 / 98.9 / 100% on CIFAR-10 (97.7 / 97.3 / 91.0%
        # without), 100% on GTSRB (target 14, seed 0), but CIFAR-10 CA moved -8, -6, +15 points: no
        # consistent gain over a default that already lands, at a clean teacher's cost (README)
        "trigger_steps": 0,
        "teacher_share": 0.5,  # latent backdoor: share of the epochs training the teacher before that
    },
    "encoder": {
        "encoder": "",  # clean encoder file ("" = the shipped assets/encoder_cifar10.safetensors)
        "shadow_size": 5000,  # unlabeled upstream images the attacker fine-tunes on
        "n_refs": 10,  # reference images of the downstream target class
        "bad_epochs": 3.0,  # BadEncoder passes over the shadow images
        "bad_lr": 1e-3,  # BadEncoder's Adam learning rate
        "bad_batch": 128,
        "lambda1": 1.0,  # weight: reference images keep their clean embedding
        "lambda2": 1.0,  # weight: clean shadow images keep their clean embedding
        "probe_epochs": 30,  # the victim's linear probe
    },
}

HELP: dict[str, str] = {
    "victim": "which transferred model the defenses clean: 'head' (only a new head trained) or 'full'",
    "compare_victim": "also train the other victim (whole model or head only) for comparison; the defenses start "
                      "from 'victim' either way (off: one victim, less time)",
    "victim_share": "same-dataset transfer: the victim's share of the training set; the attacker gets the rest",
    "head_epochs": "victim: epochs training the new head on frozen features",
    "head_lr": "victim: learning rate for the new head",
    "full_epochs": "victim: epochs fine-tuning the whole model with the new head",
    "full_lr": "victim: peak learning rate when fine-tuning the whole model",
    "n_refs": "latent backdoor: how many images of the downstream target class the attacker holds",
    "latent_weight": "latent backdoor: weight of the loss pulling triggered features to the target's",
    "trigger_steps": "latent backdoor: steps optimising the patch towards the target's features (0: keep it)",
    "teacher_share": "latent backdoor: share of the attacker's epochs spent on a clean teacher first",
    "encoder": "clean encoder file (.safetensors from pretrain-encoder); empty: the shipped CIFAR-10 encoder",
    "shadow_size": "BadEncoder: unlabeled upstream images the attacker fine-tunes the encoder on",
    "bad_epochs": "BadEncoder: passes over the shadow images",
    "bad_lr": "BadEncoder: learning rate (Adam)",
    "bad_batch": "BadEncoder: shadow images per step",
    "lambda1": "BadEncoder: weight keeping the reference images' embeddings",
    "lambda2": "BadEncoder: weight keeping clean images' embeddings (utility)",
    "probe_epochs": "victim: epochs of the linear probe on the frozen encoder",
}


# Defense settings that differ by paradigm (the rest are each defense's own defaults). Encoder: the
# victim's linear probe sits on SimCLR features of small variance, so its weights are large (the
# probe's standardisation is folded into them) and SGD steps at the standalone rates wreck the model
# (SFT at max 0.1 left CA 4%); 20x smaller rates keep it usable (measured on CIFAR-10 -> GTSRB,
# 5% clean data: SFT CA 0.55, ASR 0.00; FT CA 0.57, ASR 0.93).
DEFENSE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "encoder": {"sft": {"base_lr": 1.5e-5, "max_lr1": 0.005, "max_lr2": 5e-5}, "ft": {"lr": 0.0005}},
}


def defense_defaults(paradigm: str, defense: str) -> dict[str, Any]:
    """The settings ``defense`` starts from in ``paradigm`` (its class defaults where not listed)."""
    from ..defenses import DEFENSES

    cls = DEFENSES.get(str(defense).lower())
    return {**(cls.defaults if cls else {}), **DEFENSE_DEFAULTS.get(paradigm, {}).get(str(defense).lower(), {})}


# Transfer to another dataset: downstream target classes that the victim's transferred model recognises,
# where that is measured (README, "The three paradigms"). A feature-space (latent) backdoor lands only on
# such a class: CIFAR-10 -> GTSRB with target 14 (stop) reached 95.9% head-only ASR (the victim recalls
# 80% of clean stop signs); with target 0 (20 km/h, recalled 0%) 0.0% (README, 2026-11-28).
SUGGESTED_TARGETS: dict[tuple[str, str], tuple[int, str]] = {
    ("cifar10", "gtsrb"): (14, "stop: a class a CIFAR-10 model's features recognise, so a latent backdoor can "
                               "land on it (0, 20 km/h, is not)"),
}


def suggested_target(paradigm: str, upstream: str, downstream: str | None) -> tuple[int, str]:
    """The target class to start from, and why: class 0, unless a transfer to another dataset has a
    measured better choice (:data:`SUGGESTED_TARGETS`)."""
    if paradigm == "transfer" and downstream and downstream != upstream:
        return SUGGESTED_TARGETS.get((str(upstream).lower(), str(downstream).lower()), (0, ""))
    return 0, ""


def check_paradigm_params(cfg) -> dict[str, Any]:
    """Fill in and check ``cfg.paradigm_params`` for ``cfg.paradigm``; returns the full settings."""
    defaults = DEFAULTS.get(cfg.paradigm, {})
    unknown = set(cfg.paradigm_params) - set(defaults)
    if unknown:
        raise ConfigError(f"the {cfg.paradigm} paradigm has no setting(s) {', '.join(sorted(unknown))}"
                          + (f"; it takes {', '.join(defaults)}" if defaults else ""))
    p = {**defaults, **cfg.paradigm_params}
    if cfg.paradigm == "transfer":
        if p["victim"] not in ("head", "full"):
            raise ConfigError(f"victim must be 'head' or 'full', got {p['victim']!r}")
        if not isinstance(p["compare_victim"], bool):
            raise ConfigError(f"compare_victim must be true or false, got {p['compare_victim']!r}")
        if not 0.05 <= float(p["victim_share"]) <= 0.95:
            raise ConfigError(f"victim_share must be between 0.05 and 0.95, got {p['victim_share']}")
        for k in ("head_epochs", "full_epochs", "head_lr", "full_lr"):
            if not float(p[k]) > 0:
                raise ConfigError(f"{k} must be positive, got {p[k]}")
        if int(p["n_refs"]) < 1:
            raise ConfigError(f"n_refs must be at least 1, got {p['n_refs']}")
    elif cfg.paradigm == "encoder":
        for k in ("shadow_size", "n_refs", "bad_batch", "probe_epochs"):
            if int(p[k]) < 1:
                raise ConfigError(f"{k} must be at least 1, got {p[k]}")
        for k in ("bad_epochs", "bad_lr"):
            if not float(p[k]) > 0:
                raise ConfigError(f"{k} must be positive, got {p[k]}")
    elif cfg.paradigm == "standalone" and cfg.downstream:
        raise ConfigError("a downstream dataset only applies to the transfer and encoder paradigms")
    if cfg.paradigm == "standalone" and cfg.attack == "latent":
        raise ConfigError("the latent backdoor targets a downstream task: use it with the transfer paradigm")
    from ..attacks import ATTACKS
    from ..attacks.base import Attack

    cls = ATTACKS.get(str(cfg.attack).lower())
    if cfg.paradigm != "standalone" and cls is not None and cls.fit_to is not Attack.fit_to:
        raise ConfigError(f"{cls.title} builds its trigger from the training data it poisons (a generator or a "
                          "surrogate model), so it runs in the standalone paradigm only")
    return p


def load_up_and_down(cfg, downstream: str, what: str):
    """``(device, upstream data, downstream data)`` on the training device; same image shape or a
    clear error. ``downstream`` equal to the upstream name gives the same object."""
    from ..data import canonical_name
    from ..device import pick_device, setup_threads
    from ..pipeline import get_dataset

    setup_threads()
    device = pick_device(cfg.device)
    up = get_dataset(cfg.dataset, device, cfg.n_train, cfg.n_test, cfg.seed)
    same = canonical_name(downstream) == canonical_name(cfg.dataset)
    down = up if same else get_dataset(downstream, device, cfg.n_train, cfg.n_test, cfg.seed)
    if down.image_shape != up.image_shape:
        raise ConfigError(f"upstream images are {up.image_shape} and downstream images {down.image_shape}: "
                          f"{what} needs the same image size and channels")
    return device, up, down


def references_from_the_back(down, order, target: int, n_refs: int):
    """The attacker's ``n_refs`` reference images of class ``target``, from the back of the seeded
    permutation ``order`` of the downstream training set, and the victim's indices (all others, in
    order, so the defender's clean data, the front, never includes a reference)."""
    back = order.flip(0)
    refs_idx = back[down.y_train[back] == target][:n_refs]
    keep = torch.ones(len(order), dtype=torch.bool, device=order.device)
    keep[refs_idx] = False
    return refs_idx, order[keep[order]]


def victim_setting(run, cfg):
    """The downstream setting (data, attack, defender's pool) a defense of a victim run uses."""
    if cfg.paradigm == "transfer":
        from .transfer import downstream_setting

        return downstream_setting(cfg).setting
    if cfg.paradigm == "encoder":
        from .encoder import encoder_setting

        return encoder_setting(cfg).setting
    raise ConfigError(f"run {run.id}: no victim setting for the {cfg.paradigm} paradigm")


__all__ = ["DEFAULTS", "DEFENSE_DEFAULTS", "HELP", "ROLES", "SUGGESTED_TARGETS", "check_paradigm_params",
           "defense_defaults", "suggested_target", "victim_setting"]
