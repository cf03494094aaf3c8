"""Tables and figures of a sweep's results (plotly; no UI framework here).

A sweep's result is a list of ROWS, one plain dict per grid cell: its axis values (``poison_rate``,
``clean_fraction``, ``defense``, ``seed``, ``trigger.size``, ``defense.lr`` ...), its metrics
(:data:`METRICS`: fractions in [0, 1] or seconds; ``None`` when missing) and bookkeeping (``cell``,
``attack_run``, ``defense_run``, ``status``). Only rows with ``status == "finished"`` count in
figures and aggregates; ``None``/NaN metric values are skipped.

Conventions, the same in every function here:

* Order of an axis' values (:func:`axis_values`): numbers ascending; strings in order of first
  appearance in the rows (the runner emits rows in grid order, so this is the order the grid file
  lists them in), except that ``"none"`` (no defense: the poisoned model) comes first on the
  ``defense`` axis, as the baseline; ``None`` (a setting left at its default) last.
* Spread: :func:`aggregate`'s ``std`` is the SAMPLE standard deviation (n - 1 in the denominator,
  what papers report as "± std over seeds"); 0 for a single value.
* Fractions stay fractions in the figures' data (``z``, ``y``) and are shown as percentages through
  the axis/colour-bar tick format and the annotations, so ``fig.data`` holds the real means.
* Colours: "good" is always green in heatmaps (the red-yellow-green scale is reversed for metrics where
  lower is better, such as ASR); lines by defense use :func:`bdft_core.figures.color_of`, with the
  undefended poisoned model (``defense = "none"``) in the attack's red.
"""
from __future__ import annotations

import csv
import datetime as _dt
import html
import io
import json
import math
from typing import Any, Iterable

from ..figures import ATTACK_COLOR, _go, color_of, label_of, pct

# metric key -> (human label, lower_is_better, is_fraction)
METRICS: dict[str, tuple[str, bool, bool]] = {
    "asr": ("ASR after defense", True, True),
    "clean_acc": ("clean accuracy after defense", False, True),
    "poisoned_asr": ("ASR of the poisoned model (before defense)", True, True),
    "poisoned_clean_acc": ("clean accuracy of the poisoned model (before defense)", False, True),
    "asr_change": ("ASR change (after − before defense)", True, True),
    "clean_acc_change": ("clean accuracy change (after − before defense)", False, True),
    "seconds": ("defense time (seconds)", True, False),
    "attack_seconds": ("attack training time (seconds)", True, False),
}
METRIC_COLUMNS = ["poisoned_clean_acc", "poisoned_asr", "clean_acc", "asr", "clean_acc_change", "asr_change",
                  "seconds", "attack_seconds"]
BOOKKEEPING = ["cell", "attack_run", "defense_run", "status"]
_CHANGE = {"asr_change", "clean_acc_change"}
NO_DEFENSE = "none"

_AXIS_LABELS = {
    "poison_rate": "poison rate",
    "clean_fraction": "clean-data budget (fraction of training set)",
    "defense": "defense",
    "seed": "seed",
    "attack": "attack",
    "paradigm": "training paradigm",
    "dataset": "dataset",
    "downstream": "victim's dataset",
    "model": "model",
    "lr": "attack training learning rate",
    "epochs": "attack training epochs",
    "batch_size": "attack training batch size",
    "target": "target class",
    "mode": "target mode",
    "translate": "random-shift augmentation (pixels)",
    "n_train": "training images used",
    "n_test": "test images used",
}
_LINE_COLORS = ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]


def axis_label(name: str) -> str:
    """A readable label for an axis (or metric) name: ``"trigger.size"`` -> ``"trigger: size"``."""
    if name in _AXIS_LABELS:
        return _AXIS_LABELS[name]
    if name in METRICS:
        return METRICS[name][0]
    for prefix, what in (("trigger.", "trigger"), ("defense.", "defense setting"), ("paradigm.", "paradigm setting")):
        if name.startswith(prefix):
            return f"{what}: {name[len(prefix):].replace('_', ' ')}"
    return name.replace("_", " ")


def metric_label(metric: str) -> str:
    return METRICS[metric][0] if metric in METRICS else metric.replace("_", " ")


