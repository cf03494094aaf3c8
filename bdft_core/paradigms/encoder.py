"""Encoder-based paradigm: a self-supervised encoder (SimCLR, pretrained on unlabeled upstream
images) is backdoored with BadEncoder (Jia et al., IEEE S&P 2022) and published; a victim trains a
linear probe on its own labelled downstream data over the frozen encoder; the defender fine-tunes
the whole encoder and head on a clean share of its downstream data (FT or SFT).

Who sees what (:func:`encoder_setting`):

- the attacker: the clean encoder, a seeded "shadow" subset of the upstream training images
  (unlabeled), and ``n_refs`` downstream images of the target class, taken from the back of a seeded
  permutation of the downstream training set;
- the victim and defender: the rest of the downstream training set (the defender's clean data is its
  front), never the references;
- test: the downstream test set. ASR: triggered downstream test images whose true class is not the
  target.

The clean encoder is the project's shipped one (``assets/encoder_cifar10.safetensors``, made by
``python -m bdft_core pretrain-encoder``) unless ``paradigm_params["encoder"]`` names another file."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..attacks import build_attack
from ..data import Splits
from ..device import describe_device
from ..errors import ConfigError
from ..metrics import Evaluator
from ..runs import Run, new_run_id


# BadEncoder's paper uses a 10x10 white patch on 32x32 images (scaled for other sizes); a 3x3 one
# (BadNets' default) is too small for the encoder to map onto the references reliably (ASR 0.62 with
# 6x6 in our trials)
def trigger_defaults(attack: str, image_shape) -> dict:
    if str(attack).lower() == "badnets":
        return {"size": max(3, round(10 / 32 * min(image_shape[1:])))}
    return {}


@dataclass
class EncoderSetting:
    setting: object  # pipeline.Setting on the downstream data (pool = the victim's training indices)
    shadow: torch.Tensor  # uint8 upstream images the attacker fine-tunes on
    refs_idx: torch.Tensor  # downstream training indices of the attacker's reference images
    victim_idx: torch.Tensor
    params: dict


def encoder_setting(cfg) -> EncoderSetting:
    from ..pipeline import Setting, keep_trigger_image
    from . import check_paradigm_params, load_up_and_down, references_from_the_back

    keep_trigger_image(cfg)  # a trigger image file is copied into the runs folder, as for standalone runs
    p = check_paradigm_params(cfg)
    device, up, down = load_up_and_down(cfg, cfg.downstream or "gtsrb", "the encoder")
    if cfg.mode != "all_to_one":
        raise ConfigError("BadEncoder aims at one downstream target class: use mode all_to_one")
    g = torch.Generator().manual_seed(cfg.seed + 11)
    shadow = up.x_train[torch.randperm(len(up.y_train), generator=g)[: int(p["shadow_size"])].to(device)]
    splits = Splits(len(down.y_train), cfg.seed)
    refs_idx, victim_idx = references_from_the_back(down, splits.order().to(device), cfg.target, int(p["n_refs"]))
    if len(refs_idx) == 0:
        raise ConfigError(f"the downstream dataset has no training images of target class {cfg.target}")
    params = {**trigger_defaults(cfg.attack, down.image_shape), **cfg.params}
    attack = build_attack(cfg.attack, down.image_shape, down.num_classes, target=cfg.target, mode=cfg.mode,
                          seed=cfg.seed, **params)
    x_bd, y_bd = attack.test_set(down.x_test, down.y_test)
    ev = Evaluator(down.x_test, down.y_test, x_bd, y_bd, seed=cfg.seed)
    s = Setting(cfg, device, down, attack, splits, ev, pool=victim_idx)
    return EncoderSetting(s, shadow, refs_idx, victim_idx, p)


def _probe(model, es: EncoderSetting, epochs: int, seed: int):
    """The victim's linear probe on the frozen encoder; sets ``model.classifier``; returns its figures."""
    from ..ssl import linear_probe

    s = es.setting
    res = linear_probe(model, s.data.x_train[es.victim_idx], s.data.y_train[es.victim_idx], epochs=epochs,
                       seed=seed, num_classes=s.data.num_classes)
    model.classifier = res["head"].to(s.device)
    model.eval()
    return {**s.evaluator(model), "probe_seconds": res["seconds"]}


