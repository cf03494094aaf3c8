"""The README's measured figures for the comparison, the attributions and the sequela, on the
standalone CIFAR-10 BadNets default run (a fresh runs folder, so nothing else is mixed in):

1. train the default poisoned run (``python -m bdft_core attack --dataset cifar10``'s defaults);
2. ``compare``: every registered defense with its defaults on it (CA, ASR, seconds);
3. Grad-CAM on the poisoned model and its FT and SFT children -> assets/readme/explain_*.png;
4. sequela of the three models (all axes) -> the table.

Prints one JSON object (also written to bench/readme_figures.json). Takes roughly 20-30 minutes on a
2-core CPU. Usage: BDFT_DATA_DIR=../shared/data python bench/readme_figures.py [--skip-compare]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bdft_core.compare import compare_defenses, verdict  # noqa: E402
from bdft_core.device import describe_device, pick_device  # noqa: E402
from bdft_core.explain_runs import explain_run, summary, write_images  # noqa: E402
from bdft_core.pipeline import AttackConfig, run_attack, run_defense  # noqa: E402
from bdft_core.runs import RunStore  # noqa: E402
from bdft_core.sequela_runs import sequela_run, table_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs-dir", default=None, help="default: a new temporary folder")
    ap.add_argument("--skip-compare", action="store_true", help="only FT and SFT (for the pictures and sequela)")
    ap.add_argument("--defenses", default=None, help="comma-separated subset for the comparison")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "readme_figures.json"))
    a = ap.parse_args()
    store = RunStore(a.runs_dir or tempfile.mkdtemp(prefix="bdft-readme-"))
    t0 = time.perf_counter()
    run, _ = run_attack(AttackConfig(dataset="cifar10"), store=store)
    out = {"device": describe_device(pick_device("auto")), "run_id": run.id,
           "poisoned": {"clean_acc": run.final["clean_acc"], "asr": run.final["asr"], "seconds": run.timings["total_s"]}}
    print(f"poisoned: {out['poisoned']}", file=sys.stderr, flush=True)
    if a.skip_compare:
        for name in ("ft", "sft"):
            run_defense(run.id, name, store=store)
    else:
        names = a.defenses.split(",") if a.defenses else None
        cmp = compare_defenses(run.id, names, store=store, on_stage=lambda n: print(f"== {n}", file=sys.stderr, flush=True))
        out["compare"] = {"rows": cmp["rows"], "skipped": cmp["skipped"], "failed": cmp["failed"], "verdict": verdict(cmp)}
    res = explain_run(store, run.id, defended=["ft", "sft"], n=8, method="gradcam")
    img_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "readme")
    out["explain"] = {"rows": summary(res), "images": write_images(res, img_dir, scale=3, prefix="cifar10_badnets")}
    res_many = explain_run(store, run.id, defended=["ft", "sft"], n=256, method="gradcam")
    out["explain_256"] = summary(res_many)
    t1 = time.perf_counter()
    seq = sequela_run(store, run.id)
    out["sequela"] = {"rows": table_rows(seq), "seconds": time.perf_counter() - t1, "models": seq["models"]}
    out["seconds"] = time.perf_counter() - t0
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