def format_value(metric: str, v: float | None) -> str:
    """A metric value for display: percentages for fractions (signed points for changes),
    seconds with one decimal, '–' when missing."""
    if not _is_num(v):
        return "–"
    if metric in _CHANGE:
        return f"{100 * v:+.1f} pts"
    if metric in METRICS and METRICS[metric][2]:
        return pct(v)
    if metric in ("seconds", "attack_seconds"):
        return f"{v:.1f} s"
    return f"{v:.4g}"


# -- helpers -----------------------------------------------------------------------------------------
def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _finished(r: dict) -> bool:
    return r.get("status", "finished") == "finished"


def _hkey(v: Any) -> Any:
    """A hashable stand-in for an axis value (lists/dicts as their JSON)."""
    try:
        hash(v)
        return v
    except TypeError:
        return json.dumps(v, sort_keys=True, default=str)


def _tick(v: Any) -> str:
    """An axis value as a category label: 0.05 -> '0.05', 3 -> '3', None -> 'default'."""
    if v is None:
        return "default"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, default=str)
    return str(v)


def _same(a: Any, b: Any) -> bool:
    """Whether a row's value matches a requested one (a UI may pass the displayed string)."""
    return a == b or _tick(a) == _tick(b)


def _filter(rows: Iterable[dict], where: dict | None) -> list[dict]:
    rows = list(rows)
    if not where:
        return rows
    for k in where:
        if not any(k in r for r in rows):
            raise ValueError(f"cannot fix {k!r}: no result row has that column")
    kept = [r for r in rows if all(k in r and _same(r[k], v) for k, v in where.items())]
    if not kept:
        raise ValueError("no result matches " + ", ".join(f"{k} = {_tick(v)}" for k, v in where.items()))
    return kept


def axis_values(rows: Iterable[dict], name: str) -> list:
    """The distinct values of a column, in display order (see the module docstring)."""
    seen: dict[Any, Any] = {}
    for r in rows:
        if name in r:
            seen.setdefault(_hkey(r[name]), r[name])
    vals = list(seen.values())
    nums = sorted((v for v in vals if _is_num(v)), key=float)
    others = [v for v in vals if not _is_num(v) and v is not None]
    if name == "defense" and NO_DEFENSE in others:
        others.remove(NO_DEFENSE)
        others.insert(0, NO_DEFENSE)
    return nums + others + ([None] if any(v is None for v in vals) else [])


def _axis_columns(rows: list[dict]) -> list[str]:
    """Columns that are not metrics or bookkeeping: the axes (when the caller did not say)."""
    skip = set(METRICS) | set(BOOKKEEPING) | {"error", "message"}
    out: list[str] = []
    for r in rows:
        for k in r:
            if k not in skip and k not in out:
                out.append(k)
    return out


def _check_axis(rows: list[dict], name: str, what: str) -> None:
    if not any(name in r for r in rows):
        cols = ", ".join(_axis_columns(rows)) or "(none)"
        raise ValueError(f"{what} {name!r} is not a column of the results; the sweep's axes are: {cols}")


def _stats(vals: list[float]) -> dict:
    n = len(vals)
    if not n:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    mean = math.fsum(vals) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": n}


# -- aggregating -------------------------------------------------------------------------------------
def aggregate(rows: Iterable[dict], by: list[str], metric: str) -> list[dict]:
    """Group the finished rows by the columns ``by`` and summarise ``metric`` in each group.

    Returns one dict per group that has at least one finished row: the ``by`` values, then
    ``metric``, ``mean``, ``std`` (sample standard deviation, 0 for one value), ``min``, ``max`` and
    ``n`` (how many values counted; a group whose values are all None has n = 0 and None
    statistics). Non-finished rows and None/NaN values are ignored. Groups are sorted by their
    values, axis by axis, in :func:`axis_values` order. ``by=[]`` gives one overall group.
    """
    rows = [r for r in rows if _finished(r)]
    order = {b: {_hkey(v): i for i, v in enumerate(axis_values(rows, b))} for b in by}
    groups: dict[tuple, tuple[tuple, list[float]]] = {}
    for r in rows:
        vals = tuple(r.get(b) for b in by)
        key = tuple(_hkey(v) for v in vals)
        g = groups.setdefault(key, (vals, []))
        v = r.get(metric)
        if _is_num(v):
            g[1].append(float(v))
    out = []
    for key, (vals, nums) in sorted(groups.items(),
                                    key=lambda kv: tuple(order[b].get(k, -1) for b, k in zip(by, kv[0]))):
        out.append({**dict(zip(by, vals)), "metric": metric, **_stats(nums)})
    return out


