"""Sweep tables and figures on hand-built result rows (no training)."""
from __future__ import annotations

import csv
import io
import math

import pytest

from bdft_core.sweeps.figures import (METRICS, aggregate, axis_label, default_views, heatmap_figure, html_report,
                                      line_points, lines_figure, rows_csv)

AXES = ["poison_rate", "clean_fraction", "seed"]
# (poison_rate, clean_fraction, seed) -> asr; None: no value; the (0.2, 0.2, 1) cell failed
ASR = {(0.05, 0.05, 0): 0.5, (0.05, 0.05, 1): 0.25, (0.05, 0.2, 0): 0.125, (0.05, 0.2, 1): None,
       (0.2, 0.05, 0): 1.0, (0.2, 0.05, 1): 0.75, (0.2, 0.2, 0): 0.5, (0.2, 0.2, 1): 0.25}


def _row(pr, cf, seed, asr, status="finished", **extra):
    return {"poison_rate": pr, "clean_fraction": cf, "seed": seed, "poisoned_clean_acc": 0.75, "poisoned_asr": 1.0,
            "clean_acc": 0.625, "asr": asr, "clean_acc_change": -0.125,
            "asr_change": None if asr is None else asr - 1.0,
            "seconds": 1.5, "attack_seconds": 10.0, "cell": f"c{pr}{cf}{seed}", "attack_run": "a1",
            "defense_run": "d1", "status": status, **extra}


def _rows():
    return [_row(pr, cf, s, a, status="failed" if (pr, cf, s) == (0.2, 0.2, 1) else "finished")
            for (pr, cf, s), a in ASR.items()]


def test_labels_and_metrics():
    assert axis_label("poison_rate") == "poison rate"
    assert axis_label("clean_fraction") == "clean-data budget (fraction of training set)"
    assert axis_label("trigger.size") == "trigger: size"
    assert axis_label("defense.lr") == "defense setting: lr"
    assert axis_label("lr") == "attack training learning rate"
    assert axis_label("seed") == "seed"
    assert METRICS["asr"][1:] == (True, True) and METRICS["clean_acc"][1:] == (False, True)
    assert METRICS["seconds"][2] is False


def test_aggregate_exact_numbers():
    agg = aggregate(_rows(), ["poison_rate"], "asr")
    assert [a["poison_rate"] for a in agg] == [0.05, 0.2]
    a, b = agg
    # 0.05: 0.5, 0.25, 0.125 (the None ignored)
    assert a["n"] == 3 and a["mean"] == pytest.approx(7 / 24) and a["std"] == pytest.approx(math.sqrt(21) / 24)
    assert (a["min"], a["max"]) == (0.125, 0.5)
    # 0.2: 1.0, 0.75, 0.5 (the failed row's 0.25 ignored)
    assert b["n"] == 3 and b["mean"] == pytest.approx(0.75) and b["std"] == pytest.approx(0.25)
    assert (b["min"], b["max"]) == (0.5, 1.0)

    cells = aggregate(_rows(), ["clean_fraction", "poison_rate"], "asr")
    assert [(c["clean_fraction"], c["poison_rate"]) for c in cells] == [(0.05, 0.05), (0.05, 0.2), (0.2, 0.05),
                                                                         (0.2, 0.2)]
    assert [c["mean"] for c in cells] == pytest.approx([0.375, 0.875, 0.125, 0.5])
    assert [c["n"] for c in cells] == [2, 2, 1, 1]
    assert cells[0]["std"] == pytest.approx(0.125 * math.sqrt(2))  # sample std
    assert cells[2]["std"] == 0.0 and cells[3]["std"] == 0.0  # single values
    # a group whose only value is None: n = 0, no statistics
    only_none = aggregate([_row(0.1, 0.1, 0, None)], ["poison_rate"], "asr")
    assert only_none == [{"poison_rate": 0.1, "metric": "asr", "mean": None, "std": None, "min": None, "max": None,
                          "n": 0}]


