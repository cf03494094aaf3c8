"""Command line: ``python -m bdft_core {attack,defend,compare,explain,sequela,demo,sweep,runs} ...``.

With ``--json`` a command prints exactly one JSON object as the last line of stdout (progress goes
to stderr). Bad input exits with status 2 and a one-line reason on stderr, never a traceback."""
from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import sys
import threading
from typing import Any

from .attacks import ATTACKS
from .data import DATASETS
from .defenses import DEFENSES
from .errors import BdftError
from .models import MODELS
from .runs import finite_json


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _value(text: str) -> Any:
    """Parse a --param value: JSON if it parses (numbers, booleans, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _params(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise BdftError(f"--param takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _value(v)
    return out


def _progress_printer(quiet: bool):
    def show(p):
        if quiet:
            return
        bits = [f"step {p.step}/{p.total_steps}", f"epoch {p.epoch:.2f}", f"loss {p.loss:.3f}", f"lr {p.lr:.4g}"]
        if p.clean_acc is not None:
            bits.append(f"CA {p.clean_acc:.3f}")
        if p.asr is not None:
            bits.append(f"ASR {p.asr:.3f}")
        if p.step and not math.isnan(p.eta_s):
            bits.append(f"ETA {p.eta_s:.0f}s")
        print("  " + "  ".join(bits), file=sys.stderr, flush=True)
    return [("on_epoch_end", show), ("on_step", show)]


def _add_attack_args(p):
    p.add_argument("--dataset", default="cifar10", help=f"{', '.join(DATASETS)}, an .npz path or an image folder")
    p.add_argument("--attack", default="badnets", help=", ".join(ATTACKS))
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="attack setting, repeatable (e.g. size=4, pattern=checkerboard, alpha=0.1)")
    p.add_argument("--poison-rate", type=float, default=0.1, help="share of training images poisoned, 0..1")
    p.add_argument("--target", type=int, default=0, help="target label (all-to-one)")
    p.add_argument("--mode", default="all_to_one", choices=["all_to_one", "all_to_all"])
    p.add_argument("--model", default="fastnet", help=", ".join(MODELS))
    p.add_argument("--epochs", type=float, default=None, help="passes over the training data (default: per dataset)")
    p.add_argument("--lr", type=float, default=0.15, help="peak learning rate")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=None, help="train on a seeded slice of this many images")
    p.add_argument("--n-test", type=int, default=None, help="evaluate on a seeded slice of this many images")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--paradigm", default="standalone", help="standalone, transfer or encoder (see README)")
    p.add_argument("--downstream", default=None, help="transfer and encoder: the victim's dataset (transfer default: the same, split; encoder: gtsrb)")
    p.add_argument("--pparam", action="append", metavar="KEY=VALUE",
                   help="paradigm setting, repeatable (e.g. victim=full, n_refs=20)")


def _attack_config(a):
    from .pipeline import AttackConfig

    return AttackConfig(dataset=a.dataset, attack=a.attack, params=_params(a.param), poison_rate=a.poison_rate,
                        target=a.target, mode=a.mode, model=a.model, epochs=a.epochs, lr=a.lr,
                        batch_size=a.batch_size, seed=a.seed, n_train=a.n_train, n_test=a.n_test, device=a.device,
                        paradigm=a.paradigm, downstream=a.downstream, paradigm_params=_params(a.pparam))


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m bdft_core", description="Backdoor attacks and fine-tuning defenses.")
    ap.add_argument("--runs-dir", default=None, help="where runs are stored (default: $BDFT_RUNS_DIR or ~/.bdft/runs)")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    p = sub.add_parser("attack", help="train a poisoned model and store it as a run")
    _add_attack_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    p = sub.add_parser("defend", help="apply a defense to a stored poisoned run")
    p.add_argument("--run", required=True, help="id of the poisoned run")
    p.add_argument("--defense", default="sft", help=", ".join(DEFENSES))
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="defense setting, repeatable (e.g. lr=0.02)")
    p.add_argument("--clean-fraction", type=float, default=None, help="defender's clean data, 0.005..1 (default 0.2)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: as the run)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("compare", help="run every defense (or --defenses) on one poisoned run and tabulate CA, ASR, seconds")
    p.add_argument("--run", required=True, help="id of the poisoned run")
    p.add_argument("--defenses", default=None, help="comma-separated defense names (default: all registered)")
    p.add_argument("--clean-fraction", type=float, default=None, help="defender's clean data, 0.005..1 (default 0.2)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    p = sub.add_parser("explain", help="attribution maps (Grad-CAM etc.) of a poisoned run and its defended children, as PNGs")
    p.add_argument("--run", required=True, help="id of the poisoned run")
    p.add_argument("--defenses", default=None, help="comma-separated defended children to include (default: all)")
    p.add_argument("--method", default="gradcam", help="gradcam, saliency or integrated_gradients")
    p.add_argument("--layer", default=None, help="Grad-CAM layer name (default: the deepest with at least 8x8 maps)")
    p.add_argument("--n", type=int, default=8, help="test images (true class not the target)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="explain", help="folder for the PNG files")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("sequela", help="backdoor sequela: every axis for a poisoned run and each defended child")
    p.add_argument("--run", required=True, help="id of the poisoned run (its defended children come along)")
    from .sequela import AXES

    p.add_argument("--axes", default=None, help=f"comma-separated axes, from {', '.join(AXES)} (default: all)")
    p.add_argument("--n", type=int, default=1000, help="members and non-members each")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="the whole story: poison, train, defend with FT and SFT, measure")
    _add_attack_args(p)
    p.add_argument("--defenses", default="ft,sft", help="comma-separated defense names")
    p.add_argument("--clean-fraction", type=float, default=None, help="defender's clean data, 0.005..1 (default 0.2)")
    p.add_argument("--no-store", action="store_true", help="do not store the runs (the run ids printed then name nothing stored)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("pretrain-encoder", help="SimCLR-pretrain a clean encoder on unlabeled images; linear-probe it")
    p.add_argument("--dataset", default="cifar10", help="unlabeled pretraining images: its train split")
    p.add_argument("--probe-datasets", default="cifar10,gtsrb", help="comma-separated linear-probe datasets")
    p.add_argument("--epochs", type=float, default=10.0, help="SimCLR passes over the training images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.5, help="peak SGD learning rate (warmup, then cosine)")
    p.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature")
    p.add_argument("--widths", default="32,64,128", help="fastnet block widths (the embedding is the last)")
    p.add_argument("--n-train", type=int, default=None, help="pretrain on a seeded slice of this many images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default="assets/encoder_cifar10.safetensors", help="weights (.safetensors); a .json record goes beside")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("sweep", help="run (or resume) a grid of experiments from a grid file, every cell a stored run")
    p.add_argument("--grid", default=None, help="grid file (.json or .toml; see README 'What-if sweeps')")
    p.add_argument("--show", default=None, metavar="NAME", help="print a stored sweep's results without running")
    p.add_argument("--list", action="store_true", help="list stored sweeps")
    p.add_argument("--estimate", action="store_true", help="only count the cells and estimate the time")
    p.add_argument("--executor", default="auto", choices=["auto", "ray", "process"],
                   help="auto: Ray when installed, else a local process pool")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    p.add_argument("--csv", default=None, help="also write the results table as CSV here")
    p.add_argument("--html", default=None, help="also write an HTML report (heat map, line plot, table) here")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("runs", help="list, show or delete stored runs")
    p.add_argument("action", choices=["list", "show", "delete"])
    p.add_argument("run_id", nargs="?")
    p.add_argument("--json", action="store_true")
    return ap


def _fmt(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except BdftError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted")
    except (ValueError, TypeError, OSError, sqlite3.Error) as exc:  # bad input bdft did not name itself
        if os.environ.get("BDFT_DEBUG"):
            raise
        return _fail(f"{exc} ({type(exc).__name__}; BDFT_DEBUG=1 shows where)")


def _emit(obj: dict, as_json: bool, human: str) -> None:
    if as_json:
        print(json.dumps(finite_json(obj), default=str))
    else:
        print(human)


def _dispatch(a) -> int:
    from .pipeline import DEFAULT_CLEAN_FRACTION, run_attack, run_defense, run_demo
    from .runs import RunStore

    if a.cmd == "runs":
        return _runs(a, RunStore(a.runs_dir))
    if a.cmd == "pretrain-encoder":
        return _pretrain_encoder(a)
    if a.cmd == "sweep":
        return _sweep(a, RunStore(a.runs_dir))
    cbs = _progress_printer(quiet=False)
    stop = threading.Event()
    if a.cmd == "attack":
        store = RunStore(a.runs_dir)
        run, _ = run_attack(_attack_config(a).validate(), store=store, callbacks=cbs, stop=stop)
        obj = {"run_id": run.id, "dataset": run.dataset, "attack": run.attack["name"], "device": run.device,
               "clean_acc": run.final["clean_acc"], "asr": run.final["asr"], "seconds": run.timings["total_s"],
               "status": run.status}
        _emit(obj, a.json, f"run {run.id}: CA {_fmt(run.final['clean_acc'])}, ASR {_fmt(run.final['asr'])} "
                           f"({run.timings['total_s']:.1f}s on {run.device})")
        return 0
    if a.cmd == "defend":
        store = RunStore(a.runs_dir)
        cf = DEFAULT_CLEAN_FRACTION if a.clean_fraction is None else a.clean_fraction
        parent = store.get(a.run)
        run, _ = run_defense(a.run, a.defense, _params(a.param), clean_fraction=cf, store=store, callbacks=cbs,
                             stop=stop, device=a.device)
        obj = {"run_id": run.id, "parent": run.parent, "defense": run.defense["name"], "device": run.device,
               "clean_fraction": cf, "clean_acc": run.final["clean_acc"], "asr": run.final["asr"],
               "seconds": run.timings["total_s"],
               "before": {"clean_acc": parent.final.get("clean_acc"), "asr": parent.final.get("asr")}}
        _emit(obj, a.json, f"run {run.id} ({run.defense['name']} on {run.parent}): CA {_fmt(parent.final.get('clean_acc'))}"
                           f" -> {_fmt(run.final['clean_acc'])}, ASR {_fmt(parent.final.get('asr'))} -> "
                           f"{_fmt(run.final['asr'])} ({run.timings['total_s']:.1f}s)")
        return 0
    if a.cmd == "compare":
        from .compare import compare_defenses, verdict

        names = [d.strip() for d in a.defenses.split(",") if d.strip()] if a.defenses else None
        out = compare_defenses(a.run, names, clean_fraction=a.clean_fraction, store=RunStore(a.runs_dir),
                               callbacks=cbs, stop=stop, on_stage=lambda n: print(f"== {n}", file=sys.stderr))
        out["verdict"] = verdict(out)
        p = out["poisoned"]
        lines = [f"{out['dataset']} / {out['attack']} run {out['run_id']}: poisoned CA {_fmt(p['clean_acc'])}, "
                 f"ASR {_fmt(p['asr'])}; defender's clean data {100 * out['clean_fraction']:g}%",
                 f"{'defense':22s} {'CA':>7s} {'ASR':>7s} {'dCA':>7s} {'dASR':>7s} {'seconds':>8s}"]
        for r in out["rows"]:
            lines.append(f"{r['defense']:22s} {_fmt(r['clean_acc']):>7s} {_fmt(r['asr']):>7s} "
                         f"{100 * (r['d_clean_acc'] or 0):+6.1f}p {100 * (r['d_asr'] or 0):+6.1f}p {r['seconds']:8.1f}")
        lines += [f"{s['defense']:22s} skipped: {s['reason']}" for s in out["skipped"]]
        lines += [f"{f['defense']:22s} FAILED: {f['error']}" for f in out["failed"]]
        lines.append(out["verdict"])
        _emit(out, a.json, "\n".join(lines))
        return 0 if not out["failed"] else 1
    if a.cmd == "explain":
        from .explain_runs import explain_run, summary, write_images

        names = [d.strip() for d in a.defenses.split(",") if d.strip()] if a.defenses else None
        res = explain_run(RunStore(a.runs_dir), a.run, names, n=a.n, method=a.method, layer=a.layer, seed=a.seed)
        paths = write_images(res, a.out)
        rows = summary(res)
        obj = {"run_id": res["run_id"], "method": res["method"], "n": res["n"], "rows": rows, "images": paths,
               "seconds": res["seconds"]}
        lines = [f"{res['method_title']} on {res['n']} test images of run {res['run_id']} (row 1 clean, row 2 triggered):"]
        for r in rows:
            share = "" if r.get("share_triggered") is None else (
                f"trigger-region share {_fmt(r['share_clean'])} clean -> {_fmt(r['share_triggered'])} triggered, ")
            lines.append(f"  {r['model']:22s} {share}map shift {r['map_shift']:.2f}, prediction flipped by the "
                         f"trigger {_fmt(r['flip_rate'])}")
        lines += [f"  wrote {p}" for p in paths]
        _emit(obj, a.json, "\n".join(lines))
        return 0
    if a.cmd == "sequela":
        from .sequela_runs import check_axes, sequela_run, table_rows

        axes = check_axes(a.axes.split(",")) if a.axes else None

        def prog(f, msg=""):
            print(f"\r{100 * f:5.1f}% {msg[:70]:70s}", end="", file=sys.stderr, flush=True)

        res = sequela_run(RunStore(a.runs_dir), a.run, axes=axes, n=a.n, stop=stop, progress=prog)
        print(file=sys.stderr)
        rows = table_rows(res)
        human = [f"backdoor sequela of run {res['run_id']} (higher = more vulnerable; change from the poisoned model):"]
        for r in rows:
            human.append(f"  {r['axis']:34s} " + "  ".join(f"{m}: {r[res['labels'][m]]}" for m in res["models"]))
        human.append(f"{res['total_seconds']:.0f} s; kept with the run for the dashboard's Sequela page")
        _emit(res, a.json, "\n".join(human))
        return 0
    if a.cmd == "demo":
        cfg = _attack_config(a).validate()
        defenses = [d.strip() for d in a.defenses.split(",") if d.strip()]
        cf = DEFAULT_CLEAN_FRACTION if a.clean_fraction is None else a.clean_fraction
        store = None if a.no_store else RunStore(a.runs_dir)
        out = run_demo(cfg, defenses=defenses, clean_fraction=cf, store=store, callbacks=cbs, stop=stop)
        out["stored"] = store is not None  # with --no-store the run ids name runs that were never kept
        lines = []
        if out.get("paradigm") == "transfer":
            lines.append(f"attacker's model on {out['dataset']}: CA {_fmt(out['attacker']['clean_acc'])}, "
                         f"ASR {_fmt(out['attacker']['asr'])}")
            for how in ("head", "full"):
                if f"victim_{how}" in out:
                    v = out[f"victim_{how}"]
                    lines.append(f"  victim on {out['downstream']} ({how}): CA {_fmt(v['clean_acc'])}, "
                                 f"ASR {_fmt(v['asr'])}")
        if "poisoned" in out:
            lines.append(f"{out['dataset']} / {out['attack']} on {out['device']}: poisoned model CA "
                         f"{_fmt(out['poisoned']['clean_acc'])}, ASR {_fmt(out['poisoned']['asr'])}")
        for name, r in out["defended"].items():
            lines.append(f"  after {name}: CA {_fmt(r['clean_acc'])}, ASR {_fmt(r['asr'])} ({r['seconds']:.1f}s)")
        lines.append(f"total {out['seconds']:.1f}s" + ("" if store is not None else " (runs not stored: --no-store)"))
        _emit(out, a.json, "\n".join(lines))
        return 0
    return _fail(f"unknown command {a.cmd}")  # pragma: no cover - argparse rejects it first


def _runs(a, store) -> int:
    if a.action == "list":
        rows = store.list()
        human = "\n".join(f"{r['id']}  {r['kind']:7s} {r['dataset'] or '':14s} {r['name'] or '':8s} "
                           f"CA {_fmt(r['clean_acc'])}  ASR {_fmt(r['asr'])}  {r['status']}"
                           + (f"  <- {r['parent']}" if r["parent"] else "") for r in rows) or "no runs stored yet"
        _emit({"runs": rows}, a.json, human)
        return 0
    if not a.run_id:
        return _fail(f"runs {a.action} needs a run id")
    if a.action == "show":
        run = store.get(a.run_id)
        obj = run.to_json()
        obj["children"] = [c["id"] for c in store.children(a.run_id)]
        _emit(obj, a.json, json.dumps(finite_json(obj), indent=1, default=str))
        return 0
    removed = store.delete(a.run_id)
    _emit({"deleted": removed}, a.json, "deleted " + ", ".join(removed))
    return 0


def _sweep(a, store) -> int:
    """Run or resume a sweep; print its cells' results. Exit 1 when some cells failed (the others are
    kept; running the same grid again retries only the missing ones)."""
    from .sweeps import SweepSpec, estimate, list_sweeps, load_spec, run_sweep, sweep_rows

    if a.list:
        rows = list_sweeps(store)
        _emit({"sweeps": rows}, a.json, "\n".join(f"{r['name']:30s} {r['done']}/{r['cells']} cells  axes: "
                                                  f"{', '.join(r['axes'])}" for r in rows) or "no sweeps stored yet")
        return 0
    if bool(a.grid) == bool(a.show):
        raise BdftError("give a grid file (--grid FILE) to run, or --show NAME for a stored sweep's results")
    spec = SweepSpec.load(a.grid) if a.grid else load_spec(store, a.show)
    est = estimate(spec, store, address=a.address)
    if a.estimate:
        _emit(est, a.json, f"{est['cells']} cells ({est['done']} done): {est['trainings_to_run']} poisoned trainings "
                           f"and {est['defenses_to_run']} defenses to run, {est['parallel']} at a time: about "
                           f"{est['seconds'] / 60:.1f} min ({est['basis']})")
        return 0
    res = None
    if a.grid:
        print(f"sweep {spec.name}: {est['cells']} cells, {est['done']} already done; about {est['seconds'] / 60:.1f} min "
              f"({est['basis']})", file=sys.stderr, flush=True)
        stop = threading.Event()
        try:
            res = run_sweep(spec, store, executor=a.executor, address=a.address, stop=stop,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
        except KeyboardInterrupt:
            stop.set()
            raise
    rows = sweep_rows(store, spec)
    axes = list(spec.axes)
    if a.csv or a.html:
        from pathlib import Path

        from .sweeps.figures import default_views, heatmap_figure, html_report, lines_figure, rows_csv

        if a.csv:
            Path(a.csv).write_text(rows_csv(rows, axes))
        if a.html:
            v = default_views(axes, rows)
            figs = []
            if any(r["status"] == "finished" for r in rows):
                if v.get("x") and v.get("y"):
                    figs.append(heatmap_figure(rows, v["x"], v["y"], v["metric"], where=v.get("where"), axes=axes))
                if v.get("line_x"):
                    figs.append(lines_figure(rows, v["line_x"], v["metric"], group=v.get("group"), spread=v.get("spread"),
                                             where=v.get("line_where"), axes=axes))
            Path(a.html).write_text(html_report(f"bdft sweep {spec.name}", spec.to_dict(), rows, axes, figs))
    obj = {"name": spec.name, "cells": len(rows), "done": sum(r["status"] == "finished" for r in rows),
           "axes": axes, "rows": rows, "estimate": est}
    if res is not None:
        obj.update({k: v for k, v in res.to_json().items() if k not in ("name", "cells")})
    lines = [f"sweep {spec.name}: {obj['done']}/{obj['cells']} cells done"
             + (f"; ran {len(res.ran)}, reused {len(res.reused)}, failed {len(res.failed)} on {res.where or 'nothing'} "
                f"in {res.seconds:.0f} s" if res else "")]
    for r in rows:
        vals = ", ".join(f"{k}={r[k]}" for k in axes)
        lines.append(f"  {vals}: " + (f"poisoned ASR {_fmt(r['poisoned_asr'])} -> ASR {_fmt(r['asr'])}, CA "
                                      f"{_fmt(r['clean_acc'])}" if r["status"] == "finished" else r["status"]))
    lines += [f"  FAILED {f['values']}: {f['error']}" for f in (res.failed if res else [])]
    _emit(obj, a.json, "\n".join(lines))
    return 1 if res is not None and res.failed else 0


def _pretrain_encoder(a) -> int:
    """SimCLR-pretrain an encoder and linear-probe it (:func:`bdft_core.ssl.pretrain_encoder`)."""
    from .ssl import pretrain_encoder

    try:
        widths = [int(w) for w in a.widths.split(",") if w.strip()]
    except ValueError:
        raise BdftError(f"--widths takes comma-separated integers, got {a.widths!r}") from None

    def show(p):
        print(f"  epoch {p.epoch:.2f}  step {p.step}/{p.total_steps}  loss {p.loss:.3f}  lr {p.lr:.3g}  "
              f"{p.images_per_s:.0f} img/s  ETA {p.eta_s:.0f}s", file=sys.stderr, flush=True)

    command = (f"python -m bdft_core pretrain-encoder --dataset {a.dataset} --probe-datasets {a.probe_datasets} "
               f"--epochs {a.epochs:g} --batch-size {a.batch_size} --lr {a.lr:g} --temperature {a.temperature:g} "
               f"--widths {','.join(map(str, widths))} --seed {a.seed} --device {a.device} --out {a.out}"
               + (f" --n-train {a.n_train}" if a.n_train else ""))
    record = pretrain_encoder(a.dataset, a.out, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                              temperature=a.temperature, widths=widths, n_train=a.n_train, seed=a.seed,
                              device=a.device, probe_datasets=[n.strip() for n in a.probe_datasets.split(",")
                                                               if n.strip()],
                              callbacks=[("on_epoch_end", show)], command=command, log=lambda m: print(
                                  m, file=sys.stderr, flush=True))
    _emit(record, a.json, f"encoder written to {a.out} ({record['bytes'] / 1e6:.1f} MB, {record['wall_s']:.0f}s); "
                          + ", ".join(f"probe {k} {_fmt(v['acc'])}" for k, v in record["linear_probe"].items()))
    return 0