def _averaged(rows: list[dict], keep: list[str], axes: list[str] | None) -> list[str]:
    """The axes that a figure averages over: those not kept that take more than one value."""
    cols = axes if axes is not None else _axis_columns(rows)
    return [a for a in cols if a not in keep and len(axis_values(rows, a)) > 1]


def _over(names: list[str]) -> str:
    return f" (mean over {', '.join(axis_label(n) for n in names)})" if names else ""


def _where_text(where: dict | None) -> str:
    if not where:
        return ""
    return "; " + ", ".join(f"{axis_label(k)} = {_tick(v)}" for k, v in where.items())


# -- heatmap -----------------------------------------------------------------------------------------
def heatmap_figure(rows: Iterable[dict], x: str, y: str, metric: str = "asr", where: dict | None = None,
                   axes: list[str] | None = None, height: int | None = None):
    """A heatmap of ``metric``'s mean over every axis that is neither ``x``, ``y`` nor fixed by
    ``where`` (rows whose columns equal ``where``'s values are kept first). Both axes are
    categorical (evenly spaced values); cells carry the value ("4.1%", with "± std" when several
    values were averaged); a combination without a finished result is blank (None in ``z``).
    ``fig.data[0].z[i][j]`` is the mean for ``y`` value i and ``x`` value j (fractions as fractions).
    ``axes`` (the sweep's axis names) only serves to name what was averaged in the title."""
    go, _ = _go()
    rows = list(rows)
    if x == y:
        raise ValueError(f"the heatmap needs two different axes; both are {x!r}")
    if not rows:
        raise ValueError("no results to draw")
    _check_axis(rows, x, "x axis")
    _check_axis(rows, y, "y axis")
    rows = _filter(rows, where)
    xs, ys = axis_values(rows, x), axis_values(rows, y)
    cells = {(_hkey(a[y]), _hkey(a[x])): a for a in aggregate(rows, [y, x], metric)}
    z, text, hover = [], [], []
    for yv in ys:
        zr, tr, hr = [], [], []
        for xv in xs:
            a = cells.get((_hkey(yv), _hkey(xv)))
            m = a["mean"] if a else None
            zr.append(m)
            if m is None:
                tr.append("")
                hr.append("no finished result" if a is None else "no value")
                continue
            t = format_value(metric, m)
            if a["n"] > 1:
                t += f" ± {_spread_text(metric, a['std'])}"
            tr.append(t)
            lo, hi = format_value(metric, a["min"]), format_value(metric, a["max"])
            hr.append(f"{t}<br>n = {a['n']}, min {lo}, max {hi}")
        z.append(zr)
        text.append(tr)
        hover.append(hr)
    lower, is_frac = METRICS.get(metric, (metric, False, False))[1:]
    scale: dict[str, Any] = {"colorscale": "RdYlGn", "reversescale": lower}
    if metric in _CHANGE:
        scale["zmid"] = 0.0
    elif is_frac:
        scale.update(zmin=0.0, zmax=1.0)
    colorbar = {"tickformat": ".0%"} if is_frac else {}
    fig = go.Figure(go.Heatmap(z=z, x=[_tick(v) for v in xs], y=[_tick(v) for v in ys], text=text,
                               texttemplate="%{text}", customdata=hover, hoverongaps=False,
                               hovertemplate=(f"{axis_label(x)}: %{{x}}<br>{axis_label(y)}: %{{y}}<br>"
                                              "%{customdata}<extra></extra>"),
                               colorbar=colorbar, **scale))
    averaged = _averaged(rows, [x, y] + list(where or {}), axes)
    title = (f"{metric_label(metric)}{_over(averaged)} by {axis_label(x)} and {axis_label(y)}"
             f"{_where_text(where)}")
    fig.update_layout(title={"text": title}, height=height or max(320, 120 + 60 * len(ys)),
                      margin={"l": 60, "r": 10, "t": 60, "b": 50},
                      xaxis={"title": {"text": axis_label(x)}, "type": "category"},
                      yaxis={"title": {"text": axis_label(y)}, "type": "category"})
    return fig