def test_aggregate_order_numbers_and_defense():
    rows = [_row(pr, 0.2, 0, 0.5, defense=d) for pr in (0.2, 0.05, 0.1) for d in ("sft", "none", "ft")]
    assert [a["poison_rate"] for a in aggregate(rows, ["poison_rate"], "asr")] == [0.05, 0.1, 0.2]
    # defense: "none" (the poisoned model) first, then the order of first appearance
    assert [a["defense"] for a in aggregate(rows, ["defense"], "asr")] == ["none", "sft", "ft"]


def test_heatmap_matrix_orientation_and_text():
    fig = heatmap_figure(_rows(), x="poison_rate", y="clean_fraction", metric="asr")
    h = fig.data[0]
    assert tuple(h.x) == ("0.05", "0.2") and tuple(h.y) == ("0.05", "0.2")
    # z[i][j]: clean_fraction i, poison_rate j
    assert [list(r) for r in h.z] == [[pytest.approx(0.375), pytest.approx(0.875)], [0.125, 0.5]]
    assert h.text[0][0] == "37.5% ± 17.7" and h.text[1][0] == "12.5%"
    assert h.reversescale is True and (h.zmin, h.zmax) == (0.0, 1.0)  # low ASR is green
    assert fig.layout.xaxis.type == "category" and fig.layout.xaxis.title.text == "poison rate"
    assert fig.layout.yaxis.title.text == "clean-data budget (fraction of training set)"
    assert fig.layout.title.text == "ASR after defense (mean over seed) by poison rate and clean-data budget " \
                                    "(fraction of training set)"
    ca = heatmap_figure(_rows(), x="poison_rate", y="clean_fraction", metric="clean_acc")
    assert ca.data[0].reversescale is False  # high clean accuracy is green


def test_heatmap_missing_blank_and_where():
    rows = [r for r in _rows() if (r["poison_rate"], r["clean_fraction"]) != (0.2, 0.2)]
    z = heatmap_figure(rows, x="poison_rate", y="clean_fraction").data[0].z
    assert z[1][1] is None and z[0][1] == pytest.approx(0.875)
    # only a failed row for a combination: blank too, not zero
    rows = [r for r in _rows() if not (r["poison_rate"] == 0.2 and r["clean_fraction"] == 0.2 and r["seed"] == 0)]
    h = heatmap_figure(rows, x="poison_rate", y="clean_fraction").data[0]
    assert h.z[1][1] is None and h.text[1][1] == ""
    # where: fix the seed to 1
    h = heatmap_figure(_rows(), x="poison_rate", y="clean_fraction", where={"seed": 1}).data[0]
    # (0.05, 0.2, 1) has no value, (0.2, 0.2, 1) failed
    assert list(h.z[0]) == [0.25, 0.75] and list(h.z[1]) == [None, None]


def test_heatmap_errors():
    with pytest.raises(ValueError, match="two different axes"):
        heatmap_figure(_rows(), x="seed", y="seed")
    with pytest.raises(ValueError, match="'defense' is not a column"):
        heatmap_figure(_rows(), x="poison_rate", y="defense")
    with pytest.raises(ValueError, match="cannot fix 'attack'"):
        heatmap_figure(_rows(), x="poison_rate", y="seed", where={"attack": "badnets"})
    with pytest.raises(ValueError, match="no results"):
        heatmap_figure([], x="poison_rate", y="seed")
    with pytest.raises(ValueError, match="no result matches seed = 7"):
        heatmap_figure(_rows(), x="poison_rate", y="clean_fraction", where={"seed": 7})


def _defense_rows():
    # defense x poison_rate x seed; asr = base + seed offset
    base = {("none", 0.05): 0.5, ("none", 0.2): 0.75, ("ft", 0.05): 0.25, ("ft", 0.2): 0.5}
    off = {0: 0.0, 1: 0.125, 2: -0.0625}
    return [_row(pr, 0.2, s, base[(d, pr)] + off[s], defense=d)
            for d in ("none", "ft") for pr in (0.05, 0.2) for s in (0, 1, 2)]


