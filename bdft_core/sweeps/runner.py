"""Running a sweep: every cell a task, through Ray (or a local process pool without it), every
result an ordinary stored run, and a sweep that can be stopped, killed and resumed.

Execution. Each distinct poisoned training is one task; each (training, defense) cell is another
that takes the training's result as its input, so a grid of 2 poison rates x 2 clean budgets x 2
defenses trains 2 poisoned models and applies 8 defenses. With Ray the defense tasks are submitted
at once with the training's object reference as an argument, and Ray runs each when its input is
ready, on whichever node has the resources it asks for (``threads_per_cell`` CPUs, or one GPU);
without Ray a local process pool runs the same task functions. Results reach the caller as each
task finishes (``on_cell``).

Storage. A task works in a private temporary run store and returns its runs' files (record,
safetensors weights); the caller imports them into its own :class:`~bdft_core.runs.RunStore`. So
cells computed on another machine of a cluster land in the local store like any other run, and only
one process writes the local index. The sweep keeps, under ``<runs dir>/sweeps/<name>/``::

    sweep.json             the grid and a log of executions
    attacks/<key>.json     a finished poisoned training: its run id and figures
    cells/<key>.json       a finished cell: its runs and figures

written atomically, each record before the runs it names are imported. Resuming (running the same
grid name again) keeps every record whose runs are in the store and runs only the rest; a record
whose runs never made it (a kill between the two writes) is dropped and its cell rerun, so no cell
is ever stored twice. Cells are keyed by content, so a grid extended with new values reuses the
cells it already has.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import BdftError, ConfigError
from .grid import NONE, Cell, SweepSpec

EXECUTORS = ("auto", "ray", "process")
# Seconds one poisoned training takes on one CPU thread of a small machine, for estimates before any
# run of the dataset is stored (measured on the 2-core CI machine with the default epochs).
FIRST_GUESS_S = {"digits": 4.0, "cifar10": 110.0, "gtsrb": 120.0, "svhn": 150.0, "mnist": 60.0, "fashion_mnist": 90.0}
# the training-set sizes those guesses are for, so that a cell on an n_train slice is guessed in proportion
TRAIN_SIZE = {"digits": 1437, "cifar10": 50000, "gtsrb": 39209, "svhn": 73257, "mnist": 60000, "fashion_mnist": 60000}
DEFENSE_SHARE = 0.5  # a fine-tuning defense costs about half a poisoned training (before any is stored)


# --------------------------------------------------------------------------------------------
# Task functions (run in Ray workers or pool processes; module level so they pickle by name)
# --------------------------------------------------------------------------------------------

def _task_env(threads: int) -> None:
    os.environ["BDFT_THREADS"] = str(int(threads))
    from ..device import setup_threads

    setup_threads(int(threads))


def attack_task(cfg: dict, threads: int = 1) -> dict:
    """Train one poisoned model (every paradigm: a transfer training also stores its victims) in a
    private run store; return the runs' files and the figures of the run defenses start from."""
    from ..pipeline import AttackConfig, run_attack
    from ..runs import RunStore

    _task_env(threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bdft-cell-") as d:
        store = RunStore(d)
        run, _ = run_attack(AttackConfig.from_dict(dict(cfg)), store=store)
        # oldest first (a transfer's attacker before its victims): imported in this order, a kill between
        # two imports never leaves a victim without its parent
        runs = {r["id"]: store.export_run(r["id"]) for r in reversed(store.list())}
    return {"run_id": run.id, "runs": runs, "clean_acc": run.final.get("clean_acc"), "asr": run.final.get("asr"),
            "seconds": time.perf_counter() - t0, "status": run.status, "device": run.device,
            "host": socket.gethostname()}


def defense_task(parent: dict, defense: str, params: dict, clean_fraction: float, threads: int = 1) -> dict:
    """Apply one defense to a poisoned model (``parent``: what :func:`attack_task` returned) in a
    private run store; return the defended run's files and figures."""
    from ..pipeline import run_defense
    from ..runs import RunStore

    _task_env(threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bdft-cell-") as d:
        store = RunStore(d)
        for files in parent["runs"].values():
            store.import_run(files)
        run, _ = run_defense(parent["run_id"], defense, params=params, clean_fraction=clean_fraction, store=store)
        files = store.export_run(run.id)
    return {"run_id": run.id, "runs": {run.id: files}, "clean_acc": run.final.get("clean_acc"),
            "asr": run.final.get("asr"), "seconds": time.perf_counter() - t0, "status": run.status,
            "device": run.device, "host": socket.gethostname()}


# --------------------------------------------------------------------------------------------
# The sweep's own records
# --------------------------------------------------------------------------------------------

def sweeps_dir(store) -> Path:
    return Path(store.root) / "sweeps"


def _write_json(path: Path, obj: dict) -> None:
    from ..runs import _atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(path, json.dumps(obj, indent=1, default=str).encode())


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # unreadable records count as missing: the cell is simply run again


class SweepRecords:
    """The files of one sweep under ``<runs dir>/sweeps/<name>/``."""

    def __init__(self, store, name: str):
        self.store = store
        self.root = sweeps_dir(store) / name

    def spec(self) -> dict | None:
        return (_read_json(self.root / "sweep.json") or {}).get("spec")

    def meta(self) -> dict:
        return _read_json(self.root / "sweep.json") or {}

    def write_meta(self, meta: dict) -> None:
        _write_json(self.root / "sweep.json", meta)

    def attack(self, key: str) -> dict | None:
        return _read_json(self.root / "attacks" / f"{key}.json")

    def cell(self, key: str) -> dict | None:
        return _read_json(self.root / "cells" / f"{key}.json")

    def put_attack(self, key: str, rec: dict) -> None:
        _write_json(self.root / "attacks" / f"{key}.json", rec)

    def put_cell(self, key: str, rec: dict) -> None:
        _write_json(self.root / "cells" / f"{key}.json", rec)

    def drop(self, kind: str, key: str) -> None:
        (self.root / kind / f"{key}.json").unlink(missing_ok=True)

    def _has_runs(self, *ids) -> bool:
        for rid in ids:
            if rid is None:
                continue
            try:
                self.store.get(rid)
            except BdftError:  # not found, or an unreadable record
                return False
        return True

    def _chain(self, run_id) -> list:
        """``run_id`` and the runs it descends from (a transfer victim's attacker); a missing or
        unreadable one ends the list with False."""
        out = []
        while run_id and run_id not in out:
            out.append(run_id)
            try:
                run_id = self.store.get(run_id).parent
            except BdftError:
                return out + [False]
        return out

    def valid_attack(self, key: str, drop: bool = True) -> dict | None:
        """The record of a training whose run, and every run it descends from, is still stored, else
        None (and, with ``drop``, the record is removed, so that the sweep runs it again)."""
        rec = self.attack(key)
        if rec and rec.get("run_id") and False not in self._chain(rec.get("run_id")):
            return rec
        if rec and drop:
            self.drop("attacks", key)
        return None

    def valid_cell(self, key: str, drop: bool = True) -> dict | None:
        """As :meth:`valid_attack`, for a cell. Readers (rows, estimates) pass ``drop=False``: while a
        sweep runs, a cell's record is written just before its runs are imported, and a reader must
        not take that moment for a deleted run and remove the record."""
        rec = self.cell(key)
        if rec and self._has_runs(rec.get("attack_run"), rec.get("defense_run")):
            return rec
        if rec and drop:
            self.drop("cells", key)
        return None


def list_sweeps(store) -> list[dict]:
    """Stored sweeps, newest first: name, cells in the grid, cells done, last update."""
    out = []
    root = sweeps_dir(store)
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        meta = _read_json(d / "sweep.json")
        if not meta or "spec" not in meta:
            continue
        try:
            spec = SweepSpec.from_dict(meta["spec"])
            keys = {c.key for c in spec.cells()}
        except BdftError:
            continue
        done = sum(1 for p in (d / "cells").glob("*.json") if p.stem in keys)
        out.append({"name": d.name, "cells": len(keys), "done": done, "updated": meta.get("updated", 0.0),
                    "axes": list(spec.axes)})
    return sorted(out, key=lambda r: r["updated"], reverse=True)


def load_spec(store, name: str) -> SweepSpec:
    rec = SweepRecords(store, name)
    d = rec.spec()
    if d is None:
        raise ConfigError(f"no stored sweep named {name!r} in {sweeps_dir(store)}")
    return SweepSpec.from_dict(d)


# --------------------------------------------------------------------------------------------
# Results as rows (the figures and exports read these)
# --------------------------------------------------------------------------------------------

def _row(cell: Cell, rec: dict | None) -> dict:
    row: dict[str, Any] = {**cell.values, "cell": cell.key}
    if rec is None:
        row.update({k: None for k in ("poisoned_clean_acc", "poisoned_asr", "clean_acc", "asr", "clean_acc_change",
                                      "asr_change", "seconds", "attack_seconds", "attack_run", "defense_run")})
        row["status"] = "missing"
        return row
    pca, pasr = rec["poisoned"].get("clean_acc"), rec["poisoned"].get("asr")
    ca, asr = rec["defended"].get("clean_acc"), rec["defended"].get("asr")
    row.update({"poisoned_clean_acc": pca, "poisoned_asr": pasr, "clean_acc": ca, "asr": asr,
                "clean_acc_change": None if ca is None or pca is None else ca - pca,
                "asr_change": None if asr is None or pasr is None else asr - pasr,
                "seconds": rec["defended"].get("seconds"), "attack_seconds": rec["poisoned"].get("seconds"),
                "attack_run": rec.get("attack_run"), "defense_run": rec.get("defense_run"), "status": "finished"})
    return row


def sweep_rows(store, spec: SweepSpec) -> list[dict]:
    """One row per cell of the grid, in grid order: the axis values, the poisoned model's and the
    defended model's CA and ASR, changes, seconds and run ids (status "missing" for cells not run, or
    whose runs were deleted since: what a resume would run again)."""
    rec = SweepRecords(store, spec.name)
    return [_row(c, rec.valid_cell(c.key, drop=False)) for c in spec.cells()]


# --------------------------------------------------------------------------------------------
# Estimates
# --------------------------------------------------------------------------------------------

def slots_for(spec: SweepSpec, address: str | None = None) -> int:
    """How many cells run at once on this machine (a cluster: unknown until connected; 1 assumed)."""
    if address:
        return 1
    gpus = _local_gpus()
    if gpus and spec.gpus_per_cell != 0:
        return max(1, int(gpus // max(spec.gpus_per_cell or 1, 1e-9)))
    return max(1, _local_cpus() // spec.threads_per_cell)


def estimate(spec: SweepSpec, store=None, address: str | None = None) -> dict:
    """Cells, trainings and defenses still to run, and a wall-time estimate, divided by the cells
    that run at once. From the stored runs of the same dataset (and defense) where there are some:
    their seconds per training image, times the images a cell trains on (its epochs and training-set
    slice for a poisoned training, its epochs over its share of clean data for a fine-tuning
    defense, that share for other defenses); runs stored before their
    index kept those counts give their median seconds as they are. Without stored runs, from first
    guesses for a small CPU machine."""
    from ..defenses import build_defense
    from ..paradigms import defense_defaults
    from ..pipeline import DEFAULT_EPOCHS

    rec = SweepRecords(store, spec.name) if store is not None else None
    units = spec.attack_units()
    # records whose runs were deleted count as to do, as run_sweep will treat them
    todo_units = [k for k in units if not (rec and rec.valid_attack(k, drop=False))]
    todo_cells = [c for cs in units.values() for c in cs
                  if c.defense != NONE and not (rec and rec.valid_cell(c.key, drop=False))]
    rows = [r for r in (store.list() if store is not None else []) if r.get("seconds") and r.get("status") == "finished"]
    basis = "stored runs"

    def same(kind, dataset, name=None):
        return [r for r in rows if r["kind"] == kind and r["dataset"] == dataset and (name is None or r.get("name") == name)]

    def scaled(runs, work_of, work):
        """Median seconds of ``runs``, scaled to ``work`` where the runs' own work is known."""
        if not runs:
            return None
        rates = [r["seconds"] / work_of(r) for r in runs if _positive(work_of(r))]
        if rates and _positive(work):
            return statistics.median(rates) * work
        return statistics.median(r["seconds"] for r in runs)

    def train_size(ds):
        """Images in a dataset's whole training set: known for the registry's names, else learned from
        stored whole-set trainings (images seen / epochs)."""
        if ds in TRAIN_SIZE:
            return TRAIN_SIZE[ds]
        seen = [r["images"] / r["epochs"] for r in same("attack", ds)
                if not r.get("n_train") and _positive(r.get("images")) and _positive(r.get("epochs"))]
        return statistics.median(seen) if seen else None

    def cell_images(cfg, ds):
        epochs = cfg.get("epochs") or DEFAULT_EPOCHS.get(ds, 4.0)
        size, n = train_size(ds), cfg.get("n_train")
        n = min(n, size) if n and size else (n or size)
        return n, (epochs * n if n else None)

    def attack_seconds(cfg, ds):
        n, images = cell_images(cfg, ds)
        return scaled(same("attack", ds), lambda r: r.get("images"), images)

    def defense_seconds(c, ds):
        """A fine-tuning defense by the images it will train on (its epochs, raised to its minimum
        steps on a small budget), others by the clean images they get."""
        runs = same("defense", ds, c.defense)
        n, _ = cell_images(c.attack, ds)
        if not runs or not n:
            return scaled(runs, lambda r: None, None)
        n_clean = max(1, round(c.clean_fraction * n))
        try:
            d = build_defense(c.defense, **{**defense_defaults(c.attack.get("paradigm") or "standalone", c.defense),
                                            **c.defense_params})
        except BdftError:
            d = None
        if d is not None and {"epochs", "batch_size"} <= set(d.params):
            return scaled(runs, lambda r: r.get("images"), d.epochs_for(n_clean) * n_clean)
        return scaled(runs, lambda r: r.get("n_clean"), n_clean)

    total, guessed = 0.0, False
    for k in todo_units:
        cfg = units[k][0].attack
        ds = str(cfg["dataset"])
        s = attack_seconds(cfg, ds)
        if s is None:
            guessed = True
            epochs = cfg.get("epochs") or DEFAULT_EPOCHS.get(ds, 4.0)
            s = FIRST_GUESS_S.get(ds, 60.0) * epochs / DEFAULT_EPOCHS.get(ds, epochs)
            if cfg.get("n_train"):
                s *= min(1.0, cfg["n_train"] / TRAIN_SIZE.get(ds, 50000))
            s /= max(1, spec.threads_per_cell) ** 0.7  # threads help, less than linearly
        total += s
        for c in units[k]:
            if c in todo_cells:
                d = defense_seconds(c, ds)
                if d is None:
                    guessed = True
                    d = DEFENSE_SHARE * s
                total += d
    for c in todo_cells:  # defenses of trainings already done
        if c.attack_key not in todo_units:
            ds = str(c.attack["dataset"])
            d = defense_seconds(c, ds)
            if d is None:
                guessed = True
                d = DEFENSE_SHARE * (attack_seconds(c.attack, ds) or FIRST_GUESS_S.get(ds, 60.0))
            total += d
    slots = slots_for(spec, address)
    if guessed:
        basis = "first guesses for a small CPU machine" if not rows else "stored runs where there are some, first guesses elsewhere"
    n_done = spec.n_cells - sum(1 for cs in units.values() for c in cs if not (rec and rec.valid_cell(c.key, drop=False)))
    return {"cells": spec.n_cells, "done": n_done, "trainings": len(units), "trainings_to_run": len(todo_units),
            "defenses_to_run": len(todo_cells), "parallel": slots, "seconds": total / slots, "basis": basis}


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _local_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover
        return 0


# --------------------------------------------------------------------------------------------
# Back ends: Ray, or a local process pool
# --------------------------------------------------------------------------------------------

def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _project_root() -> Path:
    return Path(__file__).resolve().parents[2]


class _RayBackend:
    name = "ray"

    def __init__(self, spec: SweepSpec, address: str | None):
        import ray

        self.ray = ray
        self.owned = False
        gpus_local = _local_gpus()
        gpc = spec.gpus_per_cell if spec.gpus_per_cell is not None else (1 if (gpus_local or address) else 0)
        if address and spec.gpus_per_cell is None:
            gpc = 0  # on a cluster, ask for GPUs explicitly (gpus_per_cell = 1)
        env = {k: v for k, v in os.environ.items() if k.startswith("BDFT_") and k not in ("BDFT_THREADS", "BDFT_RUNS_DIR")}
        if not ray.is_initialized():
            try:
                if address:
                    # the cluster runs this checkout's code (assets included), not whatever it has installed
                    runtime_env = {"working_dir": str(_project_root()), "env_vars": env,
                                   "excludes": [".venv", ".git", "**/__pycache__", "runs", "tests", "bench"]}
                    ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, configure_logging=False)
                else:
                    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_project_root()), os.environ.get("PYTHONPATH"))
                                                        if p)
                    ray.init(num_cpus=_local_cpus(), num_gpus=gpus_local, include_dashboard=False,
                             object_store_memory=min(2 * 1024 ** 3, max(100 * 1024 ** 2, 50 * 1024 ** 2 * spec.n_cells)),
                             runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=False,
                             logging_level="ERROR")
            except Exception as exc:  # ConnectionError, timeouts, bad address, ...
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                hint = ""
                if address and not os.environ.get("RAY_AUTH_MODE"):
                    hint = (" (if the cluster uses token authentication, the default of `ray start`, set "
                            "RAY_AUTH_MODE=token and give its token in RAY_AUTH_TOKEN or ~/.ray/auth_token)")
                raise ConfigError(f"could not start or reach {where}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
                                  f"{hint}") from None
            self.owned = True
        res = ray.cluster_resources()
        self.where = f"Ray cluster at {address}" if address else "local Ray instance"
        self.resources = {"CPU": res.get("CPU", 0), "GPU": res.get("GPU", 0), "nodes": len(ray.nodes())}
        if gpc and res.get("GPU", 0) < gpc:
            raise ConfigError(f"each cell asks for {gpc} GPU but {self.where} has {res.get('GPU', 0):g}")
        if spec.threads_per_cell > res.get("CPU", 0) and not gpc:
            raise ConfigError(f"each cell asks for {spec.threads_per_cell} CPU threads but {self.where} has "
                              f"{res.get('CPU', 0):g} CPUs")
        opts = {"num_cpus": spec.threads_per_cell if not gpc else 1, "num_gpus": gpc, "max_retries": 0}
        self.threads = spec.threads_per_cell
        self._attack = ray.remote(attack_task).options(**opts)
        self._defense = ray.remote(defense_task).options(**opts)
        self.pending: dict[Any, tuple] = {}

    def submit_attack(self, tag, cfg: dict):
        ref = self._attack.remote(cfg, self.threads)
        self.pending[ref] = tag
        return ref

    def put(self, payload: dict):
        return self.ray.put(payload)

    def submit_defense(self, tag, parent, cell: Cell):
        ref = self._defense.remote(parent, cell.defense, cell.defense_params, cell.clean_fraction, self.threads)
        self.pending[ref] = tag
        return ref

    def wait(self, timeout: float) -> list[tuple]:
        return self._collect(1, timeout)

    def drain(self) -> list[tuple]:
        """Results that are already there, without waiting for the others."""
        return self._collect(len(self.pending), 0)

    def _collect(self, n: int, timeout: float) -> list[tuple]:
        if not self.pending:
            return []
        done, _ = self.ray.wait(list(self.pending), num_returns=n, timeout=timeout)
        out = []
        for ref in done:
            tag = self.pending.pop(ref)
            try:
                out.append((tag, self.ray.get(ref), None))
            except Exception as exc:
                out.append((tag, None, _reason(exc)))
        return out

    def busy(self) -> bool:
        return bool(self.pending)

    def cancel(self) -> None:
        for ref in list(self.pending):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:
                pass
        self.pending.clear()

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()


def _pool_init(gpu_ids, tmp_root: str | None = None) -> None:  # pragma: no cover - runs in the pool's processes
    if tmp_root:  # the cells' private run stores go under the sweep's own folder, removed with the pool
        tempfile.tempdir = tmp_root
    if gpu_ids is not None:
        try:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_ids.get_nowait())
        except Exception:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""