def _spread_text(metric: str, s: float) -> str:
    if metric in METRICS and METRICS[metric][2]:
        return f"{100 * s:.1f}"  # points, after a percentage
    return f"{s:.2g}"


# -- lines -------------------------------------------------------------------------------------------
def _band_color(hex_color: str, alpha: float = 0.18) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _group_style(group: str | None, value: Any, i: int) -> tuple[str, str]:
    """(name, colour) of one line."""
    if group == "defense":
        if value == NO_DEFENSE:
            return "no defense (poisoned model)", ATTACK_COLOR
        return label_of(str(value)), color_of(str(value))
    if group is None:
        return "all", _LINE_COLORS[0]
    return f"{axis_label(group)} = {_tick(value)}", _LINE_COLORS[i % len(_LINE_COLORS)]


def line_points(rows: Iterable[dict], x: str, metric: str = "asr", group: str | None = "defense",
                spread: str | None = "seed", where: dict | None = None) -> list[dict]:
    """The numbers behind :func:`lines_figure`: one dict per (group value, x value) with ``group``
    (the value, or None), ``x``, ``mean``, ``lo``, ``hi`` and ``n`` (number of spread values).

    With a ``spread`` axis, the values are first averaged over the other non-fixed axes for each
    spread value; ``mean`` is the mean of those per-spread means and ``lo``/``hi`` their min/max
    (the band). Without one, ``mean`` is the plain mean and ``lo``/``hi`` equal it."""
    rows = _filter(rows, where)
    if group is not None and not any(group in r for r in rows):
        group = None
    if spread is not None and (not any(spread in r for r in rows) or spread in (x, group)):
        spread = None
    by = ([group] if group else []) + [x] + ([spread] if spread else [])
    pts: dict[tuple, dict] = {}
    for a in aggregate(rows, by, metric):
        gv = a[group] if group else None
        p = pts.setdefault((_hkey(gv), _hkey(a[x])), {"group": gv, "x": a[x], "means": []})
        if a["mean"] is not None:
            p["means"].append(a["mean"])
    out = []
    for p in pts.values():
        ms = p.pop("means")
        if not ms:
            out.append({**p, "mean": None, "lo": None, "hi": None, "n": 0})
            continue
        out.append({**p, "mean": math.fsum(ms) / len(ms), "lo": min(ms), "hi": max(ms), "n": len(ms)})
    return out


