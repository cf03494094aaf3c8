"""A sweep's grid: what varies, what stays fixed, and the cells it expands to.

A grid file (JSON, or TOML for hand-writing) holds::

    name = "poison-vs-budget"      # the sweep's name: rerunning the same name resumes it
    defense = "sft"                # fixed settings for every cell (each may also be an axis)
    clean_fraction = 0.2
    threads_per_cell = 1           # CPU threads per cell task (GPU machines: one GPU per cell)

    [base]                         # the poisoned training: AttackConfig fields (an axis overrides them)
    dataset = "digits"
    attack = "badnets"

    [defense_params]               # optional: settings of the defense(s), by name
    sft = {epochs = 2.0}

    [axes]                         # what varies: every combination is one cell
    poison_rate = [0.05, 0.2]
    clean_fraction = [0.05, 0.2]
    defense = ["ft", "sft"]
    seed = [0, 1]

Axis names: any :class:`~bdft_core.pipeline.AttackConfig` field (``attack``, ``poison_rate``,
``paradigm``, ``seed``, ``lr`` -- the attack training's learning rate --, ``epochs``, ``target``,
...), ``trigger.<setting>`` for the attack's own settings (``trigger.size``, ``trigger.alpha``),
``paradigm.<setting>`` for the paradigm's, ``defense`` (a registered name or ``"none"``: the
poisoned model as it is), ``clean_fraction`` and ``defense.<setting>`` (``defense.lr``: the
fine-tuning learning rate).

Cells are identified by content: a cell's key hashes everything that decides its result, so a
sweep extended with a new seed or a new poison rate reuses every cell it already has.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# settings of AttackConfig a grid may not touch: they do not change the result, or are per machine
_NOT_AXES = {"device", "eval_every", "params", "paradigm_params", "model_kwargs"}
NONE = "none"  # the "defense" that leaves the poisoned model as it is
MAX_CELLS = 2000


def _attack_fields() -> set[str]:
    from ..pipeline import AttackConfig

    return {f.name for f in fields(AttackConfig)} - _NOT_AXES


def axis_kind(name: str) -> str:
    """Which part of a cell an axis sets: "attack" (the poisoned training), "trigger" and "paradigm"
    (their settings), "defense", "clean_fraction" or "defense_param"."""
    if name in ("defense", "clean_fraction"):
        return name
    if name.startswith("trigger."):
        return "trigger"
    if name.startswith("paradigm."):
        return "paradigm"
    if name.startswith("defense."):
        return "defense_param"
    if name in _attack_fields():
        return "attack"
    raise ConfigError(f"unknown sweep axis {name!r}: use a training setting ({', '.join(sorted(_attack_fields()))}), "
                      "'trigger.<setting>', 'paradigm.<setting>', 'defense', 'clean_fraction' or 'defense.<setting>'")


def _key(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class Cell:
    """One experiment of the grid: a poisoned training (shared with the cells that differ only in
    the defense) and a defense applied to it."""

    key: str
    values: dict[str, Any]  # axis -> value, in grid order
    attack: dict[str, Any]  # an AttackConfig as a dict
    attack_key: str
    defense: str  # registry name or "none"
    defense_params: dict[str, Any]
    clean_fraction: float


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list] = field(default_factory=dict)
    defense: str = "sft"
    clean_fraction: float = 0.2
    defense_params: dict[str, dict] = field(default_factory=dict)
    threads_per_cell: int = 1
    gpus_per_cell: float | None = None  # None: one GPU per cell where GPUs exist, else none

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, default_name: str | None = None) -> "SweepSpec":
        if not isinstance(d, dict):
            raise ConfigError("a sweep grid must be a JSON object / TOML table")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown grid setting(s) {', '.join(sorted(unknown))}: a grid has "
                              f"{', '.join(sorted(known))}")
        d = dict(d)
        d.setdefault("name", default_name or "sweep")
        for k in ("base", "axes", "defense_params"):
            if not isinstance(d.get(k, {}), dict):
                raise ConfigError(f"grid setting {k!r} must be a table of settings")
        return cls(**d).validate()

    @classmethod
    def load(cls, path: str | Path) -> "SweepSpec":
        """Read a grid file: ``.json`` or ``.toml`` (never executed, never unpickled)."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"grid file not found: {p}")
        if p.stat().st_size > 1_000_000:
            raise ConfigError(f"grid file {p} is larger than 1 MB; a grid is a few lines of settings")
        text = p.read_text(errors="replace")
        try:
            if p.suffix.lower() == ".toml":
                import tomllib

                d = tomllib.loads(text)
            else:
                d = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"grid file {p.name} is not valid {'TOML' if p.suffix.lower() == '.toml' else 'JSON'}: "
                              f"{exc}") from None
        return cls.from_dict(d, default_name=p.stem)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # -- checking ----------------------------------------------------------------------------------
    def validate(self) -> "SweepSpec":
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}", str(self.name)):
            raise ConfigError(f"sweep name {self.name!r}: use 1-80 letters, digits, '-', '_' or '.'")
        if not self.axes:
            raise ConfigError("the grid has no axes: give at least one setting with a list of values under 'axes'")
        for name, vals in self.axes.items():
            axis_kind(name)
            if not isinstance(vals, list) or not vals:
                raise ConfigError(f"axis {name!r} needs a non-empty list of values, got {vals!r}")
            if len({json.dumps(v, sort_keys=True) for v in vals}) != len(vals):
                raise ConfigError(f"axis {name!r} repeats a value: {vals}")
        if "defense" in self.base or "clean_fraction" in self.base:
            raise ConfigError("'defense' and 'clean_fraction' are set at the top level of the grid, not in 'base'")
        if not (isinstance(self.threads_per_cell, int) and 1 <= self.threads_per_cell <= 256):
            raise ConfigError(f"threads_per_cell must be a whole number from 1 to 256, got {self.threads_per_cell!r}")
        if self.gpus_per_cell is not None and not 0 <= float(self.gpus_per_cell) <= 8:
            raise ConfigError(f"gpus_per_cell must be from 0 to 8, got {self.gpus_per_cell!r}")
        n = self.n_cells
        if n > MAX_CELLS:
            raise ConfigError(f"the grid has {n} cells; at most {MAX_CELLS} (split it into several sweeps)")
        self.cells()  # every setting checked before anything runs
        return self

    @property
    def n_cells(self) -> int:
        return math.prod(len(v) for v in self.axes.values())

    # -- expanding ----------------------------------------------------------------------------------
    def cells(self) -> list[Cell]:
        """Every combination of the axes, in grid order (the last axis varies fastest), each with
        its settings checked (unknown attack, defense or setting, values out of range)."""
        from ..defenses import build_defense
        from ..pipeline import AttackConfig

        for k in ("params", "paradigm_params", "model_kwargs"):
            if not isinstance(self.base.get(k) or {}, dict):
                raise ConfigError(f"base.{k} must be a table of settings (name = value), got {self.base[k]!r}")
        names = list(self.axes)
        axis_params = [n[len("defense."):] for n in names if axis_kind(n) == "defense_param"]
        out, seen_attack = [], {}
        for combo in itertools.product(*(self.axes[n] for n in names)):
            values = dict(zip(names, combo))
            attack = {**self.base, "params": dict(self.base.get("params") or {}),
                      "paradigm_params": dict(self.base.get("paradigm_params") or {})}
            defense, clean_fraction = self.defense, self.clean_fraction
            dparams: dict[str, Any] = {}
            for n, v in values.items():
                kind = axis_kind(n)
                if kind == "attack":
                    attack[n] = v
                elif kind == "trigger":
                    attack["params"][n[len("trigger."):]] = v
                elif kind == "paradigm":
                    attack["paradigm_params"][n[len("paradigm."):]] = v
                elif kind == "defense":
                    defense = v
                elif kind == "clean_fraction":
                    clean_fraction = v
                else:
                    dparams[n[len("defense."):]] = v
            defense = str(defense).strip().lower()
            try:
                cfg = AttackConfig.from_dict(attack).validate()
            except TypeError as exc:
                raise ConfigError(f"bad training setting in the grid: {exc}") from None
            akey = _key(cfg.__dict__)
            if akey not in seen_attack:
                seen_attack[akey] = _check_attack(cfg)
            unused = {}
            if defense == NONE:
                if self.defense_params.get(NONE):
                    raise ConfigError(f"defense 'none' has no settings, but the grid sets "
                                      f"{', '.join(self.defense_params[NONE])}")
                dp, unused = {}, dparams  # a defense axis's value: where this baseline sits, nothing it runs
            else:
                dp = {**(self.defense_params.get(defense) or {}), **dparams}
                try:
                    build_defense(defense, **dp)  # unknown settings: "defense sft has no parameter(s) lr; it takes ..."
                except TypeError as exc:
                    raise ConfigError(f"defense {defense!r}: {exc}") from None
                from ..data import check_clean_fraction

                check_clean_fraction(clean_fraction)
            # a 'none' cell keeps its clean fraction in its key: beside defended cells it is the
            # undefended baseline of that budget's column (the same poisoned model in each, no training)
            cell_content = {"attack": cfg.__dict__, "defense": defense, "defense_params": dp,
                            "clean_fraction": float(clean_fraction)}
            if unused:
                cell_content["column"] = unused
            out.append(Cell(_key(cell_content), values, dict(cfg.__dict__), akey, defense, dp, float(clean_fraction)))
        keys = [c.key for c in out]
        if all(c.defense == NONE for c in out):
            idle = [n for n in names if n == "clean_fraction" or n in [f"defense.{a}" for a in axis_params]]
            if idle:
                raise ConfigError(f"some cells of the grid are the same experiment: {', '.join(idle)} varies, but "
                                  "every cell has defense 'none', which uses no clean data or settings; remove it")
        if len(set(keys)) != len(keys):  # e.g. a defense setting's axis that no cell's defense takes
            raise ConfigError("some cells of the grid are the same experiment (an axis that does not matter for "
                              "them, such as clean_fraction or defense settings with defense 'none'); remove it")
        return out

    def attack_units(self) -> dict[str, list[Cell]]:
        """The distinct poisoned trainings, each with the cells that share it."""
        units: dict[str, list[Cell]] = {}
        for c in self.cells():
            units.setdefault(c.attack_key, []).append(c)
        return units