def test_lines_mean_and_band_exact():
    fig = lines_figure(_defense_rows(), x="poison_rate", metric="asr", group="defense", spread="seed")
    by = {t.name: t for t in fig.data}
    ft = "Fine-tuning (FT)"
    assert set(by) == {"no defense (poisoned model)", "no defense (poisoned model): min",
                       "no defense (poisoned model): max", ft, f"{ft}: min", f"{ft}: max"}
    assert [t.name for t in fig.data][:3] == ["no defense (poisoned model): min", "no defense (poisoned model): max",
                                              "no defense (poisoned model)"]  # "none" first, band under the line
    assert tuple(by[ft].x) == (0.05, 0.2) and fig.layout.xaxis.type == "linear"
    assert list(by[ft].y) == pytest.approx([0.25 + 0.0625 / 3, 0.5 + 0.0625 / 3])
    assert tuple(by[f"{ft}: min"].y) == (0.1875, 0.4375) and tuple(by[f"{ft}: max"].y) == (0.375, 0.625)
    assert by[f"{ft}: max"].fill == "tonexty"
    assert by["no defense (poisoned model)"].line.color == "#d62728"  # the attack's red
    assert by[ft].line.color == "#1f77b4"
    assert tuple(fig.layout.yaxis.range) == (-0.02, 1.02) and fig.layout.yaxis.tickformat == ".0%"


def test_lines_band_over_seed_means_and_categorical_x():
    # a second free axis (clean_fraction) is averaged per seed first; the band spans the seed means
    rows = [_row(0.1, cf, s, v, defense="ft") for (cf, s), v in
            {(0.05, 0): 0.5, (0.2, 0): 0.25, (0.05, 1): 1.0, (0.2, 1): 0.5}.items()]
    pts = line_points(rows, x="poison_rate", group="defense", spread="seed")
    assert pts == [{"group": "ft", "x": 0.1, "mean": 0.5625, "lo": 0.375, "hi": 0.75, "n": 2}]
    # one value per point: no band; categorical x keeps the defense order
    fig = lines_figure(_defense_rows(), x="defense", group=None, spread="seed", where={"seed": 1, "poison_rate": 0.2})
    assert len(fig.data) == 1 and tuple(fig.data[0].x) == ("none", "ft") and fig.layout.xaxis.type == "category"
    assert tuple(fig.data[0].y) == (0.875, 0.625)
    with pytest.raises(ValueError, match="own x axis"):
        lines_figure(_defense_rows(), x="defense", group="defense")
    with pytest.raises(ValueError, match="not a column"):
        lines_figure(_defense_rows(), x="trigger.size")


def test_rows_csv_order_and_round_trip():
    rows = _rows()
    rows[0]["error"] = 'boom, "quoted"'
    text = rows_csv(rows, AXES)
    parsed = list(csv.DictReader(io.StringIO(text)))
    header = next(csv.reader(io.StringIO(text)))
    assert header[:3] == AXES
    assert header[3:11] == ["poisoned_clean_acc", "poisoned_asr", "clean_acc", "asr", "clean_acc_change",
                            "asr_change", "seconds", "attack_seconds"]
    assert header[11:15] == ["cell", "attack_run", "defense_run", "status"] and header[15] == "error"
    assert len(parsed) == 8
    assert parsed[0]["poison_rate"] == "0.05" and parsed[0]["seed"] == "0" and parsed[0]["asr"] == "0.5"
    assert parsed[0]["error"] == 'boom, "quoted"' and parsed[1]["error"] == ""
    assert parsed[3]["asr"] == "" and parsed[3]["asr_change"] == ""  # None -> empty
    assert parsed[7]["status"] == "failed"
    for r, p in zip(rows, parsed):
        for k in ("poison_rate", "clean_fraction", "clean_acc", "seconds"):
            assert float(p[k]) == r[k]