def lines_figure(rows: Iterable[dict], x: str, metric: str = "asr", group: str | None = "defense",
                 spread: str | None = "seed", where: dict | None = None, axes: list[str] | None = None,
                 height: int = 380):
    """One line per value of ``group`` (one line when ``group`` is None or not a column): the mean of
    ``metric`` against ``x``, over ``spread`` and every other axis not fixed by ``where``, with a
    shaded band from the min to the max over ``spread`` where it has more than one value (traces
    ``"<name>: min"`` and ``"<name>: max"``, the latter filled down to the former). The x axis is
    numeric when every x value is a number, categorical otherwise; fractions are drawn on 0..100%."""
    go, _ = _go()
    rows = list(rows)
    if not rows:
        raise ValueError("no results to draw")
    _check_axis(rows, x, "x axis")
    if group is not None and group == x:
        raise ValueError(f"the lines cannot be grouped by their own x axis {x!r}")
    frows = _filter(rows, where)
    if group is not None and not any(group in r for r in frows):
        group = None
    if spread is not None and (not any(spread in r for r in frows) or spread in (x, group)):
        spread = None
    pts = line_points(frows, x, metric, group, spread)
    xs = axis_values(frows, x)
    numeric = all(_is_num(v) for v in xs)
    groups = axis_values(frows, group) if group else [None]
    fig = go.Figure()
    for i, gv in enumerate(groups):
        mine = {_hkey(p["x"]): p for p in pts if _hkey(p["group"]) == _hkey(gv)}
        seq = [mine[_hkey(v)] for v in xs if _hkey(v) in mine]
        if not seq:
            continue
        name, color = _group_style(group, gv, i)
        xv = [p["x"] if numeric else _tick(p["x"]) for p in seq]
        if spread and any(p["n"] > 1 for p in seq):
            band = [(a, p) for a, p in zip(xv, seq) if p["mean"] is not None]
            bx = [a for a, _ in band]
            fig.add_trace(go.Scatter(x=bx, y=[p["lo"] for _, p in band], mode="lines", name=f"{name}: min",
                                     legendgroup=name, showlegend=False, line={"width": 0, "color": color},
                                     hoverinfo="skip"))
            fig.add_trace(go.Scatter(x=bx, y=[p["hi"] for _, p in band], mode="lines", name=f"{name}: max",
                                     legendgroup=name, showlegend=False, line={"width": 0, "color": color},
                                     fill="tonexty", fillcolor=_band_color(color), hoverinfo="skip"))
        hover = [(f"{format_value(metric, p['mean'])}" +
                  (f" (range {format_value(metric, p['lo'])} – {format_value(metric, p['hi'])} over "
                   f"{p['n']} {axis_label(spread)} values)" if spread and p["n"] > 1 else ""))
                 for p in seq]
        fig.add_trace(go.Scatter(x=xv, y=[p["mean"] for p in seq], mode="lines+markers", name=name,
                                 legendgroup=name, line={"color": color}, customdata=hover,
                                 hovertemplate=(f"{axis_label(x)} %{{x}}: %{{customdata}}"
                                                f"<extra>{html.escape(name)}</extra>")))
    lower, is_frac = METRICS.get(metric, (metric, False, False))[1:]
    yaxis: dict[str, Any] = {"title": {"text": metric_label(metric) + (" — lower is better" if lower else
                                                                       " — higher is better")}}
    if is_frac:
        yaxis["tickformat"] = ".0%"
        if metric not in _CHANGE:
            yaxis["range"] = [-0.02, 1.02]
    xaxis: dict[str, Any] = {"title": {"text": axis_label(x)}}
    if numeric:
        xaxis["type"] = "linear"
    else:
        xaxis.update(type="category", categoryorder="array", categoryarray=[_tick(v) for v in xs])
    averaged = _averaged(frows, [x] + ([group] if group else []) + list(where or {}), axes)
    title = f"{metric_label(metric)}{_over(averaged)} by {axis_label(x)}"
    if spread and spread in averaged:
        title += f"; band: min–max over {axis_label(spread)}"
    fig.update_layout(title={"text": title + _where_text(where)}, height=height, xaxis=xaxis, yaxis=yaxis,
                      margin={"l": 60, "r": 10, "t": 60, "b": 50}, legend={"orientation": "h", "y": -0.2})
    return fig


# -- tables and exports ------------------------------------------------------------------------------
def csv_columns(rows: Iterable[dict], axes: list[str]) -> list[str]:
    """Axis columns (grid order), metric columns, bookkeeping, then any other column found."""
    cols = list(axes) + [c for c in METRIC_COLUMNS + BOOKKEEPING if c not in axes]
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # shortest exact form: 0.05 -> "0.05"
    if isinstance(v, (list, dict)):
        return json.dumps(v, default=str)
    return str(v)


def rows_csv(rows: Iterable[dict], axes: list[str]) -> str:
    """The results as CSV: axes first (in ``axes`` order), then the metric columns (fractions as
    fractions), then bookkeeping (cell, runs, status), then anything else the rows carry. None is
    an empty field."""
    rows = list(rows)
    cols = csv_columns(rows, axes)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        w.writerow([_csv_cell(r.get(c)) for c in cols])
    return buf.getvalue()


TABLE_METRICS = [("poisoned_clean_acc", "CA before"), ("poisoned_asr", "ASR before"), ("clean_acc", "CA after"),
                 ("asr", "ASR after"), ("clean_acc_change", "ΔCA"), ("asr_change", "ΔASR"),
                 ("seconds", "defense seconds")]


def unfit_trainings(rows: Iterable[dict], num_classes, poison_rate: float | None = None) -> dict[str, str]:
    """The poisoned trainings of finished cells that are not fit to study, by attack run id, with the
    plain-words reason (:func:`bdft_core.figures.training_warning`): a model that never learned
    (clean accuracy near chance) or a backdoor that did not take. ``num_classes(run_id)`` gives a
    training's number of classes; ``poison_rate`` is the grid's where no cell varies it."""
    from ..figures import training_warning

    out: dict[str, str] = {}
    for r in rows:
        rid = r.get("attack_run")
        if r.get("status") != "finished" or not rid or rid in out:
            continue
        why = training_warning(r.get("poisoned_clean_acc"), r.get("poisoned_asr"), num_classes(rid),
                               r.get("poison_rate", poison_rate))
        if why:
            out[rid] = why
    return out