def parse_values(text: str, what: str, kind: type = float) -> list:
    """A comma-separated list typed by a person ("0.05, 0.1, 0.2") as numbers, with a clear error."""
    out = []
    for part in str(text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = kind(float(part)) if kind is int else kind(part)
        except ValueError:
            raise ConfigError(f"{what}: {part!r} is not a number (give values separated by commas, e.g. 0.05, 0.2)") \
                from None
        if kind is int and float(part) != int(float(part)):
            raise ConfigError(f"{what}: {part!r} is not a whole number")
        out.append(v)
    if len(set(out)) != len(out):
        raise ConfigError(f"{what}: a value is repeated")
    return out


def grid_from_choices(name: str, dataset: str, attacks: list[str], poison_rates: list[float],
                      defenses: list[str], clean_fractions: list[float], seeds: int = 1,
                      paradigms: list[str] | None = None, trigger: tuple[str, list] | None = None,
                      defense_lrs: list[float] | None = None, attack_lrs: list[float] | None = None,
                      epochs: float | None = None, n_train: int | None = None, threads_per_cell: int = 1) -> dict:
    """A grid (as :meth:`SweepSpec.from_dict` reads it) from a form's choices: poison rate, defense
    and clean fraction are always axes (one value is fine); attack, paradigm, trigger setting, seed
    and learning rates become axes when more than one value is chosen."""
    if not attacks:
        raise ConfigError("pick at least one attack")
    if not defenses:
        raise ConfigError("pick at least one defense (or 'none': the poisoned model as it is)")
    if paradigms is not None and not paradigms:
        raise ConfigError("pick at least one paradigm (standalone: the attacker trains the model itself)")
    if trigger and trigger[0] and not trigger[1]:
        raise ConfigError(f"give the values of {trigger[0]} to vary (separated by commas), or vary no trigger setting")
    for what, vals in (("poison rates", poison_rates), ("clean fractions", clean_fractions)):
        if not vals:
            raise ConfigError(f"give at least one value for the {what}")
    if not 1 <= int(seeds) <= 20:
        raise ConfigError(f"seeds: from 1 to 20, got {seeds}")
    base: dict[str, Any] = {"dataset": dataset}
    axes: dict[str, list] = {}

    def put(key, vals, base_key=None):
        vals = list(vals or [])
        if len(vals) > 1:
            axes[key] = vals
        elif vals:
            base[base_key or key] = vals[0]

    put("attack", attacks)
    put("paradigm", paradigms or ["standalone"])
    if trigger and trigger[0] and trigger[1]:
        vals = list(trigger[1])
        if len(vals) > 1:
            axes[f"trigger.{trigger[0]}"] = vals
        else:
            base["params"] = {trigger[0]: vals[0]}
    axes["poison_rate"] = list(poison_rates)
    put("lr", attack_lrs)
    if epochs:
        base["epochs"] = float(epochs)
    if n_train:
        base["n_train"] = int(n_train)
    if int(seeds) > 1:
        axes["seed"] = list(range(int(seeds)))
    axes["defense"] = list(defenses)
    if all(d == NONE for d in defenses):
        clean_fractions = clean_fractions[:1]
    axes["clean_fraction"] = list(clean_fractions)
    grid = {"name": name, "base": base, "axes": axes, "threads_per_cell": int(threads_per_cell)}
    if defense_lrs:
        from ..defenses import DEFENSES

        takes = [d for d in defenses if d in DEFENSES and "lr" in DEFENSES[d].defaults]
        if not takes:
            raise ConfigError("the fine-tuning learning rates apply to defenses with one learning rate (such as "
                              "FT), and none of the chosen defenses has one: leave the rates empty")
        if len(defense_lrs) == 1:  # SFT and other scheduled defenses keep their own rates beside it
            grid["defense_params"] = {d: {"lr": defense_lrs[0]} for d in takes}
        else:
            others = [d for d in defenses if d != NONE and d not in takes]
            if others:
                raise ConfigError(f"several fine-tuning learning rates vary the 'lr' of {', '.join(takes)}, but "
                                  f"{', '.join(others)} has no single learning rate (SFT's is a schedule) and "
                                  "would run once per rate for nothing: give one rate, or sweep those defenses "
                                  "separately")
            axes["defense.lr"] = list(defense_lrs)
    return grid


def _check_attack(cfg) -> bool:
    """Build the attack on the dataset's shape once per distinct training: bad trigger settings
    (a patch larger than the image, an unknown setting) fail before anything runs."""
    import torch

    from ..attacks import build_attack
    from ..pipeline import get_dataset

    data = get_dataset(cfg.dataset, torch.device("cpu"))
    try:
        build_attack(cfg.attack, data.image_shape, data.num_classes, target=cfg.target, mode=cfg.mode, seed=cfg.seed,
                     **cfg.params)
    except TypeError as exc:
        raise ConfigError(f"attack {cfg.attack!r}: {exc}") from None
    if cfg.target >= data.num_classes:
        raise ConfigError(f"target {cfg.target} is not a class of {cfg.dataset} ({data.num_classes} classes)")
    if not 0 <= float(cfg.poison_rate) <= 1:
        raise ConfigError(f"poison rate must be within [0, 1], got {cfg.poison_rate}")
    return True


__all__ = ["Cell", "NONE", "SweepSpec", "axis_kind", "grid_from_choices", "parse_values"]
