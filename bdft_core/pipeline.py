"""The story end to end, as plain functions the CLI and the dashboard both call:
``run_attack`` (poison + train, stored as a run), ``run_defense`` (apply a registered defense to a
stored run, stored as a child run) and ``run_demo`` (both, with FT and SFT).

Progress reaches the caller through ``callbacks``: a list of ``(event, fn)`` pairs passed to the
trainer (``"on_step"``, ``"on_epoch_end"``), each ``fn`` receiving a
:class:`~bdft_core.train.Progress`; ``stop`` is a ``threading.Event`` that ends training within a
step, keeping what was reached (the run is stored with status "stopped")."""
from __future__ import annotations

import copy
import functools
import numbers
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from .attacks import build_attack
from .data import ImageData, Splits, check_clean_fraction, load_dataset
from .defenses import build_defense
from .device import describe_device, pick_device, setup_threads
from .errors import ConfigError
from .metrics import Evaluator
from .models import build_model
from .runs import Run, RunStore, new_run_id
from .train import TrainConfig, Trainer

PARADIGMS = ("standalone", "transfer", "encoder")  # descriptions and settings: bdft_core.paradigms

# Passes over the training set when ``epochs`` is not given: enough for the defaults to reach the
# README's figures, CIFAR-10's attack training in under a minute on a 2-core CPU (the whole demo,
# FT and SFT included, about 1.6 minutes: README; more epochs help, on a GPU especially).
DEFAULT_EPOCHS = {"cifar10": 2.0, "gtsrb": 5.0, "svhn": 2.0, "mnist": 1.0, "fashion_mnist": 2.0, "digits": 15.0}
DEFAULT_CLEAN_FRACTION = 0.2  # the defender's clean-data budget: 20% of the training set


