"""Backdoor sequela of stored runs: the poisoned model and each of its defended children measured on
every axis with one shared context (same data, same seed), kept with the run as ``sequela.json`` so
that reopening is instant. Used by the Sequela page, its background job and ``python -m bdft_core
sequela``."""
from __future__ import annotations

import threading
import time

from .errors import ConfigError
from .runs import RunStore


def sequela_run(store: RunStore, run_id: str, axes=None, params: dict | None = None, n: int = 1000,
                stop: threading.Event | None = None, progress=None, save: bool = True) -> dict:
    """Evaluate ``run_id`` (a poisoned run; a defense run stands for its parent) and all its defended
    children (newest per defense) on the sequela axes. Adds ``run_id`` and ``labels`` (model key ->
    display label) to :func:`bdft_core.sequela.evaluate`'s result and stores it with the run (unless
    stopped or ``save`` is False)."""
    from . import sequela
    from .explain_runs import models_of

    t0 = time.perf_counter()
    run = store.get(run_id)
    if run.kind == "defense":
        run = store.get(run.parent)
    run, models = models_of(store, run.id)
    newest = store.newest_defenses(run.id, stopped=False)  # the same models as models_of
    # members are left out of every measured defense's clean data: the largest of their splits (the
    # splits are nested), so no defended model is scored on images it was just fine-tuned on
    fractions = [store.get(rid).config.get("clean_fraction") for rid in newest.values()]
    fractions = [float(f) for f in fractions if f is not None]
    ctx = sequela.context_for(run, store, n=n, clean_fraction=max(fractions) if fractions else None)
    models = {k: m.to(ctx.device).eval() for k, m in models.items()}
    res = sequela.evaluate(models, ctx, axes=axes, params=params, stop=stop, progress=progress)
    from .figures import label_of

    res.update(run_id=run.id, labels={k: label_of(k) for k in models},
               children=newest,
               total_seconds=time.perf_counter() - t0)
    if save and not res["stopped"]:
        store.save_result(run.id, "sequela", res)
    return res


def stored_sequela(store: RunStore, run_id: str) -> dict | None:
    """The sequela result kept with ``run_id``, or None; stale (a defense added, re-run or deleted
    since) is flagged as ``res["stale"] = True``, with ``res["deleted"]``: the measured defenses
    whose run is gone (their columns show models that no longer exist)."""
    res = store.load_result(run_id, "sequela")
    if res is None:
        return None
    now, then = store.newest_defenses(run_id, stopped=False), res.get("children") or {}
    res["stale"] = now != then
    ids = {c["id"] for c in store.defenses(run_id)}
    res["deleted"] = [name for name, rid in then.items() if rid not in ids]
    return res


def table_rows(res: dict) -> list[dict]:
    """Raw values, one row per axis, one column per model, with the change from the poisoned model."""
    rows = []
    for ax in res["axes"]:
        meta = res["meta"][ax]
        row = {"axis": meta["title"], "unit": meta["unit"]}
        base = res["results"].get("poisoned", {}).get(ax, {}).get("value")
        for m in res["models"]:
            v = res["results"][m].get(ax, {}).get("value")
            label = res.get("labels", {}).get(m, m)
            if v is None:
                row[label] = "–"
            elif m == "poisoned" or base is None:
                row[label] = f"{v:.3f}"
            else:
                row[label] = f"{v:.3f} ({v - base:+.3f})"
        row["meaning"] = meta["meaning"]
        rows.append(row)
    return rows


def check_axes(axes) -> list[str] | None:
    from .sequela import AXES

    if axes is None:
        return None
    names = [str(a).strip().lower() for a in axes if str(a).strip()]
    bad = [a for a in names if a not in AXES]
    if bad:
        raise ConfigError(f"unknown sequela axis {', '.join(bad)}: choose from {', '.join(AXES)}")
    return names


__all__ = ["check_axes", "sequela_run", "stored_sequela", "table_rows"]
