"""Figures and tables for front ends and reports (plotly; no UI framework here).

One colour per role, the same everywhere: the attack (the poisoned model) is red, each defense has
its own colour (:func:`color_of`). Accuracies are fractions in the data and percentages on screen.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

ATTACK_COLOR = "#d62728"  # the poisoned model / attack training, on every page
COLORS = {"attack": ATTACK_COLOR, "poisoned": ATTACK_COLOR, "ft": "#1f77b4", "sft": "#2ca02c",
          # a transfer victim is the poisoned model its defenses start from: the attack's red, lighter / darker
          "victim_head": "#f4a3a3", "victim_full": "#8b1a1a"}
# the other defenses, one each in registry order (no red, FT blue or SFT green among them)
_PALETTE = ["#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#e7ba52", "#637939",
            "#7b4173", "#008080", "#6b6ecf", "#b5cf6b", "#ce6dbd"]
OTHER_COLOR = "#7f7f7f"  # a name that is neither a defense nor a stage of the poisoned model

CAPTIONS = {
    "asr": "ASR (attack success rate): share of triggered test images, whose true class is not the target, "
           "that the model classifies as the target. High means the backdoor works; lower is better after a defense.",
    "ca": "CA (clean accuracy): share of ordinary test images classified correctly. Higher is better; "
          "a good defense keeps it close to the poisoned model's.",
    "curves": "Left: attack success rate (lower is better after a defense). Right: clean accuracy (higher is "
              "better). Across: passes over the training data (epochs); each defense starts at 0 from the "
              "poisoned model. Live points use a sample of the test set; the final figures use all of it.",
    "schedule": "Learning rate at every fine-tuning step. SFT's first phase climbs to a large peak (this is what "
                "erases the backdoor); its second, small phase restores clean accuracy.",
    "before_after": "Each model's clean accuracy (CA, higher is better) and attack success rate "
                    "(ASR, lower is better); the poisoned model in red (a transfer victim in a lighter or darker red), "
                    "each defense in its own colour.",
    "preview": "Top: training images as they are. Middle: the same images with the trigger. Bottom: the trigger "
               "alone (the difference, amplified so that faint triggers are visible; grey means no change).",
}


def color_of(name: str | None) -> str:
    """The colour of a model/stage: the poisoned model (an attack's name too) red, each defense its
    own, stable across pages; anything else grey."""
    key = (name or "attack").lower()
    if key in COLORS:
        return COLORS[key]
    from .attacks import ATTACKS
    from .defenses import DEFENSES

    names = [n for n in DEFENSES if n not in COLORS]  # registry order: a new defense goes last, the rest keep theirs
    if key in names:
        i = names.index(key)
        return _PALETTE[i] if i < len(_PALETTE) else _extra_color(i - len(_PALETTE))
    return ATTACK_COLOR if key in ATTACKS else OTHER_COLOR


def _extra_color(i: int) -> str:
    """Colours past the palette, distinct from each other: hues a golden angle apart, kept out of
    red (the poisoned model's), as hex (the sweep figures' bands take hex)."""
    import colorsys

    hue = (0.08 + (i * 0.618034) % 0.84)  # 0.08..0.92: no pure red at either end
    r, g, b = colorsys.hls_to_rgb(hue, 0.42 + 0.12 * (i % 2), 0.55)
    return "#{:02x}{:02x}{:02x}".format(*(round(255 * v) for v in (r, g, b)))


def label_of(name: str | None) -> str:
    key = (name or "attack").lower()
    if key in ("attack", "poisoned"):
        return "poisoned model"
    if key in ("victim_head", "victim_full"):
        return "victim: new head only" if key == "victim_head" else "victim: whole model trained"
    from .defenses import DEFENSES

    return DEFENSES[key].title if key in DEFENSES else key


def count(n: int, noun: str) -> str:
    """1 -> '1 cell', 3 -> '3 cells'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def duration(seconds: float | None) -> str:
    """A wall time for people: '40 s', '3.5 min', '1.2 h'."""
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def pct(v: float | None, digits: int = 1) -> str:
    """0.9567 -> '95.7%'; None/NaN -> '–'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.{digits}f}%"


def _go():
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    return go, make_subplots


TRAINING_STAGES = ("attack", "victim_head", "victim_full")  # stages that make the poisoned model


def curves_figure(series: dict[str, list[dict]], title: str | None = None, height: int = 340):
    """ASR (left) and CA (right) against epochs, one line per stage/model (``series``: name ->
    points with ``epoch``, ``asr``, ``clean_acc``). When both the poisoned model's training and
    defenses are present, they get a row each (defenses all start from the poisoned model)."""
    go, make_subplots = _go()
    train = [n for n in series if n in TRAINING_STAGES and series[n]]
    defs = [n for n in series if n not in TRAINING_STAGES and series[n]]
    rows = 2 if train and defs else 1
    titles = ("Attack success rate (ASR)", "Clean accuracy (CA)")
    if rows == 2:
        titles = ("Training the poisoned model: ASR", "… and its CA",
                  "Defenses, starting from the poisoned model: ASR (lower is better)", "… and CA (higher is better)")
    fig = make_subplots(rows=rows, cols=2, subplot_titles=titles, vertical_spacing=0.18)
    for name, pts in series.items():
        if not pts:
            continue
        row = 2 if rows == 2 and name in defs else 1
        x = [p.get("epoch", p.get("step", 0)) for p in pts]
        color = color_of(name)
        for col, key in ((1, "asr"), (2, "clean_acc")):
            y = [None if p.get(key) is None else 100 * p[key] for p in pts]
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=label_of(name), legendgroup=name,
                                     showlegend=col == 1, line={"color": color},
                                     hovertemplate="%{y:.1f}% at epoch %{x:.2f}<extra>" + label_of(name) + "</extra>"),
                          row=row, col=col)
    fig.update_yaxes(range=[0, 100], ticksuffix="%")
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(height=height * rows, margin={"l": 40, "r": 10, "t": 50 if not title else 70, "b": 40},
                      title=title, legend={"orientation": "h", "y": -0.12 if rows == 2 else -0.25})
    return fig


def schedule_figure(schedules: dict[str, list[float]], height: int = 260):
    """Learning rate per step for each defense (``name -> values``), log scale."""
    go, _ = _go()
    fig = go.Figure()
    for name, vals in schedules.items():
        fig.add_trace(go.Scatter(x=list(range(len(vals))), y=vals, mode="lines", name=label_of(name),
                                 line={"color": color_of(name)}))
    fig.update_layout(height=height, margin={"l": 40, "r": 10, "t": 30, "b": 40}, xaxis_title="step",
                      yaxis_title="learning rate", yaxis_type="log", title="Learning-rate schedule",
                      yaxis={"dtick": 1, "exponentformat": "power"})  # one labelled tick per decade: 10⁻³, 10⁻²
    return fig


def before_after_figure(rows: list[dict], height: int = 320):
    """Grouped bars of CA and ASR; ``rows``: dicts with ``name`` ("poisoned", "victim_head",
    "victim_full" or a defense: picks the colour), ``clean_acc``, ``asr`` and optionally ``label``
    (the legend's text; by default the name's)."""
    go, _ = _go()
    fig = go.Figure()
    for r in rows:
        vals = [r.get("clean_acc"), r.get("asr")]
        fig.add_trace(go.Bar(x=["clean accuracy (CA)", "attack success rate (ASR)"],
                             y=[None if v is None else 100 * v for v in vals], name=r.get("label") or label_of(r["name"]),
                             marker_color=color_of(r["name"]), text=[pct(v) for v in vals], textposition="outside"))
    fig.update_layout(barmode="group", height=height, yaxis={"range": [0, 112], "ticksuffix": "%"},
                      margin={"l": 40, "r": 10, "t": 30, "b": 40}, title="Before and after")
    return fig


def summary_rows(poisoned: dict, defended: dict[str, dict]) -> list[dict]:
    """The before/after table: one row per model with percentages, change from the poisoned model
    and wall time."""
    rows = [{"model": "poisoned model", "CA": pct(poisoned.get("clean_acc")), "ASR": pct(poisoned.get("asr")),
             "ΔCA": "", "ΔASR": "", "seconds": _secs(poisoned.get("seconds"))}]
    for name, d in defended.items():
        rows.append({"model": label_of(name), "CA": pct(d.get("clean_acc")), "ASR": pct(d.get("asr")),
                     "ΔCA": _delta(d.get("clean_acc"), poisoned.get("clean_acc")),
                     "ΔASR": _delta(d.get("asr"), poisoned.get("asr")), "seconds": _secs(d.get("seconds"))})
    return rows


def conclusion(poisoned: dict, defended: dict[str, dict], success_asr: float = 0.2) -> str:
    """A plain-words reading of a before/after result, for presenters."""
    pa, pc = poisoned.get("asr"), poisoned.get("clean_acc")
    if pa is None:
        return ""
    parts = [f"The poisoned model obeys the trigger on {pct(pa, 0)} of triggered test images "
             f"while classifying {pct(pc, 0)} of clean ones correctly."]
    if pa < 0.5:
        parts.append("The backdoor is weak here to begin with, so the defenses have little to remove.")
    for name, d in defended.items():
        a, c = d.get("asr"), d.get("clean_acc")
        if a is None:
            continue
        dc = "" if c is None or pc is None else f" (clean accuracy {100 * (c - pc):+.1f} points)"
        if pa < 0.5:  # nothing much to remove: report the change without a verdict
            parts.append(f"After {label_of(name)}: ASR {pct(pa, 0)} → {pct(a, 1)}{dc}.")
        elif a <= success_asr:
            parts.append(f"{label_of(name)} removed the backdoor: ASR {pct(pa, 0)} → {pct(a, 1)}{dc}.")
        elif a < pa - 0.1:
            parts.append(f"{label_of(name)} weakened it to {pct(a, 1)} ASR{dc}, but triggers still work often.")
        else:
            why = (": a small constant learning rate barely moves the model away from the backdoor"
                   if str(name).lower() == "ft" else "")
            parts.append(f"{label_of(name)} left the backdoor in place ({pct(a, 1)} ASR){dc}{why}.")
    return " ".join(parts)


def training_warning(clean_acc: float | None, asr: float | None, num_classes: int | None,
                     poison_rate: float | None = None) -> str:
    """A plain-words warning when a poisoned model is not fit to study: it never learned the task
    (clean accuracy near chance), or its backdoor did not take (low ASR although images were
    poisoned). Empty when neither."""
    if _known(clean_acc) and num_classes and clean_acc <= 1.5 / num_classes:
        return (f"This model did not learn the task: its clean accuracy ({pct(clean_acc)}) is about what guessing "
                f"among {num_classes} classes gives. Train for more epochs or on more images before defending it: "
                "a defense's figures on it mean nothing.")
    if _known(asr) and asr < 0.5 and (poison_rate is None or poison_rate > 0):
        return (f"The backdoor did not take: only {pct(asr)} of triggered images go to the target. More poisoned "
                "images, more epochs or a more visible trigger make it work; a defense has little to remove here.")
    return ""


def trigger_on_grey(attack, shape, scale: int = 4) -> np.ndarray:
    """The trigger drawn on a plain grey image (a patch shows as a crisp square)."""
    import torch

    grey = torch.full((1, *shape), 128, dtype=torch.uint8)
    return to_display(attack.render(grey)["poisoned"][0], scale)


def paradigm_rows(result: dict) -> list[dict]:
    """For transfer and encoder results: the models before the defenses, with percentages."""
    rows = []
    if result.get("paradigm") == "transfer":
        for key, what in (("attacker", f"attacker's model on {result.get('dataset')} (upstream)"),
                          ("victim_head", f"victim on {result.get('downstream')}: new head only"),
                          ("victim_full", f"victim on {result.get('downstream')}: whole model trained")):
            if key in result:
                row = {"model": what, "CA": pct(result[key].get("clean_acc")), "ASR": pct(result[key].get("asr"))}
                if key != "attacker":
                    row["target class recognised"] = pct(result[key].get("target_recall"))
                rows.append(row)
    elif result.get("paradigm") == "encoder" and "clean_encoder" in result:
        ce = result["clean_encoder"]
        rows.append({"model": f"victim's probe on the clean encoder ({result.get('downstream')})",
                     "CA": pct(ce.get("clean_acc")), "ASR": pct(ce.get("asr"))})
        rows.append({"model": "victim's probe on the BadEncoder encoder", "CA": pct(result["poisoned"].get("clean_acc")),
                     "ASR": pct(result["poisoned"].get("asr"))})
    return rows


def transfer_reading(result: dict, low: float = 0.1) -> str:
    """For a transfer result whose backdoor did not reach the victim: whether the victim's model can
    recognise the target class at all (if not, no feature-space backdoor can steer images to it)."""
    if result.get("paradigm") != "transfer":
        return ""
    v = result.get("victim_head") or {}
    rec, asr = v.get("target_recall"), v.get("asr")
    if rec is None or asr is None or asr > 0.5:
        return ""
    if rec < low:
        return (f"The victim's new head recognises only {pct(rec, 1)} of clean test images of target class "
                f"{result.get('target', '?')}, so the backdoor has no region of the victim's model to send triggered "
                "images to. Choose a target class the victim's data holds many distinctive images of, or give the "
                "attacker's model more training so its features separate that class.")
    return (f"The victim's new head recognises {pct(rec, 1)} of clean target-class images, yet the trigger moves "
            f"only {pct(asr, 1)} of triggered images there: the backdoor did not survive the new head.")


def _known(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _delta(a, b) -> str:
    if not (_known(a) and _known(b)):
        return "–"
    return f"{100 * (a - b):+.1f} pts"


def _secs(s) -> str:
    return f"{s:.1f}" if _known(s) else "–"


def run_series(run) -> list[dict]:
    """A stored run's history as curve points."""
    return [{"epoch": h.get("epoch", 0.0), "step": h.get("step", 0), "asr": h.get("asr"),
             "clean_acc": h.get("clean_acc")} for h in (run.history or [])]


def role_of(run) -> str:
    """The name that gives a stored run its colour and label: "poisoned" for an attack run,
    "victim_head" / "victim_full" for a transfer victim, else the defense's name."""
    if run.kind == "victim":
        return "victim_full" if (run.config or {}).get("victim") == "full" else "victim_head"
    return "poisoned" if run.kind == "attack" else str(run.name)


def run_bar_rows(runs: Iterable) -> list[dict]:
    """Rows for :func:`before_after_figure` from stored runs, each labelled with its short run id
    (two poisoned runs and their FT children stay apart)."""
    return [{"name": role_of(r), "label": run_label(r), "clean_acc": r.final.get("clean_acc"),
             "asr": r.final.get("asr")} for r in runs]


def run_label(run) -> str:
    """A stored run's name in figures: its role, its short id, and for a defense the poisoned run it
    started from (two poisoned runs' FT children stay apart)."""
    label = f"{label_of(role_of(run))} · {run.id[-6:]}"
    return label + (f" (of {run.parent[-6:]})" if run.kind == "defense" and run.parent else "")


def compare_figure(runs: Iterable, height: int = 360):
    """Curves of several stored runs, one line each (labelled by run id and name). Poisoned models'
    trainings and defenses get a row each when both are there: their epochs count different things
    (passes over the training set, over the defender's clean data)."""
    go, make_subplots = _go()
    runs = list(runs)
    trained = {r.id for r in runs if r.kind in ("attack", "victim")}
    rows = 2 if trained and len(trained) < len(runs) else 1
    titles = ("Attack success rate", "Clean accuracy")
    if rows == 2:
        titles = ("Training the poisoned models: ASR", "… and CA",
                  "Defenses, each from its poisoned model: ASR", "… and CA")
    fig = make_subplots(rows=rows, cols=2, subplot_titles=titles, vertical_spacing=0.2)
    seen: dict[str, int] = {}
    for run in runs:
        pts = run_series(run)
        label = run_label(run)  # the bars' names too
        color = color_of(role_of(run))
        nth = seen[role_of(run)] = seen.get(role_of(run), -1) + 1  # a second FT run: same colour, other dashes
        dash = "dot" if run.kind == "victim" else (None, "dash", "dashdot", "longdash")[nth % 4]
        row = 2 if rows == 2 and run.id not in trained else 1
        for col, key in ((1, "asr"), (2, "clean_acc")):
            fig.add_trace(go.Scatter(x=[p["epoch"] for p in pts],
                                     y=[None if p[key] is None else 100 * p[key] for p in pts],
                                     mode="lines+markers", name=label, legendgroup=run.id, showlegend=col == 1,
                                     line={"color": color, "dash": dash}), row=row, col=col)
    fig.update_yaxes(range=[0, 100], ticksuffix="%")
    fig.update_xaxes(title_text="epoch")
    # the legend below the axis titles, not over them
    fig.update_layout(height=height * rows, margin={"l": 40, "r": 10, "t": 50, "b": 40},
                      legend={"orientation": "h", "y": -0.14 if rows == 2 else -0.3})
    return fig


# -- images ------------------------------------------------------------------------------------------
def to_display(img, scale: int = 4) -> np.ndarray:
    """A float (C, H, W) image in [0, 1] as uint8 (H*scale, W*scale, 3), nearest-neighbour enlarged
    so that small triggers stay crisp."""
    a = np.asarray(img.detach().cpu() if hasattr(img, "detach") else img, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = np.clip(a, 0, 1)
    if scale > 1:
        a = a.repeat(scale, 0).repeat(scale, 1)
    return (a * 255 + 0.5).astype(np.uint8)


def residual_display(res, scale: int = 4) -> np.ndarray:
    """A residual in [-1, 1] shown around mid-grey, amplified to use the full range."""
    r = np.asarray(res.detach().cpu().float() if hasattr(res, "detach") else res, dtype=np.float32)
    m = float(np.abs(r).max())
    k = 0.5 / m if m > 0 else 0.0
    return to_display(0.5 + r * k, scale)


def trigger_preview(attack, x_uint8, n: int = 6, scale: int | None = None) -> dict[str, list[np.ndarray]]:
    """Display-ready rows for a preview grid: ``clean``, ``poisoned``, ``residual`` (n images each)."""
    x = x_uint8[:n].cpu()
    r = attack.render(x)
    h = x.shape[-1]
    s = scale or max(1, 96 // h)
    return {"clean": [to_display(i, s) for i in r["clean"]], "poisoned": [to_display(i, s) for i in r["poisoned"]],
            "residual": [residual_display(i, s) for i in r["residual"]]}


__all__ = ["ATTACK_COLOR", "CAPTIONS", "COLORS", "before_after_figure", "color_of", "compare_figure", "conclusion",
           "count", "curves_figure", "duration", "label_of", "paradigm_rows", "pct", "residual_display", "role_of",
           "run_bar_rows", "run_label", "run_series", "schedule_figure", "summary_rows", "to_display", "training_warning",
           "transfer_reading", "trigger_on_grey", "trigger_preview"]


# -- comparing defenses ------------------------------------------------------------------------------
def comparison_rows(poisoned: dict, rows: list[dict]) -> list[dict]:
    """The defense-comparison table for display: one row per defense (rows as made by
    :func:`bdft_core.compare.row_of`), with percentages, changes, seconds and what it needed."""
    out = [{"defense": "poisoned model (before)", "CA": pct(poisoned.get("clean_acc")), "ASR": pct(poisoned.get("asr")),
            "ΔCA": "", "ΔASR": "", "seconds": _secs(poisoned.get("seconds")), "detection": "",
            "needs": "(trained by the attacker)"}]
    for r in rows:
        det = ""
        if r.get("precision") is not None:
            det = f"precision {pct(r['precision'], 0)}, recall {pct(r.get('recall'), 0)}"
        elif r.get("flagged_classes") is not None:
            det = ("flagged class " + ", ".join(map(str, r["flagged_classes"]))) if r["flagged_classes"] else "no class flagged"
        name = r.get("title") or label_of(r["defense"])
        if r.get("status", "finished") != "finished":  # a stopped run's figures are where it stopped
            name += f" ({r['status']})"
        out.append({"defense": name, "CA": pct(r.get("clean_acc")),
                     "ASR": pct(r.get("asr")), "ΔCA": _delta(r.get("clean_acc"), poisoned.get("clean_acc")),
                     "ΔASR": _delta(r.get("asr"), poisoned.get("asr")), "seconds": _secs(r.get("seconds")),
                     "detection": det, "needs": r.get("needs", "")})
    return out


def cost_scatter(poisoned: dict, rows: list[dict], height: int = 420):
    """Clean accuracy (x) against attack success rate (y), one marker per defense, its area
    proportional to the defense's wall time; the poisoned model as a red cross. The best place is the
    bottom right: low ASR, high CA."""
    go, _ = _go()
    fig = go.Figure()
    secs = [r.get("seconds") if _known(r.get("seconds")) else None for r in rows]
    top = max([s for s in secs if s is not None] + [1e-9])
    for r, s in zip(rows, secs):
        if r.get("clean_acc") is None or r.get("asr") is None:
            continue
        size = 12 + 48 * math.sqrt(s / top) if s is not None else 30  # area grows with cost; unknown: middling
        took = f"{s:.1f} s" if s is not None else "time not recorded"
        fig.add_trace(go.Scatter(x=[100 * r["clean_acc"]], y=[100 * r["asr"]], mode="markers+text",
                                 name=r.get("title") or label_of(r["defense"]), text=[r["defense"]],
                                 textposition="top center",
                                 marker={"size": size, "color": color_of(r["defense"]), "opacity": 0.75,
                                         "line": {"width": 1, "color": "#333"}},
                                 hovertemplate=(f"{r.get('title') or r['defense']}<br>CA %{{x:.1f}}%<br>"
                                                f"ASR %{{y:.1f}}%<br>{took}<extra></extra>")))
    if poisoned.get("clean_acc") is not None and poisoned.get("asr") is not None:
        fig.add_trace(go.Scatter(x=[100 * poisoned["clean_acc"]], y=[100 * poisoned["asr"]], mode="markers+text",
                                 name="poisoned model", text=["poisoned"], textposition="bottom center",
                                 marker={"symbol": "x", "size": 14, "color": color_of("attack")}))
    fig.update_layout(height=height, margin={"l": 50, "r": 10, "t": 40, "b": 50},
                      title="Clean accuracy vs attack success rate (marker area: seconds)",
                      xaxis={"title": "clean accuracy (CA), higher is better", "ticksuffix": "%"},
                      yaxis={"title": "attack success rate (ASR), lower is better", "ticksuffix": "%",
                             "range": [-12, 112]})  # room for a large marker at 0% or 100%
    return fig


CAPTIONS["scatter"] = ("Each marker is one defense applied to the same poisoned model. Down is better (the trigger "
                       "works less often), right is better (ordinary images stay correct); a bigger marker took "
                       "longer. The red cross is the poisoned model before any defense.")


def reversed_trigger_display(mask, pattern, scale: int = 4) -> np.ndarray:
    """A reversed-engineered trigger (Neural Cleanse: ``mask`` (1,H,W), ``pattern`` (C,H,W), floats in
    [0, 1]) stamped on a plain grey image, as :func:`trigger_on_grey` draws the real one."""
    import torch

    m = torch.as_tensor(mask).float().clamp(0, 1)
    p = torch.as_tensor(pattern).float().clamp(0, 1)
    img = torch.full_like(p, 0.5) * (1 - m) + p * m
    return to_display(img, scale)


def attack_of_run(run):
    """The attack object a stored run used, rebuilt from its record (for drawing its trigger)."""
    from .attacks import build_attack

    a, m = run.attack, run.model
    shape = (m["channels"], *m["image_size"])
    return build_attack(a["name"], shape, m["num_classes"], target=a.get("target", 0), mode=a.get("mode", "all_to_one"),
                        seed=a.get("seed", 0), **(a.get("params") or {})), shape


# -- attribution maps ----------------------------------------------------------------------------
CAPTIONS["explain"] = ("Trigger-region share: how much of the map lies on the trigger patch (a small patch would get "
                       "about its area share by chance). Map shift: how much the trigger changed the map (0 same, 1 "
                       "completely different). Flipped: share of images whose prediction the trigger changed.")


def explain_rows(result: dict) -> list[dict]:
    """The table under the attribution maps: one row per model."""
    rows = []
    for r in result["rows"]:
        rows.append({"model": label_of("poisoned" if r["model"] == "poisoned" else r["model"]),
                     "layer": r.get("layer") or "(pixels)",
                     "trigger share, clean": pct(r.get("share_clean")),
                     "trigger share, triggered": pct(r.get("share_triggered")),
                     "map shift": "–" if r.get("map_shift") is None else f"{r['map_shift']:.2f}",
                     "flipped by trigger": pct(r.get("flip_rate")), "seconds": _secs(r.get("seconds"))})
    return rows


def explain_sentence(result: dict) -> str:
    """What the maps say, in plain words: compares the poisoned model with its best-cleaned child."""
    rows = {r["model"]: r for r in result["rows"]}
    p = rows.get("poisoned")
    if p is None:
        return ""
    key = "share_triggered" if p.get("share_triggered") is not None else "map_shift"
    what = "of its attention on the trigger patch" if key == "share_triggered" else "change in its map when the trigger is added"
    fmt = (lambda v: pct(v)) if key == "share_triggered" else (lambda v: f"{v:.2f}")
    parts = [f"On triggered images the poisoned model puts {fmt(p[key])} {what}"
             if key == "share_triggered" else f"The poisoned model's map changes by {fmt(p[key])} when the trigger is added"]
    area = result.get("region_area") if key == "share_triggered" else None
    if _known(area) and area > 0 and p[key] < 1.5 * area:  # no more than an even spread would put there
        near = "about" if p[key] >= 0.67 * area else "less than"
        return (f"On triggered images the poisoned model puts {fmt(p[key])} of its attention on the trigger patch, "
                f"{near} what an even spread over the image gives ({fmt(area)}: the patch's share of the pixels). "
                "These maps do not single out the trigger, so they cannot show a defense moving attention away "
                "from it: try another method or layer.")
    others = [r for m, r in rows.items() if m != "poisoned" and r.get(key) is not None]
    if not others:
        return parts[0] + ". Apply a defense in the Defense lab to compare."
    best = min(others, key=lambda r: r[key])
    if not p[key] > 1e-6:  # the poisoned model itself shows nothing there: no drop to speak of
        return parts[0] + f"; after {label_of(best['model'])} it is {fmt(best[key])}: there is no attention on the " \
                          "trigger to remove."
    if not best[key] > 1e-6:
        how = " (down to nothing): the defended model's attention has left the trigger."
    else:
        ratio = p[key] / best[key]
        how = (f" ({ratio:.1f}x less): the defended model's attention has left the trigger." if ratio >= 2 else
               " — not much less: the trigger still draws its attention.")
    parts.append(f"after {label_of(best['model'])} it is {fmt(best[key])}" + how)
    return "; ".join(parts)