@dataclass
class AttackConfig:
    """Everything that defines a poisoned training run (defaults: the README's demo)."""

    dataset: str = "cifar10"  # registry name, .npz path or image folder
    attack: str = "badnets"
    params: dict[str, Any] = field(default_factory=dict)  # the attack's own settings (see its defaults)
    poison_rate: float = 0.1  # share of the training set poisoned, 0..1
    target: int = 0  # target label (all-to-one)
    mode: str = "all_to_one"  # or "all_to_all" (label + 1)
    paradigm: str = "standalone"  # "standalone", "transfer" or "encoder" (see bdft_core.paradigms)
    downstream: str | None = None  # the victim's dataset (transfer: None = the same, split; encoder: None = gtsrb)
    paradigm_params: dict[str, Any] = field(default_factory=dict)  # the paradigm's own settings
    model: str = "fastnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: float | None = None  # None: DEFAULT_EPOCHS for the dataset
    lr: float = 0.15  # peak learning rate (SGD, warm-up then linear decay)
    batch_size: int = 256
    translate: int = 0  # random-shift augmentation, pixels (flips are always on)
    seed: int = 0
    n_train: int | None = None  # use a seeded slice of the training set (quick demos, tests)
    n_test: int | None = None
    device: str = "auto"
    eval_every: int = 0  # steps between live evaluations (0: each epoch)

    @classmethod
    def get_default_config(cls) -> "AttackConfig":
        return cls()

    @classmethod
    def from_dict(cls, d: dict) -> "AttackConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(sorted(unknown))}")
        return cls(**d)

    def validate(self) -> "AttackConfig":
        def number(name, whole=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or (whole and not isinstance(v, numbers.Integral)):
                raise ConfigError(f"{name} must be a {'whole ' if whole else ''}number, got {v!r}")
            return v

        # types first: a grid file can put anything anywhere, and the checks below read these
        for name in ("params", "paradigm_params", "model_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a table of settings (name = value), got {getattr(self, name)!r}")
        for name in ("dataset", "attack", "mode", "model", "device", "paradigm"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be text, got {getattr(self, name)!r}")
        if self.paradigm not in PARADIGMS:
            raise ConfigError(f"unknown paradigm {self.paradigm!r}: available now: {', '.join(PARADIGMS)}")
        from .paradigms import check_paradigm_params

        check_paradigm_params(self)
        number("poison_rate"), number("lr")
        if not 0 <= number("seed", whole=True) < 2 ** 63:  # torch seeds are 64-bit
            raise ConfigError(f"seed must be from 0 to 2**63-1, got {self.seed}")
        if not 0 <= number("target", whole=True) < 1_000_000:
            raise ConfigError(f"target must be a class number (0, 1, ...), got {self.target}")
        if self.epochs is not None and not 0 < number("epochs") <= MAX_EPOCHS:
            raise ConfigError(f"epochs must be above 0 and at most {MAX_EPOCHS}, got {self.epochs}")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            if v is not None and int(v) < 2:
                raise ConfigError(f"{name} must be at least 2, got {v}")
        return self


MAX_EPOCHS = 10_000  # far beyond any training here; 1e308 would print a step count that never ends


@functools.lru_cache(maxsize=4)
def _cached_dataset(name: str, root: str | None) -> ImageData:
    return load_dataset(name, root=root)


def get_dataset(name: str, device: torch.device, n_train=None, n_test=None, seed: int = 0) -> ImageData:
    """Load (once per process) and place a dataset on ``device``, optionally a seeded slice."""
    import os

    data = _cached_dataset(name, os.environ.get("BDFT_DATA_DIR"))
    if n_train or n_test:
        data = data.subset(n_train, n_test, seed=seed)
    return data.to(device)


@dataclass
class Setting:
    """A prepared attack setting: data on the device, the attack, the splits, the evaluator."""

    cfg: AttackConfig
    device: torch.device
    data: ImageData
    attack: Any
    splits: Splits
    evaluator: Evaluator
    pool: torch.Tensor | None = None  # the defender's training indices, in order (None: the standalone split)

    def defender_indices(self, clean_fraction: float) -> torch.Tensor:
        """The defender's clean images: the first ``clean_fraction`` of its pool (standalone: of the
        training set; transfer/encoder: of the victim's downstream training data)."""
        if self.pool is None:
            return self.splits.defender_indices(clean_fraction)
        k = max(1, int(round(check_clean_fraction(clean_fraction) * len(self.pool))))
        return self.pool[:k]


def keep_trigger_image(cfg: AttackConfig) -> AttackConfig:
    """A trigger image given as a file path is checked and copied into the runs directory (by
    content hash), and the config points there: a run stays reproducible when the original file
    moves or changes."""
    from pathlib import Path

    from .attacks import ATTACKS
    from .runs import runs_dir
    from .uploads import save_trigger_image

    cls = ATTACKS.get(str(cfg.attack).lower())
    key = getattr(cls, "image_param", None)
    val = cfg.params.get(key) if key else None
    if isinstance(val, str) and val not in cls.choices.get(key, ()) and Path(val).expanduser().is_file():
        p = Path(val).expanduser()
        if p.resolve().parent != (runs_dir() / "triggers").resolve():
            cfg.params = {**cfg.params, key: str(save_trigger_image(p.read_bytes(), p.name))}
    return cfg


def prepare(cfg: AttackConfig) -> Setting:
    cfg.validate()
    keep_trigger_image(cfg)
    setup_threads()
    device = pick_device(cfg.device)
    data = get_dataset(cfg.dataset, device, cfg.n_train, cfg.n_test, cfg.seed)
    attack = build_attack(cfg.attack, data.image_shape, data.num_classes, target=cfg.target, mode=cfg.mode,
                          seed=cfg.seed, **cfg.params)
    attack.fit_to(data)  # data-dependent triggers (a generator, a surrogate model) are built here
    splits = Splits(len(data.y_train), cfg.seed)
    x_bd, y_bd = attack.test_set(data.x_test, data.y_test)
    return Setting(cfg, device, data, attack, splits, Evaluator(data.x_test, data.y_test, x_bd, y_bd, seed=cfg.seed))


def _model_spec(cfg: AttackConfig, data: ImageData) -> dict:
    return {"name": cfg.model, "num_classes": data.num_classes, "channels": data.image_shape[0],
            "image_size": list(data.image_shape[1:]), "kwargs": dict(cfg.model_kwargs)}


def run_attack(cfg: AttackConfig, store: RunStore | None = None, callbacks=(), stop: threading.Event | None = None,
               setting: Setting | None = None, train_over: dict | None = None, on_stage=None):
    """Poison the training set, train a model on it, measure CA/ASR, store the run.
    ``train_over`` overrides :class:`TrainConfig` fields that do not change the result (e.g.
    ``live_samples``, ``eval_every`` for denser live curves). Returns ``(run, model)``.

    Transfer paradigm: trains the attacker's model and the victim's (head only and whole model), stores
    all three, and returns the victim model that defenses start from (``on_stage(name)`` marks each)."""
    if store is not None and hasattr(store, "check_writable"):
        store.check_writable()  # before minutes of training, not after
    if cfg.paradigm == "transfer":  # the attacker's model and the victims; returns the victim defenses start from
        from .paradigms.transfer import transfer_models

        cfg.validate()
        ds, _, victims = transfer_models(cfg, store, callbacks, stop, on_stage=on_stage, train_over=train_over)
        return victims.get(ds.params["victim"]) or next(iter(victims.values()))
    if cfg.paradigm == "encoder":  # BadEncoder + the victim's probe: the model defenses start from
        from .paradigms.encoder import encoder_models

        cfg.validate()
        _, _, run, model = encoder_models(cfg, store, callbacks, stop, on_stage=on_stage)
        return run, model
    t0 = time.perf_counter()
    s = setting or prepare(cfg)
    torch.manual_seed(cfg.seed)
    t_data = time.perf_counter()
    poisoned = s.attack.poison(s.data.x_train, s.data.y_train, cfg.poison_rate, s.splits)
    spec = _model_spec(cfg, s.data)
    model = build_model(cfg.model, s.data.num_classes, s.data.image_shape[0], **cfg.model_kwargs)
    model.fit_data(poisoned.x.cpu())
    model.to(s.device)
    epochs = cfg.epochs if cfg.epochs is not None else DEFAULT_EPOCHS.get(s.data.name, 4.0)
    tcfg = TrainConfig(epochs=epochs, lr=cfg.lr, batch_size=cfg.batch_size, translate=cfg.translate,
                       seed=cfg.seed, eval_every=cfg.eval_every)
    for k, v in (train_over or {}).items():
        setattr(tcfg, k, v)
    t_train = time.perf_counter()
    trainer = Trainer(model, poisoned.x, poisoned.y, tcfg, evaluator=s.evaluator, stop=stop)
    for event, fn in callbacks:
        trainer.add_callback(event, fn)
    res = trainer.run()
    total = time.perf_counter() - t0
    run = Run(id=new_run_id("attack"), kind="attack", created=time.time(), dataset=s.data.name, model=spec,
              attack={**s.attack.config(), "poison_rate": cfg.poison_rate, "n_poisoned": len(poisoned.poison_idx),
                      "n_noise": len(poisoned.noise_idx), "title": s.attack.title, "paper": s.attack.paper},
              config={**asdict(cfg), "epochs": epochs, "train": asdict(tcfg)}, seed=cfg.seed,
              device=describe_device(s.device, tcfg.amp), status="stopped" if res.stopped else "finished",
              history=res.history, final={**res.final, "steps": res.steps, "total_steps": res.total_steps},
              timings={"total_s": total, "prepare_s": t_train - t0, "poison_s": t_train - t_data,
                       "train_s": res.seconds, "images_per_s": res.images_per_s})
    if store is not None:
        store.save(run, model)
    return run, model


def setting_for(run: Run, cfg: AttackConfig | None = None) -> Setting:
    """The data, attack and defender's pool a defense of ``run`` works with."""
    cfg = cfg or attack_config_of(run)
    if run.kind == "attack" and cfg.paradigm == "transfer":
        # its backdoor targets the upstream class (the latent attack's extra class), its ASR is measured
        # on the attacker's data: a defense here would be measured against the victim's target instead
        raise ConfigError(f"run {run.id} is the attacker's upstream model of a transfer run; defenses start from "
                          "one of its victim runs (the model the victim built on it)")
    if run.kind == "victim" or cfg.paradigm == "encoder":
        from .paradigms import victim_setting

        return victim_setting(run, cfg)
    return prepare(cfg)


def defender_size(run: Run, clean_fraction: float) -> int:
    """How many clean images the defender gets for ``run`` at ``clean_fraction``."""
    check_clean_fraction(clean_fraction)
    cfg = attack_config_of(run)
    if run.kind == "victim" or cfg.paradigm == "encoder":
        n = int(run.config.get("n_victim", 0)) or len(setting_for(run, cfg).pool)
        return max(1, int(round(clean_fraction * n)))
    data = get_dataset(cfg.dataset, torch.device("cpu"), cfg.n_train, cfg.n_test, cfg.seed)
    return len(Splits(len(data.y_train), cfg.seed).defender_indices(clean_fraction))


def attack_config_of(run: Run) -> AttackConfig:
    """The settings ``run`` was made with. The attack's own settings the user left at their defaults
    are taken from the run's record (which keeps them all, as resolved then), so a stored run keeps
    its trigger when a later version changes a default (Blended's pattern was uniform noise until
    2026-11-26). Settings recorded only as a description (an image given as an array) stay as given."""
    from .attacks import ATTACKS
    from .attacks.base import is_image_description

    names = {f.name for f in fields(AttackConfig)}
    cfg = AttackConfig(**{k: v for k, v in run.config.items() if k in names})
    rec = run.attack if isinstance(run.attack, dict) else {}
    cls = ATTACKS.get(str(cfg.attack).lower())
    if cls is not None and rec.get("name") == cls.name and isinstance(rec.get("params"), dict):
        given = dict(cfg.params or {})
        kept = {k: v for k, v in rec["params"].items() if k in cls.defaults and k not in given and not is_image_description(v)}
        if kept:
            cfg.params = {**kept, **given}
    return cfg


def run_defense(parent: str | Run, defense: str, params: dict | None = None,
                clean_fraction: float = DEFAULT_CLEAN_FRACTION, store: RunStore | None = None, callbacks=(),
                stop: threading.Event | None = None, model=None, setting: Setting | None = None,
                device: str | None = None, train_over: dict | None = None):
    """Apply a registered defense to a poisoned run (its stored weights, or ``model`` if given)
    using the defender's clean data; store the result as a child run. Returns ``(run, model)``."""
    t0 = time.perf_counter()
    check_clean_fraction(clean_fraction)
    build_defense(defense, **(params or {}))  # a bad name or setting fails before any loading
    if store is not None and hasattr(store, "check_writable"):
        store.check_writable()
    if isinstance(parent, str):
        if store is None:
            raise ConfigError("a run id needs a run store to load it from")
        parent_run, stored = store.load_model(parent)
        model = model if model is not None else stored
    else:
        parent_run = parent
        if model is None:
            raise ConfigError("pass the poisoned model along with an unsaved run")
    if parent_run.kind not in ("attack", "victim"):
        raise ConfigError(f"run {parent_run.id} is a {parent_run.kind} run; defenses start from a poisoned model "
                          "(an attack run, or a victim's model in the transfer and encoder paradigms)")
    cfg = attack_config_of(parent_run)
    from .paradigms import defense_defaults

    d = build_defense(defense, **{**defense_defaults(cfg.paradigm, defense), **(params or {})})
    if device:
        cfg.device = device
    s = setting or setting_for(parent_run, cfg)
    model = copy.deepcopy(model).to(s.device)
    idx = s.defender_indices(clean_fraction).to(s.device)
    if len(idx) < 2 and not d.uses_poisoned_data:  # one image cannot make a training batch (batch norm needs two)
        raise ConfigError(f"a clean-data budget of {100 * clean_fraction:g}% gives the defender {len(idx)} image(s) "
                          f"here; a defense needs at least 2: raise the clean fraction")
    x_clean, y_clean = s.data.x_train[idx], s.data.y_train[idx]  # original, clean images
    extra = {}
    if d.uses_poisoned_data:
        extra["poisoned"] = poisoned_training(parent_run, cfg, s)
    # defenses that call the evaluator themselves (ANP, NAD, ...) get train_over's live size too
    evaluator = s.evaluator.with_live_samples((train_over or {}).get("live_samples"))
    res = d.apply(model, x_clean, y_clean, evaluator=evaluator, callbacks=callbacks, stop=stop, seed=cfg.seed,
                  **extra, **(train_over or {}))
    total = time.perf_counter() - t0
    run = Run(id=new_run_id("defense"), kind="defense", created=time.time(), dataset=parent_run.dataset,
              model=parent_run.model, attack=parent_run.attack,
              config={"clean_fraction": clean_fraction, "n_clean": len(idx), "defense": d.config()},
              seed=cfg.seed, device=describe_device(s.device, (train_over or {}).get("amp", "auto")),
              status="stopped" if res.stopped else "finished",
              parent=parent_run.id, defense={**d.config(), "title": d.title, "paper": d.paper, "needs": d.needs,
                                             "uses_poisoned_data": d.uses_poisoned_data},
              history=res.history, final={**res.final, "steps": res.steps, "total_steps": res.total_steps},
              timings={"total_s": total, "train_s": res.seconds, "images_per_s": res.images_per_s})
    if store is not None:
        store.save(run, model, artefacts=res.artefacts)
    return run, model


def poisoned_training(run: Run, cfg: AttackConfig, s: Setting):
    """The attack run's poisoned training set, rebuilt exactly (same seed, same splits), with its
    training settings: what a defender who controls training (data cleansers, ABL) works on."""
    from .defenses.base import PoisonedTraining

    if run.kind != "attack" or cfg.paradigm != "standalone":
        raise ConfigError("this defense inspects the poisoned training set, so it applies to standalone attack runs "
                          "only (in the transfer and encoder paradigms the victim never trains on poisoned data)")
    attack = build_attack(cfg.attack, s.data.image_shape, s.data.num_classes, target=cfg.target, mode=cfg.mode,
                          seed=cfg.seed, **cfg.params)  # a fresh attack: the same random draws as the run had
    attack.fit_to(s.data)
    p = attack.poison(s.data.x_train, s.data.y_train, cfg.poison_rate, s.splits)
    names = {f.name for f in fields(TrainConfig)}
    tcfg = TrainConfig(**{k: v for k, v in run.config.get("train", {}).items() if k in names})
    spec = run.model

    def new_model():
        m = build_model(spec["name"], spec["num_classes"], spec["channels"], **spec.get("kwargs", {}))
        m.fit_data(p.x.cpu())
        return m.to(s.device)

    return PoisonedTraining(p.x, p.y, p.poison_idx, tcfg, new_model)


def run_demo(cfg: AttackConfig | None = None, defenses=("ft", "sft"), clean_fraction: float = DEFAULT_CLEAN_FRACTION,
             store: RunStore | None = None, callbacks=(), stop: threading.Event | None = None,
             on_stage=None, train_over: dict | None = None) -> dict:
    """Poison, train, apply each defense, measure: the whole story, as one JSON-ready dict.
    ``on_stage(name)`` is called before each stage ("attack", then each defense name)."""
    t0 = time.perf_counter()
    cfg = cfg or AttackConfig()
    check_clean_fraction(clean_fraction)
    for name in defenses:
        build_defense(name)  # fail on an unknown name before training anything
    if cfg.paradigm == "transfer":
        from .paradigms.transfer import run_transfer

        cfg.validate()
        return run_transfer(cfg, defenses, clean_fraction, store, callbacks, stop, on_stage, train_over)
    if cfg.paradigm == "encoder":
        from .paradigms.encoder import run_encoder

        cfg.validate()
        return run_encoder(cfg, defenses, clean_fraction, store, callbacks, stop, on_stage, train_over)
    s = prepare(cfg)
    if on_stage:
        on_stage("attack")
    run, model = run_attack(cfg, store=store, callbacks=callbacks, stop=stop, setting=s, train_over=train_over)
    out = {"dataset": run.dataset, "attack": cfg.attack, "paradigm": cfg.paradigm, "model": cfg.model,
           "device": run.device, "run_id": run.id,
           "poisoned": {"clean_acc": run.final["clean_acc"], "asr": run.final["asr"],
                        "seconds": run.timings["total_s"]},
           "defended": {}, "clean_fraction": clean_fraction}
    for name in defenses:
        if stop is not None and stop.is_set():
            break
        if on_stage:
            on_stage(name)
        drun, _ = run_defense(run, name, clean_fraction=clean_fraction, store=store, callbacks=callbacks, stop=stop,
                              model=model, setting=s, train_over=train_over)
        out["defended"][name] = {"clean_acc": drun.final["clean_acc"], "asr": drun.final["asr"],
                                 "seconds": drun.timings["total_s"], "run_id": drun.id,
                                 "stopped": drun.status == "stopped"}
    out["stopped"] = story_stopped([run.status == "stopped"], out["defended"], defenses)
    out["seconds"] = time.perf_counter() - t0
    return out


def story_stopped(trainings, defended: dict, defenses) -> bool:
    """Whether a demo ended early: a training (``trainings``: a stopped flag each) or a defense
    stopped, or a defense asked for never ran. A Stop pressed after the last stage finished stops
    nothing, so the demo is whole and says so (as its runs do)."""
    return (any(trainings) or any(d.get("stopped") for d in defended.values())
            or any(name not in defended for name in defenses))


def training_images(run: Run, idx) -> dict:
    """Training images of a standalone attack run as the model was trained on them (triggers
    included), by index, with their given labels and whether each truly carries the trigger: what a
    data cleanser flagged, for display."""
    cfg = attack_config_of(run)
    pt = poisoned_training(run, cfg, prepare(cfg))
    idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1).cpu()
    truth = torch.zeros(len(pt.y), dtype=torch.bool)
    truth[pt.poison_idx.cpu()] = True
    return {"x": pt.x.cpu()[idx], "y": pt.y.cpu()[idx], "poisoned": truth[idx]}
