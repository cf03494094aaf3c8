"""Backdoor sequela: how a model's vulnerability to OTHER attacks changes once its backdoor has been
removed (Sha, He, Berrang, Humbert and Zhang, "Fine-Tuning Is All You Need to Mitigate Backdoor
Attacks", arXiv:2212.09067). Evaluate the poisoned model and its defended versions (and a clean
model, if there is one) on the same :class:`SequelaContext`; the differences are the sequela.

Axis registry: name -> class. Adding an axis is one file, one entry here, one test. Every axis's
headline ``value`` is oriented so that HIGHER = MORE VULNERABLE.

- :func:`evaluate` measures every (model, axis) pair on one context, with the same data and seed.
- :func:`radar_axes` places the values on a common 0..1 scale for a radar chart (outward = more
  vulnerable); :func:`radar_figure` draws it with plotly.
- :func:`~bdft_core.sequela.context.context_for` builds a context from a stored run.

Axes (file: what the headline value is): ``membership.py`` threshold membership inference (best
AUC of loss / confidence / entropy / modified entropy), ``shadow_mia.py`` shadow-model membership
inference (AUC), ``reinjection.py`` backdoor re-injection (ASR after a few poisoned fine-tuning
steps), ``adversarial.py`` ``pgd`` and ``fgsm`` (success rate at eps 8/255), ``stealing.py`` knockoff
model stealing (fidelity of the copy), ``calibration.py`` expected calibration error.

Cost with the defaults (CIFAR-10, fastnet, one CPU thread on a 2-core machine otherwise idle): three
models, all axes, 109 s: 24 s shared (the shadow models), then per model about 2 s membership, 4-6 s
re-injection, 4-5 s PGD, 1 s FGSM, 13-19 s stealing, 1-2 s calibration (model outputs on the
members, non-members and test images are computed once per model and shared by the axes)."""
from __future__ import annotations

import math
import threading
import time

from ..errors import ConfigError
from .adversarial import FGSM, PGD
from .base import Axis, SequelaContext, advantage, roc_auc, roc_curve
from .calibration import Calibration, calibration_errors
from .membership import ThresholdMIA
from .reinjection import Reinjection
from .shadow_mia import ShadowMIA
from .stealing import Stealing

AXES: dict[str, type[Axis]] = {cls.name: cls for cls in (ThresholdMIA, ShadowMIA, Reinjection, PGD, FGSM, Stealing,
                                                       Calibration)}


def axis_names() -> list[str]:
    return list(AXES)


def build_axis(name: str, **params) -> Axis:
    key = str(name).strip().lower()
    if key not in AXES:
        raise ConfigError(f"unknown sequela axis {name!r}: choose one of {', '.join(AXES)}")
    return AXES[key](**params)


def context_for(*args, **kwargs) -> SequelaContext:
    """A context from a stored run (see :func:`bdft_core.sequela.context.context_for`)."""
    from .context import context_for as _cf

    return _cf(*args, **kwargs)


def evaluate(models: dict, ctx: SequelaContext, axes=None, params: dict | None = None,
             stop: threading.Event | None = None, progress=None) -> dict:
    """Measure every model on every axis, on the same context (same data, same seed, same shadow
    models, the same initial stolen copy), so that differences come from the models alone.

    ``models``: name -> model (left unchanged). ``axes``: axis names (None = all). ``params``: axis
    name -> its parameters (unset ones take the defaults). ``stop``: a threading.Event; when set, the
    current axis ends early and no further one starts (``"stopped": True``). ``progress(fraction,
    message)``: overall progress in [0, 1].

    Returns a JSON-ready dict::

        {"axes": [names], "models": [names],
         "results": {model: {axis: {"value", "raw", "seconds", "stopped"}}},
         "meta": {axis: {"title", "paper", "meaning", "unit", "range"}},
         "params": {axis: params}, "shared_seconds": {axis: s}, "seconds": total,
         "sizes": ctx.sizes(), "seed": ctx.seed, "stopped": bool}

    Work shared by all models (the shadow models) is done first and counted in ``shared_seconds``,
    not in any model's ``seconds``."""
    t0 = time.perf_counter()
    if not isinstance(models, dict) or not models:
        raise ConfigError("sequela: pass the models to evaluate as a non-empty dict name -> model")
    names = axis_names() if axes is None else [str(a).strip().lower() for a in axes]
    if not names:
        raise ConfigError("sequela: no axes to evaluate")
    params = dict(params or {})
    unknown = set(params) - set(names)
    if unknown:
        raise ConfigError(f"sequela: parameters given for axis(es) not evaluated: {', '.join(sorted(unknown))}")
    objs = {n: build_axis(n, **params.get(n, {})) for n in names}  # a bad name or setting fails before any work
    ctx.validate()
    for a in objs.values():
        if a.needs_model_factory and ctx.new_model is None:
            raise ConfigError(f"sequela: axis {a.name} trains models of its own; the context needs new_model")
    shared = [a for a in objs.values() if not a.is_prepared(ctx)]
    units = len(shared) + len(models) * len(objs)
    done = 0

    def sub(msg_prefix):
        if progress is None:
            return None
        base = done
        return lambda f, msg="": progress(min(1.0, (base + min(1.0, max(0.0, f))) / units), f"{msg_prefix}: {msg}")

    stopped = False
    shared_seconds = {}
    for a in shared:
        if stop is not None and stop.is_set():
            stopped = True
            break
        shared_seconds[a.name] = a.prepare(ctx, stop=stop, progress=sub(f"{a.name} (shared)"))
        done += 1
    results: dict[str, dict] = {m: {} for m in models}
    for mname, model in models.items():
        for a in objs.values():
            if stop is not None and stop.is_set():
                stopped = True
                break
            results[mname][a.name] = a.measure(model, ctx, stop=stop, progress=sub(f"{mname} / {a.name}"))
            stopped = stopped or results[mname][a.name]["stopped"]
            done += 1
    ctx.clear_outputs()  # outputs are per model state: do not keep them past this evaluation
    if progress is not None:
        progress(1.0, "done")
    return {"axes": names, "models": list(models), "results": results,
            "meta": {n: axis_meta(n) for n in names}, "params": {n: dict(o.params) for n, o in objs.items()},
            "shared_seconds": shared_seconds, "seconds": time.perf_counter() - t0, "sizes": ctx.sizes(),
            "seed": ctx.seed, "stopped": stopped}