def table_rows(rows: Iterable[dict], axes: list[str]) -> list[dict]:
    """The results for display: axis values as text, metrics formatted, one dict per cell."""
    out = []
    for r in rows:
        d = {axis_label(a): _tick(r.get(a)) if a in r else "" for a in axes}
        for key, head in TABLE_METRICS:
            d[head] = format_value(key, r.get(key))
        d["status"] = str(r.get("status", ""))
        d["cell"] = str(r.get("cell", ""))
        out.append(d)
    return out


def html_report(title: str, spec: dict, rows: Iterable[dict], axes: list[str], figures: list) -> str:
    """A standalone HTML page: the title, the grid spec, the figures (plotly.js inlined once, so the
    page opens offline) and the results table. Every value from the rows or the spec is escaped."""
    rows = list(rows)
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figures)]
    table = table_rows(rows, axes)
    heads = (list(table[0]) if table else
             [axis_label(a) for a in axes] + [h for _, h in TABLE_METRICS] + ["status", "cell"])
    head = "".join(f"<th>{html.escape(h)}</th>" for h in heads)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(t.get(h, '')))}</td>" for h in heads) + "</tr>"
                   for t in table)
    counts: dict[str, int] = {}
    for r in rows:
        s = str(r.get("status", ""))
        counts[s] = counts.get(s, 0) + 1
    status = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no cells"
    spec_text = json.dumps(spec, indent=1, default=str, ensure_ascii=False)
    when = _dt.datetime.now().isoformat(timespec="minutes")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
pre{{background:#f6f6f6;padding:8px;overflow:auto}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<p>Made by bdft on {when}. A sweep: every combination of the grid's axes is one cell (poison, train, defend).
CA: clean accuracy (higher is better). ASR: attack success rate, the share of triggered test images (true class
not the target) classified as the target (lower is better after a defense). Cells: {html.escape(status)}.</p>
<h2>Grid</h2>
<pre>{html.escape(spec_text)}</pre>
<h2>Figures</h2>
{''.join(parts)}
<h2>Results</h2>
<table><tr>{head}</tr>{body}</table>
</body></html>"""


# -- defaults for a UI -------------------------------------------------------------------------------
def default_views(axes: list[str], rows: Iterable[dict]) -> dict:
    """Sensible first choices for a UI: ``metric``; heatmap ``x``, ``y`` and ``where`` (the other
    varying axes, seed aside, fixed to their first value -- for ``defense`` the first real defense);
    lines ``line_x``, ``group``, ``spread`` and ``line_where``. ``x``/``y``/``line_x`` may be None
    when the sweep has too few varying axes."""
    rows = list(rows)
    varying = [a for a in axes if len(axis_values(rows, a)) > 1]
    cands = [a for a in ("poison_rate", "clean_fraction") if a in varying]
    cands += [a for a in varying if a not in cands and a != "seed"]
    x = cands[0] if cands else (axes[0] if axes else None)
    y = cands[1] if len(cands) > 1 else None
    group = "defense" if "defense" in varying else None
    others = [a for a in cands if a != group]
    if others:
        line_x = others[0]
    elif group:
        line_x, group = group, None
    else:
        line_x = "seed" if "seed" in varying else x
    spread = "seed" if "seed" in axes else None
    has_asr = any(_is_num(r.get("asr")) for r in rows if _finished(r))
    metric = "asr" if has_asr or not rows else "clean_acc"

    def fix(keep: set) -> dict:
        out = {}
        for a in varying:
            if a in keep or a == spread:
                continue
            vals = axis_values(rows, a)
            if a == "defense":
                real = [v for v in vals if v != NO_DEFENSE]
                vals = real or vals
            out[a] = vals[0]
        return out

    return {"metric": metric, "x": x, "y": y, "where": fix({x, y}), "line_x": line_x, "group": group,
            "spread": spread, "line_where": fix({line_x, group})}


__all__ = ["BOOKKEEPING", "METRICS", "METRIC_COLUMNS", "aggregate", "axis_label", "axis_values", "csv_columns",
           "default_views", "format_value", "heatmap_figure", "html_report", "line_points", "lines_figure",
           "metric_label", "rows_csv", "table_rows", "unfit_trainings"]
