"""The README's sweep table: run (or resume) a grid and print, per defense, a markdown table of the
mean ASR after the defense by poison rate (columns) and clean-data budget (rows), with the poisoned
models' ASR and CA and the wall time. Usage:

    BDFT_DATA_DIR=../shared/data python bench/sweep_table.py [bench/grids/cifar10_poison_budget.toml]

Runs in a fresh temporary runs folder unless --runs-dir is given (then an interrupted run resumes)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bdft_core.runs import RunStore  # noqa: E402
from bdft_core.sweeps import SweepSpec, run_sweep, sweep_rows  # noqa: E402
from bdft_core.sweeps.figures import aggregate, axis_values  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("grid", nargs="?", default=os.path.join(os.path.dirname(__file__), "grids",
                                                            "cifar10_poison_budget.toml"))
    ap.add_argument("--runs-dir", default=None)
    ap.add_argument("--executor", default="auto")
    a = ap.parse_args()
    spec = SweepSpec.load(a.grid)
    store = RunStore(a.runs_dir or tempfile.mkdtemp(prefix="bdft-sweep-"))
    t0 = time.perf_counter()
    res = run_sweep(spec, store, executor=a.executor, log=lambda m: print(m, file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    rows = sweep_rows(store, spec)
    x, y = "poison_rate", "clean_fraction"
    xs, ys = axis_values(rows, x), axis_values(rows, y)
    out = [f"{res.where}, {res.resources}: {len(res.ran)} cells in {wall:.0f} s ({len(res.reused)} reused)"]
    pois = {g[x]: g for g in aggregate(rows, [x], "poisoned_asr")}
    pca = {g[x]: g for g in aggregate(rows, [x], "poisoned_clean_acc")}
    out.append("\n| poisoned model | " + " | ".join(f"{v:g}" for v in xs) + " |")
    out.append("|---|" + "---|" * len(xs))
    out.append("| ASR | " + " | ".join(f"{100 * pois[v]['mean']:.1f}%" for v in xs) + " |")
    out.append("| CA | " + " | ".join(f"{100 * pca[v]['mean']:.1f}%" for v in xs) + " |")
    for d in axis_values(rows, "defense"):
        sub = [r for r in rows if r["defense"] == d]
        asr = {(g[y], g[x]): g for g in aggregate(sub, [y, x], "asr")}
        dca = {(g[y], g[x]): g for g in aggregate(sub, [y, x], "clean_acc_change")}
        out.append(f"\n| {d}: ASR (CA change) | " + " | ".join(f"poison {v:g}" for v in xs) + " |")
        out.append("|---|" + "---|" * len(xs))
        for cf in ys:
            cells = [f"{100 * asr[(cf, v)]['mean']:.1f}% ({100 * dca[(cf, v)]['mean']:+.1f})" for v in xs]
            out.append(f"| clean {100 * cf:g}% | " + " | ".join(cells) + " |")
    print("\n".join(out))
    print(json.dumps({"rows": rows, "seconds": wall, "where": res.where}, default=str))


if __name__ == "__main__":
    main()