class _PoolBackend:
    """The same tasks on a local process pool (fresh "spawn" processes, each reused for many cells):
    what runs where Ray is not installed. A worker that dies (killed, out of memory) fails its task
    and every task still in the pool (their cells are reported failed, to run again on resume)
    instead of leaving the sweep waiting for it."""

    name = "process"
    DIED = ("its worker process died (killed, or out of memory?); the cell is left missing: resume the sweep "
            "to run it again")

    def __init__(self, spec: SweepSpec):
        import multiprocessing as mp
        import queue as _q
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("spawn")
        gpus = _local_gpus() if spec.gpus_per_cell != 0 else 0
        gpu_q = None
        if gpus:
            n = gpus
            gpu_q = ctx.Manager().Queue()
            for i in range(gpus):
                gpu_q.put(i)
        else:
            n = max(1, _local_cpus() // spec.threads_per_cell)
        self.threads = spec.threads_per_cell
        # a killed worker leaves its cell's temporary run store behind: they all live here, removed at the end
        self.tmp = tempfile.mkdtemp(prefix="bdft-sweep-")
        self.pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_pool_init, initargs=(gpu_q, self.tmp))
        self.where = f"local process pool ({n} processes)"
        self.resources = {"CPU": _local_cpus(), "GPU": gpus, "nodes": 1}
        self.events: _q.Queue = _q.Queue()
        self.n_pending = 0
        self.cancelled = False

    def _submit(self, tag, fn, args):
        from concurrent.futures.process import BrokenProcessPool

        self.n_pending += 1
        try:
            fut = self.pool.submit(fn, *args)
        except BrokenProcessPool:  # a worker died earlier: nothing more starts in this pool
            self.events.put((tag, None, self.DIED))
            return

        def done(f):
            if f.cancelled():
                return
            exc = f.exception()
            if exc is None:
                self.events.put((tag, f.result(), None))
            else:
                self.events.put((tag, None, self.DIED if isinstance(exc, BrokenProcessPool) else _reason(exc)))

        fut.add_done_callback(done)

    def submit_attack(self, tag, cfg: dict):
        self._submit(tag, attack_task, (cfg, self.threads))
        return tag

    def put(self, payload: dict):
        return payload

    def submit_defense(self, tag, parent, cell: Cell):
        self._submit(tag, defense_task, (parent, cell.defense, cell.defense_params, cell.clean_fraction, self.threads))
        return tag

    def wait(self, timeout: float) -> list[tuple]:
        import queue as _q

        if not self.n_pending:
            return []
        try:
            item = self.events.get(timeout=timeout)
        except _q.Empty:
            return []
        self.n_pending -= 1
        return [item]

    def drain(self) -> list[tuple]:
        """Results that are already there, without waiting for the others."""
        import queue as _q

        out = []
        while self.n_pending:
            try:
                out.append(self.events.get_nowait())
            except _q.Empty:
                break
            self.n_pending -= 1
        return out

    def busy(self) -> bool:
        return self.n_pending > 0

    def _workers(self) -> list:
        return list((getattr(self.pool, "_processes", None) or {}).values())

    def cancel(self) -> None:
        """End what is running now: the workers are killed, not asked (a task checks no stop flag).
        They are listed before the shutdown, which forgets them."""
        self.cancelled = True
        workers = self._workers()
        self.pool.shutdown(wait=False, cancel_futures=True)
        for proc in workers:
            if proc.is_alive():
                proc.kill()
        for proc in workers:
            proc.join(timeout=5)
        self.n_pending = 0

    def close(self) -> None:
        if not self.cancelled:
            self.pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _f3(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "–"


def _reason(exc: BaseException) -> str:
    """The user-facing reason of a failed task (Ray wraps the original exception)."""
    cause = getattr(exc, "cause", None) or exc
    msg = str(cause).strip().splitlines()
    text = msg[-1] if msg else type(cause).__name__
    if isinstance(cause, BdftError):
        return text
    return f"{type(cause).__name__}: {text}"


def pick_backend(spec: SweepSpec, executor: str = "auto", address: str | None = None):
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}: use {', '.join(EXECUTORS)}")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if executor == "process":
        if address:
            raise ConfigError("a Ray address was given, but the executor is 'process' (local only); use 'ray'")
        return _PoolBackend(spec)
    if not ray_available():
        if executor == "ray" or address:
            raise ConfigError("Ray is not installed here: `pip install ray` (or run the sweep with the local "
                              "process pool: executor 'process')")
        return _PoolBackend(spec)
    return _RayBackend(spec, address)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    name: str
    cells: int
    ran: list[str] = field(default_factory=list)  # cell keys computed by this execution
    reused: list[str] = field(default_factory=list)  # cell keys found finished
    failed: list[dict] = field(default_factory=list)  # {"cell", "values", "error"}
    trainings_ran: int = 0
    executor: str = ""
    where: str = ""
    resources: dict = field(default_factory=dict)
    seconds: float = 0.0
    stopped: bool = False

    def to_json(self) -> dict:
        return dict(self.__dict__)