def axis_meta(name: str) -> dict:
    cls = AXES[name]
    return {"title": cls.title, "paper": cls.paper, "meaning": cls.meaning, "unit": cls.unit,
            "range": list(cls.range)}


def radar_axes(result: dict, scale: str = "fixed") -> dict:
    """Place each axis's headline value on 0..1, outward = more vulnerable, for a radar chart.

    ``scale="fixed"`` (default): each axis's own span, the same for every run so charts compare
    across runs: AUC-type axes (membership, shadow_mia) map 0.5..1 -> 0..1 (chance = centre); rates
    (pgd, fgsm, reinjection ASR, stealing fidelity) 0..1 as is; ECE 0..0.3. Values beyond the span are
    clipped. ``scale="minmax"``: per axis, the lowest model -> 0 and the highest -> 1 (all equal ->
    0.5): shows which model is worst on each axis, not by how much.

    Returns ``{"axes": [names], "titles": [...], "meaning": [...], "units": [...], "ranges": [[lo, hi]],
    "models": {model: [r per axis]}, "values": {model: [raw headline value per axis]}}``; an axis
    without a value for a model (skipped, stopped) gives None there."""
    if scale not in ("fixed", "minmax"):
        raise ConfigError(f"radar scale must be 'fixed' or 'minmax', got {scale!r}")
    names = list(result["axes"])
    models = list(result["models"])
    meta = {n: result.get("meta", {}).get(n) or axis_meta(n) for n in names}
    values = {m: [_value(result, m, n) for n in names] for m in models}
    radii = {m: [None] * len(names) for m in models}
    for j, n in enumerate(names):
        col = [values[m][j] for m in models]
        if scale == "fixed":
            lo, hi = meta[n]["range"]
            for m, v in zip(models, col):
                radii[m][j] = None if v is None else min(1.0, max(0.0, (v - lo) / (hi - lo)))
        else:
            have = [v for v in col if v is not None]
            lo, hi = (min(have), max(have)) if have else (0.0, 0.0)
            for m, v in zip(models, col):
                radii[m][j] = None if v is None else (0.5 if hi - lo < 1e-12 else (v - lo) / (hi - lo))
    return {"axes": names, "titles": [meta[n]["title"] for n in names], "meaning": [meta[n]["meaning"] for n in names],
            "units": [meta[n]["unit"] for n in names], "ranges": [list(meta[n]["range"]) for n in names],
            "models": radii, "values": values, "scale": scale}


def _value(result, model, axis):
    v = result["results"].get(model, {}).get(axis, {}).get("value")
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def radar_figure(result: dict, scale: str = "fixed", title: str | None = None):
    """A plotly radar chart: one polygon per model, outward = more vulnerable; hover shows the raw
    headline value, its unit and what the axis means. A model with no value on an axis (not measured,
    or stopped) has no corner there: its polygon skips that axis rather than dipping to the centre,
    which would read as "least vulnerable"."""
    import plotly.graph_objects as go

    from ..figures import color_of, label_of

    r = radar_axes(result, scale=scale)
    fig = go.Figure()
    for m in r["models"]:
        vals = r["values"][m]
        name = label_of(m)  # the same names and colours as every other page (the poisoned model red)
        corners = [(radius, t, f"<b>{t}</b><br>{name}: {v:.3f} {u}<br>{mean}")
                   for radius, t, v, u, mean in zip(r["models"][m], r["titles"], vals, r["units"], r["meaning"])
                   if radius is not None and v is not None]
        corners += corners[:1]  # close the polygon
        fig.add_trace(go.Scatterpolar(r=[c[0] for c in corners], theta=[c[1] for c in corners], name=name,
                                      line={"color": color_of(m)}, fillcolor=color_of(m), fill="toself", opacity=0.55,
                                      text=[c[2] for c in corners], hoverinfo="text"))
    fig.update_layout(polar={"radialaxis": {"range": [0, 1], "showticklabels": False},
                             # the axes in their own order, whichever model's polygon skips one
                             "angularaxis": {"categoryorder": "array", "categoryarray": r["titles"]}},
                      showlegend=True,
                      title=title or f"Backdoor sequela (outward = more vulnerable; {scale} scale)")
    return fig


__all__ = ["AXES", "FGSM", "PGD", "Axis", "Calibration", "Reinjection", "SequelaContext", "ShadowMIA", "Stealing",
           "ThresholdMIA", "advantage", "axis_meta", "axis_names", "build_axis", "calibration_errors", "context_for",
           "evaluate", "radar_axes", "radar_figure", "roc_auc", "roc_curve"]