def test_html_report_escapes_and_inlines_plotly_once():
    evil = "<script>alert(1)</script>"
    rows = [dict(r, attack=evil if r["seed"] == 0 else "badnets") for r in _rows()]
    axes = ["attack"] + AXES
    figs = [heatmap_figure(rows, x="poison_rate", y="attack"), lines_figure(rows, x="poison_rate", group="attack")]
    page = html_report("sweep <b>demo</b>", {"name": "demo", "axes": {"attack": [evil, "badnets"]}}, rows, axes, figs)
    assert evil not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>demo</b>" not in page and "sweep &lt;b&gt;demo&lt;/b&gt;" in page
    assert page.count("plotly.js v") == 1 and page.count("Plotly.newPlot") == 2
    assert "<td>37.5%</td>" not in page  # cell values, not means
    assert "<td>50.0%</td>" in page and "<td>12.5%</td>" in page and "<td>failed</td>" in page
    assert "<td>-12.5 pts</td>" in page and "<td>–</td>" in page  # a change; a None
    assert "<th>clean-data budget (fraction of training set)</th>" in page


def test_default_views():
    axes = ["defense", "clean_fraction", "poison_rate", "seed"]
    rows = [_row(pr, cf, s, 0.5, defense=d) for d in ("none", "ft", "sft") for cf in (0.05, 0.2)
            for pr in (0.05, 0.2) for s in (0, 1)]
    v = default_views(axes, rows)
    assert v == {"metric": "asr", "x": "poison_rate", "y": "clean_fraction", "where": {"defense": "ft"},
                 "line_x": "poison_rate", "group": "defense", "spread": "seed", "line_where": {"clean_fraction": 0.05}}
    # no poison_rate/clean_fraction variation: the first varying axes other than the seed
    axes2 = ["trigger.size", "defense", "poison_rate", "seed"]
    rows2 = [dict(_row(0.1, 0.2, s, 0.5, defense=d), **{"trigger.size": t}) for t in (3, 5) for d in ("ft", "sft")
             for s in (0, 1)]
    v2 = default_views(axes2, rows2)
    assert (v2["x"], v2["y"], v2["line_x"], v2["group"], v2["spread"]) == ("trigger.size", "defense", "trigger.size",
                                                                           "defense", "seed")
    # only the defense varies: lines across defenses, no grouping
    v3 = default_views(["defense"], [_row(0.1, 0.2, 0, 0.5, defense=d) for d in ("ft", "sft")])
    assert (v3["x"], v3["y"], v3["line_x"], v3["group"], v3["spread"]) == ("defense", None, "defense", None, None)


def test_unfit_trainings_names_models_that_never_learned_or_took_no_backdoor():
    from bdft_core.sweeps import figures as sf

    rows = [{"status": "finished", "attack_run": "a", "poisoned_clean_acc": 0.106, "poisoned_asr": 0.4},
            {"status": "finished", "attack_run": "a", "poisoned_clean_acc": 0.106, "poisoned_asr": 0.4},  # same training
            {"status": "finished", "attack_run": "b", "poisoned_clean_acc": 0.9, "poisoned_asr": 0.98},
            {"status": "finished", "attack_run": "c", "poisoned_clean_acc": 0.9, "poisoned_asr": 0.2, "poison_rate": 0.1},
            {"status": "finished", "attack_run": "d", "poisoned_clean_acc": 0.9, "poisoned_asr": 0.02, "poison_rate": 0.0},
            {"status": "missing", "attack_run": None, "poisoned_clean_acc": None, "poisoned_asr": None}]
    asked = []
    out = sf.unfit_trainings(rows, lambda rid: asked.append(rid) or 10)
    assert set(out) == {"a", "c"} and "did not learn" in out["a"] and "did not take" in out["c"]
    assert asked.count("a") == 1  # one look per training, not per cell