def run_sweep(spec: SweepSpec, store=None, executor: str = "auto", address: str | None = None,
              on_cell: Callable[[dict], None] | None = None, stop: threading.Event | None = None,
              log: Callable[[str], None] | None = None) -> SweepResult:
    """Run (or resume) a sweep: every missing cell, as tasks through Ray or a process pool; each
    finished cell is recorded and its runs imported into ``store`` as it arrives, and reported to
    ``on_cell(row)``. ``stop`` (a threading.Event) cancels what is still running, keeping what
    finished. Failed cells are listed in the result (their error) and left missing, to be run again
    by the next call."""
    from ..runs import RunStore

    store = store or RunStore()
    spec.validate()
    t0 = time.perf_counter()
    say = log or (lambda msg: None)
    rec = SweepRecords(store, spec.name)
    old = rec.meta()
    if old.get("spec") and old["spec"] != spec.to_dict():
        say(f"sweep {spec.name!r}: the grid changed; cells it shares with the stored one are reused")
    meta = {"spec": spec.to_dict(), "created": old.get("created", time.time()), "updated": time.time(),
            "executions": old.get("executions", [])}
    rec.write_meta(meta)

    units = spec.attack_units()
    res = SweepResult(spec.name, spec.n_cells)
    todo: dict[str, list[Cell]] = {}
    for akey, cells in units.items():
        for c in cells:
            if rec.valid_cell(c.key):
                res.reused.append(c.key)
            else:
                todo.setdefault(akey, []).append(c)
    if res.reused:
        say(f"sweep {spec.name!r}: {len(res.reused)} of {spec.n_cells} cells already finished; running the other "
            f"{spec.n_cells - len(res.reused)}")
    if not todo:
        res.seconds = time.perf_counter() - t0
        return res

    backend = pick_backend(spec, executor, address)
    res.executor, res.where, res.resources = backend.name, backend.where, backend.resources
    say(f"sweep {spec.name!r}: {sum(map(len, todo.values()))} cells on {backend.where}")
    payloads: dict[str, Any] = {}  # attack key -> its payload (or a Ray reference to it)
    attack_rec: dict[str, dict] = {}

    def finish_cell(c: Cell, a: dict, d: dict | None) -> None:
        poisoned = {"clean_acc": a.get("clean_acc"), "asr": a.get("asr"), "seconds": a.get("seconds")}
        r = {"key": c.key, "values": c.values, "attack_key": c.attack_key, "attack_run": a["run_id"],
             "defense_run": d["run_id"] if d else None, "poisoned": poisoned,
             "defended": ({"clean_acc": d["clean_acc"], "asr": d["asr"], "seconds": d["seconds"]} if d else
                          {"clean_acc": a.get("clean_acc"), "asr": a.get("asr"), "seconds": 0.0}),
             "host": (d or a).get("host"), "device": (d or a).get("device"), "finished": time.time()}
        rec.put_cell(c.key, r)  # the record first: a kill before the import drops it on resume
        if d:
            for files in d["runs"].values():
                store.import_run(files)
        res.ran.append(c.key)
        if on_cell:
            on_cell(_row(c, r))

    def fail(c: Cell, error: str) -> None:
        res.failed.append({"cell": c.key, "values": c.values, "error": error})
        say(f"cell {c.values} failed: {error}")

    def start_defenses(akey: str, parent) -> None:
        for c in todo[akey]:
            if c.defense != NONE:
                backend.submit_defense(("defense", akey, c.key), parent, c)

    try:
        for akey, cells in todo.items():
            a = rec.valid_attack(akey)
            if a is not None:  # the poisoned model exists: only its defenses are missing
                attack_rec[akey] = a
                payload = {**a, "runs": _export_chain(store, a["run_id"])}
                payloads[akey] = backend.put(payload)
                for c in cells:
                    if c.defense == NONE:
                        finish_cell(c, a, None)
                start_defenses(akey, payloads[akey])
            else:
                ref = backend.submit_attack(("attack", akey, None), cells[0].attack)
                if backend.name == "ray":  # Ray starts each defense when the training's result exists
                    payloads[akey] = ref
                    start_defenses(akey, ref)
        cells_by_key = {c.key: c for cs in todo.values() for c in cs}

        def handle(events, stopping: bool = False) -> None:
            for (kind, akey, ckey), out, error in events:
                if kind == "attack":
                    if error is not None:
                        for c in todo[akey]:  # with Ray its defense tasks fail too: counted once, here
                            fail(c, f"its poisoned training failed: {error}")
                        continue
                    a = {k: v for k, v in out.items() if k != "runs"}
                    rec.put_attack(akey, a)
                    for files in out["runs"].values():
                        store.import_run(files)
                    res.trainings_ran += 1
                    attack_rec[akey] = a
                    say(f"poisoned training {akey}: CA {_f3(a.get('clean_acc'))} ASR {_f3(a.get('asr'))} "
                        f"({a.get('seconds') or 0:.0f} s)")
                    for c in todo[akey]:
                        if c.defense == NONE:
                            finish_cell(c, a, None)
                    if backend.name != "ray" and not stopping:
                        start_defenses(akey, out)
                else:
                    c = cells_by_key[ckey]
                    if error is not None:
                        if not any(f["cell"] == ckey for f in res.failed):
                            fail(c, error)
                        continue
                    finish_cell(c, attack_rec[akey], out)
                    say(f"cell {c.values}: CA {_f3(out.get('clean_acc'))} ASR {_f3(out.get('asr'))}")

        while True:
            if stop is not None and stop.is_set():
                handle(backend.drain(), stopping=True)  # what finished before the stop is kept
                backend.cancel()
                res.stopped = True
                break
            events = backend.wait(timeout=0.5)
            if not events and not backend.busy():
                break
            handle(events)
    except BaseException:
        backend.cancel()
        raise
    finally:
        backend.close()
        res.seconds = time.perf_counter() - t0
        meta["updated"] = time.time()
        meta["executions"] = (meta["executions"] + [{
            "started": meta["updated"] - res.seconds, "seconds": res.seconds, "executor": res.executor,
            "where": res.where, "ran": len(res.ran), "reused": len(res.reused), "failed": len(res.failed),
            "stopped": res.stopped}])[-50:]
        rec.write_meta(meta)
    return res


def _export_chain(store, run_id: str) -> dict:
    """A stored run and the runs it descends from (a victim's attacker), exported."""
    out, rid = {}, run_id
    while rid and rid not in out:
        out[rid] = store.export_run(rid)
        rid = store.get(rid).parent
    return dict(reversed(list(out.items())))


__all__ = ["EXECUTORS", "SweepRecords", "SweepResult", "attack_task", "defense_task", "estimate", "list_sweeps",
           "load_spec", "pick_backend", "ray_available", "run_sweep", "sweep_rows", "sweeps_dir"]