def encoder_models(cfg, store=None, callbacks=(), stop=None, on_stage=None):
    """Clean encoder + victim probe (the baseline), then BadEncoder + victim probe (the poisoned
    model, stored as an attack run). Returns ``(es, out, run, model)``."""
    from ..ssl import badencoder, load_encoder

    t0 = time.perf_counter()
    es = encoder_setting(cfg)
    s, p = es.setting, es.params
    stage = on_stage or (lambda name: None)
    stage("clean_probe")
    clean = load_encoder(p["encoder"] or None, device=s.device)
    spec = {**clean.encoder_spec, "num_classes": s.data.num_classes}
    baseline = _probe(clean, es, int(p["probe_epochs"]), cfg.seed)
    stage("attack")
    refs = s.data.x_train[es.refs_idx]
    t_bad = time.perf_counter()
    bad = badencoder(clean, es.shadow, refs, s.attack.apply, epochs=float(p["bad_epochs"]), lr=float(p["bad_lr"]),
                     batch_size=int(p["bad_batch"]), lambda1=float(p["lambda1"]), lambda2=float(p["lambda2"]),
                     seed=cfg.seed, callbacks=callbacks, stop=stop)
    bad_s = time.perf_counter() - t_bad
    stage("victim_head")
    victim = _probe(bad, es, int(p["probe_epochs"]), cfg.seed)
    hist = [{"step": h["step"], "epoch": h["epoch"], "loss": h["loss"], "cos_trigger_ref": h["cos_trigger_ref"],
             "cos_clean": h["cos_clean"]} for h in getattr(bad, "badencoder_history", [])]
    stopped = bool(getattr(bad, "badencoder_stopped", False))
    run = Run(id=new_run_id("attack"), kind="attack", created=time.time(), dataset=s.data.name, model=spec,
              attack={**s.attack.config(), "title": "BadEncoder: " + s.attack.title,
                      "paper": "Jia et al. 2022, BadEncoder, IEEE S&P", "n_refs": len(es.refs_idx),
                      "poison_rate": None},
              config={**asdict(cfg), "paradigm_params": p, "stage": "BadEncoder + victim's linear probe",
                      "n_victim": len(es.victim_idx), "n_shadow": len(es.shadow),
                      "encoder": getattr(clean, "encoder_record", {}).get("command", p.get("encoder") or "shipped encoder")},
              seed=cfg.seed, device=describe_device(s.device), status="stopped" if stopped else "finished",
              history=hist, final={"clean_acc": victim["clean_acc"], "asr": victim["asr"],
                                   "clean_encoder": {"clean_acc": baseline["clean_acc"], "asr": baseline["asr"]}},
              timings={"total_s": time.perf_counter() - t0, "badencoder_s": bad_s})
    if store is not None:
        store.save(run, bad)
    out = {"dataset": cfg.dataset, "downstream": s.data.name, "paradigm": "encoder", "attack": cfg.attack,
           "model": spec["name"], "device": run.device, "run_id": run.id,
           "clean_encoder": {"clean_acc": baseline["clean_acc"], "asr": baseline["asr"]},
           "poisoned": {"clean_acc": victim["clean_acc"], "asr": victim["asr"], "seconds": run.timings["total_s"],
                        "run_id": run.id},
           "defended": {}}
    return es, out, run, bad


def run_encoder(cfg, defenses=("ft", "sft"), clean_fraction: float = 0.05, store=None, callbacks=(), stop=None,
                on_stage=None, train_over=None) -> dict:
    """:func:`encoder_models`, then each defense on the poisoned model. Returns a dict shaped like
    ``run_demo``'s, plus ``clean_encoder`` (the victim's figures on the clean encoder)."""
    from ..pipeline import run_defense, story_stopped

    t0 = time.perf_counter()
    es, out, run, bad = encoder_models(cfg, store, callbacks, stop, on_stage)
    s = es.setting
    stage = on_stage or (lambda name: None)
    out["clean_fraction"] = clean_fraction
    for name in defenses:
        if stop is not None and stop.is_set():
            break
        stage(name)
        d_run, _ = run_defense(run, name, clean_fraction=clean_fraction, store=store, callbacks=callbacks, stop=stop,
                               model=bad, setting=s, train_over=train_over)
        out["defended"][name] = {"clean_acc": d_run.final["clean_acc"], "asr": d_run.final["asr"],
                                 "seconds": d_run.timings["total_s"], "run_id": d_run.id,
                                 "stopped": d_run.status == "stopped"}
    out["stopped"] = story_stopped([run.status == "stopped"], out["defended"], defenses)
    out["seconds"] = time.perf_counter() - t0
    return out


__all__ = ["EncoderSetting", "encoder_models", "encoder_setting", "run_encoder"]
