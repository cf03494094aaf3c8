"""Exports of stored runs: CSV (one row per run, or every curve point), JSON (the full records)
and a standalone HTML report with the plotly figures embedded (plotly.js inlined, so it opens
offline and can be emailed as one file)."""
from __future__ import annotations

import csv
import datetime as _dt
import html
import io
import json

from .figures import before_after_figure, compare_figure, label_of, pct, run_bar_rows
from .runs import finite_json

SUMMARY_FIELDS = ["id", "kind", "parent", "created", "dataset", "model", "attack", "defense", "status",
                  "clean_acc", "asr", "seconds", "poison_rate", "clean_fraction", "seed", "device"]


def summary_row(run) -> dict:
    return {"id": run.id, "kind": run.kind, "parent": run.parent or "",
            "created": _dt.datetime.fromtimestamp(run.created).isoformat(timespec="seconds"),
            "dataset": run.dataset, "model": run.model.get("name"), "attack": run.attack.get("name"),
            "defense": (run.defense or {}).get("name", ""), "status": run.status,
            "clean_acc": run.final.get("clean_acc"), "asr": run.final.get("asr"),
            "seconds": run.timings.get("total_s"), "poison_rate": run.attack.get("poison_rate"),
            "clean_fraction": run.config.get("clean_fraction", ""), "seed": run.seed, "device": run.device}


def runs_csv(runs) -> str:
    """One row per run: key figures (accuracies as fractions)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
    w.writeheader()
    for r in runs:
        w.writerow(summary_row(r))
    return buf.getvalue()


def history_csv(runs) -> str:
    """Every recorded curve point of every run (long format)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["run_id", "name", "step", "total_steps", "epoch", "clean_acc", "asr", "loss",
                                        "lr", "elapsed_s"], extrasaction="ignore")
    w.writeheader()
    for r in runs:
        for h in r.history:
            w.writerow({"run_id": r.id, "name": r.name, **h})
    return buf.getvalue()


def runs_json(runs) -> str:
    return json.dumps(finite_json({"runs": [r.to_json() for r in runs]}), indent=1, default=str)


def html_report(runs, title: str = "bdft report") -> str:
    """A standalone HTML page: a summary table, the before/after bars and the curves."""
    runs = list(runs)
    figs = [compare_figure(runs)]
    if runs:
        figs.insert(0, before_after_figure(run_bar_rows(runs)))
    parts = []
    for i, f in enumerate(figs):
        parts.append(f.to_html(full_html=False, include_plotlyjs=(i == 0)))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("run", "kind", "dataset", "attack / defense", "CA", "ASR",
                                                          "seconds", "status"))
    body = ""
    for r in runs:
        what = label_of(r.name) if r.kind == "defense" else r.attack.get("title", r.attack.get("name", ""))
        secs = r.timings.get("total_s")
        body += ("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            r.id, r.kind, r.dataset, what, pct(r.final.get("clean_acc")), pct(r.final.get("asr")),
            "" if secs is None else f"{secs:.1f}", r.status)) + "</tr>")
    when = _dt.datetime.now().isoformat(timespec="minutes")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<p>Made by bdft on {when}. CA: clean accuracy (higher is better). ASR: attack success rate, the share of triggered
test images (true class not the target) classified as the target (lower is better after a defense).</p>
<table><tr>{head}</tr>{body}</table>
{''.join(parts)}
</body></html>"""


__all__ = ["history_csv", "html_report", "runs_csv", "runs_json", "summary_row"]
