"""Transfer-based paradigm: an attacker publishes a backdoored model trained on an upstream dataset;
a victim puts a new head on it and trains on its own downstream data; the defender (the victim)
fine-tunes again on clean downstream data. Sha et al. (arXiv:2212.09067) note the victim's transfer
is itself a fine-tuning, at no extra cost.

Who sees what (:func:`downstream_setting`):

- same dataset upstream and downstream (e.g. CIFAR-10 -> CIFAR-10): one seeded permutation of the
  training set; its front ``victim_share`` is the victim's, the rest the attacker's. The defender's
  clean data is the front of the victim's part. Disjoint by construction.
- different datasets (e.g. CIFAR-10 -> GTSRB): the attacker trains on the upstream training set and,
  for the latent backdoor, holds ``n_refs`` downstream images of the target class, taken from the back
  of a seeded permutation of the downstream training set; the victim (and defender) get the rest.
- test data: the downstream test set, seen by nobody during training. ASR: triggered downstream test
  images whose true class is not the target.

Plain attacks (BadNets, Blended, ...) poison the upstream labels; the lab reports honestly when they do
not survive a new head. The latent backdoor (:class:`bdft_core.attacks.Latent`) is built to."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import build_attack
from ..data import Splits
from ..device import amp_dtype, describe_device
from ..errors import ConfigError
from ..metrics import Evaluator, accuracy
from ..models import build_model
from ..runs import Run, new_run_id
from ..train import TrainConfig, Trainer


@dataclass
class Downstream:
    setting: object  # pipeline.Setting on the downstream data (pool = the victim's training indices)
    upstream: object  # ImageData
    attacker_idx: torch.Tensor  # upstream training indices the attacker trains on
    victim_idx: torch.Tensor  # downstream training indices the victim trains on (the defender's pool)
    refs_idx: torch.Tensor  # downstream training indices of the attacker's reference images (latent)
    same: bool
    params: dict


def downstream_setting(cfg) -> Downstream:
    from ..pipeline import Setting, keep_trigger_image
    from . import check_paradigm_params, load_up_and_down, references_from_the_back

    keep_trigger_image(cfg)  # a trigger image file is copied into the runs folder, as for standalone runs
    p = check_paradigm_params(cfg)
    device, up, down = load_up_and_down(cfg, cfg.downstream or cfg.dataset, "transfer")
    same = down is up
    latent = getattr(build_attack(cfg.attack, down.image_shape, down.num_classes, target=cfg.target,
                                  mode=cfg.mode, seed=cfg.seed, **cfg.params), "latent", False)
    if cfg.mode != "all_to_one" and latent:
        raise ConfigError("the latent backdoor aims at one downstream target class: use mode all_to_one")
    splits = Splits(len(down.y_train), cfg.seed)
    order = splits.order().to(device)
    if same:
        n_v = int(round(float(p["victim_share"]) * len(order)))
        victim_idx, attacker_idx = order[:n_v], order[n_v:]
        tgt = attacker_idx[up.y_train[attacker_idx] == cfg.target]
        refs_idx = tgt[: int(p["n_refs"])] if latent else tgt[:0]
    else:
        refs_idx, victim_idx = references_from_the_back(down, order, cfg.target, int(p["n_refs"]) if latent else 0)
        attacker_idx = torch.arange(len(up.y_train), device=device)
    if latent and len(refs_idx) == 0:  # the latent loss would average over no reference: NaN, a ruined model
        raise ConfigError(f"the attacker has no training images of target class {cfg.target} to take reference "
                          "images from" + (" (its share of the dataset holds none)" if same else ""))
    attack = build_attack(cfg.attack, down.image_shape, down.num_classes, target=cfg.target, mode=cfg.mode,
                          seed=cfg.seed, **cfg.params)
    x_bd, y_bd = attack.test_set(down.x_test, down.y_test)
    ev = Evaluator(down.x_test, down.y_test, x_bd, y_bd, seed=cfg.seed)
    s = Setting(cfg, device, down, attack, splits, ev, pool=victim_idx)
    return Downstream(s, up, attacker_idx, victim_idx, refs_idx, same, p)


def _figures(run: Run) -> dict:
    out = {"clean_acc": run.final.get("clean_acc"), "asr": run.final.get("asr"),
           "seconds": run.timings.get("total_s"), "run_id": run.id, "stopped": run.status == "stopped"}
    if run.final.get("target_recall") is not None:
        out["target_recall"] = run.final["target_recall"]
    return out


def target_recall(model, setting, cfg) -> float | None:
    """Share of the clean downstream test images *of the target class* that ``model`` calls the target.
    A feature-space backdoor moves triggered images towards the target class's features; where the
    victim's head has (almost) no region for that class, it has nothing to land on. Measured on
    CIFAR-10 -> GTSRB (latent, head-only victim): class 0, a rare speed-limit sign, recall 0% and
    ASR 0.0%; class 14 (stop), recall 80% and ASR 95.9%. None for all-to-all attacks."""
    if cfg.mode != "all_to_one":
        return None
    d = setting.data
    keep = d.y_test == cfg.target
    if not bool(keep.any()):
        return None
    return accuracy(model, d.x_test[keep], d.y_test[keep], amp_dtype=amp_dtype(setting.device))


def latent_loss(model: nn.Module, x: torch.Tensor, attack, refs: torch.Tensor) -> torch.Tensor:
    """The latent backdoor's feature-matching loss: the mean cosine distance between the features of
    triggered images ``attack.apply(x)`` and the mean feature of the target's reference images (images
    in [0, 1]). Cosine distance is bounded and scale-free, so it cannot be won by shrinking all features.

    Clean, triggered and reference images go through the model in one batch, so batch norm (in
    training mode) normalises them with the statistics of a mixed batch. Separate passes normalised
    the triggered images and the references each by their own batch's statistics: features the
    published model never produces. That mistake left the head-only victim's ASR on GTSRB at 2% to 91%
    depending on the seed; with one batch it is 94-96% (README, transfer table)."""
    f = model.features(torch.cat([x, attack.apply(x), refs])).float()
    n = len(x)
    ft, fr = f[n:2 * n], f[2 * n:].mean(0, keepdim=True).detach()
    return (1 - F.cosine_similarity(ft, fr, dim=1)).mean()


def _new_head(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed + 1)
    head = nn.Linear(m.classifier.in_features, num_classes)
    with torch.no_grad():
        bound = 1 / math.sqrt(head.in_features)
        head.weight.copy_(torch.rand(head.weight.shape, generator=g) * 2 * bound - bound)
        head.bias.zero_()
    m.classifier = head.to(next(model.parameters()).device)
    return m


def optimize_trigger(model, x_uint8, refs_uint8, attack, steps: int = 200, batch: int = 128, seed: int = 0):
    """Yao et al.'s trigger generation: within the patch's mask, find the pattern whose features on
    the attacker's images are closest (cosine) to the mean features of the target's references.
    Returns the patch as uint8 (C, s, s), what an image file of the trigger holds."""
    model.eval()
    dev = x_uint8.device
    m = attack.mask.to(dev)
    q = torch.logit(attack.pattern.to(dev).clamp(0.05, 0.95)).requires_grad_(True)
    opt = torch.optim.Adam([q], lr=0.1)
    g = torch.Generator(device=dev).manual_seed(seed + 3)
    with torch.no_grad():
        fr = model.features(refs_uint8.float() / 255.0).mean(0, keepdim=True)
    flags = [p_.requires_grad for p_ in model.parameters()]
    for p_ in model.parameters():
        p_.requires_grad_(False)
    try:
        for _ in range(int(steps)):
            idx = torch.randint(len(x_uint8), (batch,), device=dev, generator=g)
            x = x_uint8[idx].float() / 255.0
            ft = model.features(x * (1 - m) + torch.sigmoid(q) * m)
            loss = (1 - F.cosine_similarity(ft, fr, dim=1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p_, f in zip(model.parameters(), flags):
            p_.requires_grad_(f)
    r0, c0, s = attack.box
    return (torch.sigmoid(q.detach())[:, r0:r0 + s, c0:c0 + s] * 255).round().to(torch.uint8).cpu()


def _save_patch(patch_uint8) -> str:
    """Keep an optimised patch as a trigger image in the runs directory; returns its path."""
    import io

    import numpy as np
    from PIL import Image

    from ..uploads import save_trigger_image

    arr = patch_uint8.permute(1, 2, 0).numpy()
    img = Image.fromarray(np.ascontiguousarray(arr[..., 0] if arr.shape[-1] == 1 else arr))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return str(save_trigger_image(buf.getvalue(), "latent-trigger.png"))


def _retarget(cfg, ds: Downstream) -> None:
    """Rebuild the downstream attack and its triggered test set after the trigger changed."""
    s = ds.setting
    s.attack = build_attack(cfg.attack, s.data.image_shape, s.data.num_classes, target=cfg.target, mode=cfg.mode,
                            seed=cfg.seed, **cfg.params)
    x_bd, y_bd = s.attack.test_set(s.data.x_test, s.data.y_test)
    s.evaluator = Evaluator(s.data.x_test, s.data.y_test, x_bd, y_bd, seed=cfg.seed)


def train_attacker(cfg, ds: Downstream, callbacks=(), stop=None, train_over=None):
    """The attacker's upstream training (plain poisoning, or the latent backdoor). Returns
    ``(run, model)``; the run's figures are on the upstream test set (the attacker's own view).
    With ``trigger_steps`` the optimised trigger replaces ``pattern`` in a copy of ``cfg`` (the
    caller's is left as it was); the record keeps that copy, the whole epoch budget and its
    teacher's share, so the stored run says how it was made."""
    from ..pipeline import DEFAULT_EPOCHS

    t0 = time.perf_counter()
    up, down, p = ds.upstream, ds.setting.data, ds.params
    torch.manual_seed(cfg.seed)
    x_a, y_a = up.x_train[ds.attacker_idx], up.y_train[ds.attacker_idx]
    latent = getattr(ds.setting.attack, "latent", False)
    k_up = up.num_classes
    extra_class = latent and not ds.same
    n_out = k_up + 1 if extra_class else k_up
    target_up = k_up if extra_class else (cfg.target if cfg.target < k_up else 0)
    attack_up = build_attack(cfg.attack, up.image_shape, n_out, target=target_up, mode=cfg.mode, seed=cfg.seed,
                             **cfg.params)
    refs = down.x_train[ds.refs_idx] if latent else None

    def training_set(attack):
        poisoned = attack.poison(x_a, y_a, cfg.poison_rate, Splits(len(y_a), cfg.seed))
        x_tr, y_tr = poisoned.x, poisoned.y
        if extra_class:  # the references join as an extra class, about half a class's worth of copies
            rep = max(1, int(len(y_a) / k_up / 2 / max(1, len(refs))))
            x_tr = torch.cat([x_tr, refs.repeat(rep, 1, 1, 1)])
            y_tr = torch.cat([y_tr, torch.full((len(refs) * rep,), k_up, dtype=y_tr.dtype, device=y_tr.device)])
        return poisoned, x_tr, y_tr

    model = build_model(cfg.model, n_out, up.image_shape[0], **cfg.model_kwargs)
    model.fit_data(x_a.cpu())
    model.to(ds.setting.device)
    epochs = cfg.epochs if cfg.epochs is not None else DEFAULT_EPOCHS.get(up.name, 4.0)
    total_epochs, teacher, teacher_s = epochs, {}, {}
    if latent and int(p["trigger_steps"]) > 0 and hasattr(attack_up, "box"):
        # Yao et al.: a teacher trained without poison (references as the target), a trigger optimised
        # on it towards the target's features, then poisoned training with that trigger
        e1 = epochs * float(p["teacher_share"])
        _, x_t, y_t = training_set(build_attack(cfg.attack, up.image_shape, n_out, target=target_up, mode=cfg.mode,
                                                seed=cfg.seed, **cfg.params))
        x_t, y_t = torch.cat([x_a, x_t[len(y_a):]]), torch.cat([y_a, y_t[len(y_a):]])  # clean labels, no trigger
        tt = TrainConfig(epochs=e1, lr=cfg.lr, batch_size=cfg.batch_size, translate=cfg.translate, seed=cfg.seed)
        for k, v in (train_over or {}).items():
            setattr(tt, k, v)
        tr = Trainer(model, x_t, y_t, tt, stop=stop)
        for event, fn in callbacks:
            tr.add_callback(event, fn)
        t_res = tr.run()
        teacher = {"teacher_epochs": e1, "teacher_steps": t_res.steps}
        t_trig = time.perf_counter()
        patch = optimize_trigger(model, x_a, refs, attack_up, steps=int(p["trigger_steps"]), seed=cfg.seed)
        cfg = replace(cfg, params={**cfg.params, "pattern": _save_patch(patch)})
        teacher_s = {"teacher_s": t_res.seconds, "trigger_s": time.perf_counter() - t_trig}
        attack_up = build_attack(cfg.attack, up.image_shape, n_out, target=target_up, mode=cfg.mode, seed=cfg.seed,
                                 **cfg.params)
        _retarget(cfg, ds)
        epochs = max(0.05, epochs - e1)
    poisoned, x_tr, y_tr = training_set(attack_up)
    extra = None
    if latent:
        weight = float(p["latent_weight"])
        xr = refs.float() / 255.0

        def extra(m, step, gen):  # pull triggered features onto the references' mean features
            idx = torch.randint(len(x_a), (64,), device=x_a.device, generator=gen)
            return weight * latent_loss(m, x_a[idx].float() / 255.0, attack_up, xr)

    x_bd, y_bd = attack_up.test_set(up.x_test, up.y_test)
    ev = Evaluator(up.x_test, up.y_test, x_bd, y_bd, seed=cfg.seed)
    tcfg = TrainConfig(epochs=epochs, lr=cfg.lr, batch_size=cfg.batch_size, translate=cfg.translate, seed=cfg.seed,
                       eval_every=cfg.eval_every)
    for k, v in (train_over or {}).items():
        setattr(tcfg, k, v)
    tr = Trainer(model, x_tr, y_tr, tcfg, evaluator=ev, stop=stop, extra_loss=extra)
    for event, fn in callbacks:
        tr.add_callback(event, fn)
    res = tr.run()
    spec = {"name": cfg.model, "num_classes": n_out, "channels": up.image_shape[0],
            "image_size": list(up.image_shape[1:]), "kwargs": dict(cfg.model_kwargs)}
    run = Run(id=new_run_id("attack"), kind="attack", created=time.time(), dataset=up.name, model=spec,
              attack={**attack_up.config(), "poison_rate": cfg.poison_rate, "n_poisoned": len(poisoned.poison_idx),
                      "title": attack_up.title, "paper": attack_up.paper, "upstream_target": target_up,
                      "n_refs": 0 if refs is None else len(refs)},
              config={**asdict(cfg), "epochs": total_epochs, "train": asdict(tcfg), "stage": "attacker (upstream)",
                      "paradigm_params": p, "n_attacker": len(ds.attacker_idx), **teacher},
              seed=cfg.seed, device=describe_device(ds.setting.device),
              status="stopped" if res.stopped else "finished", history=res.history,
              final={**res.final, "steps": res.steps, "total_steps": res.total_steps},
              timings={"total_s": time.perf_counter() - t0, "train_s": res.seconds, "images_per_s": res.images_per_s,
                       **teacher_s})
    return run, model


def transfer_victim(cfg, ds: Downstream, attacker: Run, model, how: str, callbacks=(), stop=None, train_over=None):
    """The victim's transfer: a new head on the published model, trained on the victim's data with the
    encoder frozen (``how="head"``) or the whole model trained (``"full"``). Returns ``(run, model)``."""
    t0 = time.perf_counter()
    s, p = ds.setting, ds.params
    vm = _new_head(model, s.data.num_classes, cfg.seed)
    head_only = how == "head"
    trainable = {n: prm.requires_grad for n, prm in vm.named_parameters()}
    for prm in vm.parameters():
        prm.requires_grad_(prm.requires_grad and not head_only)
    for prm in vm.classifier.parameters():
        prm.requires_grad_(True)
    x, y = s.data.x_train[ds.victim_idx], s.data.y_train[ds.victim_idx]
    tcfg = TrainConfig(epochs=float(p["head_epochs" if head_only else "full_epochs"]),
                       lr=float(p["head_lr" if head_only else "full_lr"]), batch_size=256, label_smoothing=0.0,
                       translate=0, warmup=0.1, seed=cfg.seed, eval_at_start=False)
    for k, v in (train_over or {}).items():
        setattr(tcfg, k, v)
    tr = Trainer(vm, x, y, tcfg, evaluator=s.evaluator, stop=stop,
                 params=list(vm.classifier.parameters()) if head_only else None, freeze_bn=head_only)
    for event, fn in callbacks:
        tr.add_callback(event, fn)
    res = tr.run()
    for n, prm in vm.named_parameters():  # as published: a defense may train what the victim froze
        prm.requires_grad_(trainable[n])
    final = {**res.final, "steps": res.steps, "total_steps": res.total_steps}
    recall = target_recall(vm, s, cfg)
    if recall is not None:
        final["target_recall"] = recall
    spec = {**attacker.model, "num_classes": s.data.num_classes}
    run = Run(id=new_run_id("victim"), kind="victim", created=time.time(), dataset=s.data.name, model=spec,
              attack={**attacker.attack, "target": cfg.target},  # the victim's target (upstream_target kept)
              parent=attacker.id,
              config={**attacker.config, "stage": f"victim ({'head only' if head_only else 'whole model'})",
                      "victim": how, "n_victim": len(ds.victim_idx), "train": asdict(tcfg)},
              seed=cfg.seed, device=describe_device(s.device), status="stopped" if res.stopped else "finished",
              history=res.history, final=final,
              timings={"total_s": time.perf_counter() - t0, "train_s": res.seconds, "images_per_s": res.images_per_s})
    return run, vm


def victim_stages(params: dict) -> tuple[str, ...]:
    """Which victims a transfer trains, in order: both, or only the one the defenses start from."""
    return ("head", "full") if params.get("compare_victim", True) else (params["victim"],)


def transfer_models(cfg, store=None, callbacks=(), stop=None, on_stage=None, train_over=None):
    """The attacker's model and both victims (only the defended one, ``victim``, where
    ``compare_victim`` is off), stored as runs. Returns ``(ds, out, victims)`` with
    ``victims[how] = (run, model)`` for ``how`` in "head", "full", and the attacker's ``(run, model)``
    as ``victims["attacker"]`` when a stop came before any victim was trained."""
    ds = downstream_setting(cfg)
    stage = on_stage or (lambda name: None)
    stage("attack")
    a_run, a_model = train_attacker(cfg, ds, callbacks, stop, train_over)
    if store is not None:
        store.save(a_run, a_model)
    out = {"dataset": ds.upstream.name, "downstream": ds.setting.data.name, "paradigm": "transfer",
           "attack": cfg.attack, "target": cfg.target, "model": cfg.model, "device": a_run.device,
           "attacker": _figures(a_run),
           "victim": ds.params["victim"], "defended": {}}
    victims = {}
    for how in victim_stages(ds.params):
        if stop is not None and stop.is_set():
            break
        stage(f"victim_{how}")
        v_run, v_model = transfer_victim(cfg, ds, a_run, a_model, how, callbacks, stop, train_over)
        if store is not None:
            store.save(v_run, v_model)
        victims[how] = (v_run, v_model)
        out[f"victim_{how}"] = _figures(v_run)
    if not victims:  # stopped during the attacker's training: what was reached is that model
        victims["attacker"] = (a_run, a_model)
    return ds, out, victims


def run_transfer(cfg, defenses=("ft", "sft"), clean_fraction: float = 0.2, store=None, callbacks=(), stop=None,
                 on_stage=None, train_over=None) -> dict:
    """Attacker, victim (head only and whole model), then each defense on the victim model named by
    ``paradigm_params["victim"]``. Every model is stored as a run; returns the figures as a dict
    shaped like :func:`bdft_core.pipeline.run_demo`'s (``poisoned`` = the victim model defended)."""
    from ..pipeline import run_defense, story_stopped

    t0 = time.perf_counter()
    stage = on_stage or (lambda name: None)
    ds, out, victims = transfer_models(cfg, store, callbacks, stop, on_stage, train_over)
    out["clean_fraction"] = clean_fraction
    chosen = victims.get(ds.params["victim"])
    if chosen is not None:
        out["run_id"] = chosen[0].id
        out["poisoned"] = _figures(chosen[0])
        for name in defenses:
            if stop is not None and stop.is_set():
                break
            stage(name)
            d_run, _ = run_defense(chosen[0], name, clean_fraction=clean_fraction, store=store, callbacks=callbacks,
                                   stop=stop, model=chosen[1], setting=ds.setting, train_over=train_over)
            out["defended"][name] = _figures(d_run)
    trainings = [out["attacker"]["stopped"], any(h not in victims for h in victim_stages(ds.params))]
    trainings += [v[0].status == "stopped" for v in victims.values()]
    out["stopped"] = story_stopped(trainings, out["defended"], defenses)
    out["seconds"] = time.perf_counter() - t0
    return out


__all__ = ["Downstream", "downstream_setting", "latent_loss", "run_transfer", "target_recall", "train_attacker", "transfer_models",
           "transfer_victim", "victim_stages"]
