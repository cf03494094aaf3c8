"""How far SFT's result sits from the demo's lines (ASR <= 5%, CA at most 3 points lost), over defense
seeds and with SFT's settings changed one at a time (the README's "what would widen the 5% margin").

Trains the demo's poisoned model for each attack seed (the demo's defaults otherwise), then applies SFT
on the demo's clean data (20% of the training set) once per defense seed and setting, printing one JSON
line per run. A measurement, not a test: minutes per run on a 2-core CPU.

    BDFT_DATA_DIR=../shared/data python bench/sft_margin.py \\
        --variants '{"defaults": {}, "5 epochs": {"epochs": 5.0}}' --seeds 0,1,2,3 --models 0,1
"""
import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bdft_core.defenses import build_defense  # noqa: E402
from bdft_core.device import tune_allocator  # noqa: E402
from bdft_core.errors import ConfigError  # noqa: E402
from bdft_core.pipeline import (DEFAULT_CLEAN_FRACTION, AttackConfig, attack_config_of, run_attack,  # noqa: E402
                                setting_for)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--attack", default="badnets")
    ap.add_argument("--variants", default='{"defaults": {}}',
                    help='JSON object: a name for each SFT setting -> its parameters, e.g. {"wd": {"weight_decay": 1e-3}}')
    ap.add_argument("--seeds", default="0,1,2,3", help="defense seeds, comma-separated")
    ap.add_argument("--models", default="0", help="attack seeds (one poisoned model each), comma-separated")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    tune_allocator()
    try:
        seeds, models = ([int(v) for v in arg.split(",")] for arg in (a.seeds, a.models))
    except ValueError as exc:
        sys.exit(f"--seeds and --models take whole numbers separated by commas: {exc}")
    try:
        variants = json.loads(a.variants)
        for name, params in variants.items():
            build_defense("sft", **params)  # a bad setting fails before any training
    except (ValueError, TypeError, AttributeError, ConfigError) as exc:
        sys.exit(f"bad --variants: {exc}")
    for mseed in models:
        run, model = run_attack(AttackConfig(dataset=a.dataset, attack=a.attack, seed=mseed))
        p = run.final
        print(json.dumps({"model": mseed, "poisoned": {"clean_acc": round(p["clean_acc"], 4), "asr": round(p["asr"], 4)}}),
              flush=True)
        cfg = attack_config_of(run)
        s = setting_for(run, cfg)
        idx = s.defender_indices(DEFAULT_CLEAN_FRACTION).to(s.device)
        x_clean, y_clean = s.data.x_train[idx], s.data.y_train[idx]
        for name, params in variants.items():
            for k in seeds:
                t = time.perf_counter()
                res = build_defense("sft", **params).apply(copy.deepcopy(model), x_clean, y_clean,
                                                           evaluator=s.evaluator, seed=k)
                f = res.final
                print(json.dumps({"model": mseed, "variant": name, "seed": k, "clean_acc": round(f["clean_acc"], 4),
                                  "asr": round(f["asr"], 4), "ca_lost": round(p["clean_acc"] - f["clean_acc"], 4),
                                  "over_5pct": f["asr"] > 0.05, "seconds": round(time.perf_counter() - t, 1)}),
                      flush=True)


if __name__ == "__main__":
    main()
