"""Stored runs: each attack training and each defense is a run with its config, metric history,
final metrics, timings, seed, versions, device, and weights as ``model.safetensors``.

Layout under the runs directory (``$BDFT_RUNS_DIR``, else ``~/.bdft/runs``)::

    index.sqlite            one row per finished run (what listing reads)
    <run_id>/run.json       the full record
    <run_id>/model.safetensors
    <run_id>/artefacts.safetensors   optional: a defense's tensors (reversed trigger, flagged indices)
    <run_id>/<name>.json             optional: results computed later (sequela)

Writes are atomic: files are written to temporary names, flushed and renamed into place, and the
index row is inserted last, in one transaction. A crash before that leaves at most an unlisted
folder (``RunStore.gc`` removes those); listing never sees half a run. Loading never unpickles:
weights are safetensors, records are JSON."""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import shutil
import sqlite3
import time
import uuid
from contextlib import closing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, ConfigError, RunNotFound

DEFAULT_RUNS_DIR = Path("~/.bdft/runs")
SCHEMA_VERSION = 1
_MAX_CHECKPOINT_BYTES = 2 * 1024 ** 3  # refuse absurd uploads before reading them


def runs_dir() -> Path:
    return Path(os.environ.get("BDFT_RUNS_DIR") or DEFAULT_RUNS_DIR).expanduser()


def versions() -> dict[str, str]:
    from . import __version__

    import numpy
    return {"bdft": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__}


@dataclass
class Run:
    """A run's record (``run.json``). ``kind`` is "attack" or "defense"; a defense's ``parent`` is
    the poisoned run it started from."""

    id: str
    kind: str
    created: float
    dataset: str
    model: dict[str, Any]
    attack: dict[str, Any]
    config: dict[str, Any]
    seed: int
    device: str
    status: str = "finished"  # finished | stopped
    parent: str | None = None
    defense: dict[str, Any] | None = None
    history: list[dict] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=versions)
    schema: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict) -> "Run":
        """A record read back; TypeError when it is not one (see :func:`check_record`)."""
        check_record(d)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def name(self) -> str:
        return self.defense["name"] if self.kind == "defense" and self.defense else self.attack.get("name", "?")


# the fields of a run record and the types they must have (None only where listed; no bools)
_RECORD_FIELDS = {"id": (str,), "kind": (str,), "created": (int, float), "dataset": (str,), "model": (dict,),
                  "attack": (dict,), "config": (dict,), "seed": (int,), "device": (str,), "status": (str,),
                  "parent": (str, type(None)), "defense": (dict, type(None)), "history": (list,), "final": (dict,),
                  "timings": (dict,), "versions": (dict,), "schema": (int,)}


def check_record(d) -> None:
    """TypeError, saying what is wrong, unless ``d`` is a run record: a JSON object with every field
    a :class:`Run` needs, each of its type, and a model with a name, a number of classes and of
    channels. Stored records are read through it, and so are those an uploaded checkpoint carries."""
    if not isinstance(d, dict):
        raise TypeError("not a JSON object")
    missing = [f.name for f in fields(Run) if f.default is MISSING and f.default_factory is MISSING
               and f.name not in d]
    if missing:
        raise TypeError(f"no {', '.join(missing)}")
    for k, types in _RECORD_FIELDS.items():
        if k in d and (not isinstance(d[k], types) or isinstance(d[k], bool)):
            raise TypeError(f"{k!r} is a {type(d[k]).__name__}, not a {' or '.join(t.__name__ for t in types)}")
    # what the index and every listing read: numbers where numbers go (an uploaded record saying
    # clean_acc "high" would otherwise be stored, and then break listing every run), names as text
    for part, keys in (("final", ("clean_acc", "asr")), ("timings", ("total_s", "train_s", "images_per_s")),
                       ("config", ("epochs", "n_train", "n_clean", "clean_fraction"))):
        for k in keys:
            v = d[part].get(k) if part in d else None
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise TypeError(f"{part}.{k} is {v!r}, not a finite number")
    for part in ("attack", "defense"):
        v = (d.get(part) or {}).get("name")
        if v is not None and not isinstance(v, str):
            raise TypeError(f"{part}.name is {v!r}, not text")
    for k in ("paradigm", "victim"):
        v = d["config"].get(k) if "config" in d else None
        if v is not None and not isinstance(v, str):
            raise TypeError(f"config.{k} is {v!r}, not text")
    m = d["model"]
    if not (isinstance(m.get("name"), str) and all(isinstance(m.get(k), int) and not isinstance(m.get(k), bool)
                                                   for k in ("num_classes", "channels"))
            and isinstance(m.get("kwargs") or {}, dict)):
        raise TypeError("its model needs a name, a number of classes and of channels")


def new_run_id(kind: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{uuid.uuid4().hex[:6]}"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def model_shapes(spec: dict) -> dict[str, torch.Tensor]:
    """The state a run's model has, built on the meta device: names and shapes, no memory, whatever
    size a record claims."""
    from .errors import BdftError
    from .models import build_model

    try:
        with torch.device("meta"):
            return build_model(spec["name"], spec["num_classes"], spec["channels"],
                               **(spec.get("kwargs") or {})).state_dict()
    except (BdftError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the record's model {spec.get('name')!r} cannot be built here ({exc})") from None


def state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def load_state_checked(model: torch.nn.Module, path_or_bytes, what: str = "checkpoint") -> None:
    """Load safetensors weights into ``model``, refusing anything that is not safetensors, is
    truncated, or does not match the model's parameter names and shapes (with a clear message)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load
    from safetensors.torch import load_file

    try:
        if isinstance(path_or_bytes, (bytes, bytearray)):
            if len(path_or_bytes) > _MAX_CHECKPOINT_BYTES:
                raise CheckpointError(f"{what} is larger than 2 GiB; refusing to read it")
            state = st_load(bytes(path_or_bytes))
        else:
            p = Path(path_or_bytes)
            if not p.is_file():
                raise CheckpointError(f"{what} not found: {p}")
            state = load_file(str(p))
    except CheckpointError:
        raise
    except (SafetensorError, ValueError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{what} is not a valid safetensors file (corrupt, truncated, or another format "
                              f"such as a pickled .pt): {exc}") from None
    expected = model.state_dict()
    check_state_fits(expected, state, what)
    odd = [f"{k} ({v.dtype})" for k, v in state.items()  # int8 or complex weights would load cast, as nonsense
           if v.is_complex() or v.is_floating_point() != expected[k].is_floating_point() or v.dtype == torch.bool]
    if odd:
        raise CheckpointError(f"{what} holds tensors of the wrong kind of number ({len(odd)}, e.g. {odd[0]}): "
                              "weights are floating point; was it converted by another tool?")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def check_state_fits(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str) -> None:
    """CheckpointError unless ``state`` has exactly ``expected``'s names and shapes (``expected`` may
    live on the meta device: only shapes are compared)."""
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or extra or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} tensor(s) of the wrong shape (e.g. {wrong[0]})")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        raise CheckpointError(f"{what} does not fit this model: " + "; ".join(parts) +
                              ". Was it made for another model, dataset or number of classes?")


def _images_trained(run: Run) -> int | None:
    """Training images a run went through (its throughput times its training seconds), or None."""
    try:
        n = float(run.timings.get("images_per_s") or 0) * float(run.timings.get("train_s") or 0)
    except (TypeError, ValueError):
        return None
    return int(round(n)) if math.isfinite(n) and n > 0 else None


class RunStore:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root else runs_dir()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ConfigError(f"the runs folder {self.root} is a file: point BDFT_RUNS_DIR (or --runs-dir) at a "
                              "folder") from None
        except OSError as exc:
            raise ConfigError(f"the runs folder {self.root} cannot be made ({exc.strerror}): point BDFT_RUNS_DIR "
                              "(or --runs-dir) at a folder you can write to") from None
        self.index = self.root / "index.sqlite"
        self.rebuilt: dict | None = None  # set when an unreadable index was put aside and rebuilt
        try:
            self._create_index()
            if self._empty_beside_runs():  # an emptied (zero-byte) index reads as a new one: runs would vanish
                self._rebuild_index(sqlite3.DatabaseError("the index lists no run, but run folders are there"))
        except sqlite3.OperationalError as exc:  # locked, read-only, a folder in its place: not damage, say so
            raise ConfigError(f"the runs index {self.index} cannot be opened ({exc}): is another program "
                              "holding it, or is the folder read-only?") from None
        except sqlite3.DatabaseError as exc:  # "file is not a database", "disk image is malformed"
            self._rebuild_index(exc)

    def check_writable(self) -> None:
        """ConfigError now, before minutes of training, when the runs folder cannot take a new run."""
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ConfigError(f"the runs folder {self.root} is read-only, so a run could not be kept: point "
                              "BDFT_RUNS_DIR (or --runs-dir) at a folder you can write to")

    def _empty_beside_runs(self) -> bool:
        with closing(self._db()) as db:
            if db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]:
                return False
        return any(d.is_dir() and _RUN_ID.fullmatch(d.name) and (d / "run.json").is_file()
                   for d in self.root.iterdir())

    def _create_index(self) -> None:
        with closing(self._db()) as db, db:
            db.execute("""CREATE TABLE IF NOT EXISTS runs (
                id TEXT PRIMARY KEY, kind TEXT NOT NULL, parent TEXT, created REAL NOT NULL,
                dataset TEXT, name TEXT, status TEXT, clean_acc REAL, asr REAL, seconds REAL, summary TEXT)""")
            db.execute("SELECT COUNT(*) FROM runs").fetchone()  # reads the table: damage shows here

    def _rebuild_index(self, exc: Exception) -> None:
        """The index is only a cache of the runs' own records: put the damaged file aside (nothing is
        deleted) and index every run folder whose record and weights are readable again."""
        aside = self.index.with_name(f"index.sqlite.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(self.index, aside)
        self._create_index()
        indexed, skipped = [], []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and _RUN_ID.fullmatch(d.name):
                try:
                    run = Run.from_json(json.loads((d / "run.json").read_text()))
                    if run.id != d.name or not (d / "model.safetensors").is_file():
                        raise ValueError("record and folder disagree, or no weights")
                except (OSError, ValueError, TypeError) as why:
                    skipped.append(f"{d.name} ({why})")
                    continue
                self._index(run)
                indexed.append(run.id)
        self.rebuilt = {"error": str(exc), "moved_to": str(aside), "indexed": indexed, "skipped": skipped}
        logging.getLogger("bdft").warning(
            "the runs index %s was unreadable (%s): kept as %s and rebuilt from the run folders, %d run(s) "
            "indexed%s", self.index, exc, aside.name, len(indexed),
            f", {len(skipped)} unreadable one(s) left out: {', '.join(skipped)}" if skipped else "")

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.index, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def path(self, run_id: str) -> Path:
        """A run's folder. Only ids of the form new_run_id makes are accepted, so no id (from an
        imported file, say) can name the store's own files or folders (index.sqlite, sweeps/)."""
        if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
            raise RunNotFound(f"no stored run {run_id!r}: run ids look like 20261127-211509-attack-ad05b7 "
                              "(list them with: python -m bdft_core runs list)")
        return self.root / run_id

    # -- writing -------------------------------------------------------------------------------
    def save(self, run: Run, model: torch.nn.Module, artefacts: dict | None = None) -> Run:
        """Write weights, artefacts (see :meth:`save_artefacts`) and record atomically, then index the
        run: a crash before the index row leaves no listed run without its files."""
        from safetensors.torch import save as st_save

        d = self.path(run.id)
        d.mkdir(parents=True, exist_ok=True)
        # the record travels inside the weights file, so a downloaded checkpoint can be re-imported
        meta = {"bdft_run": run.id, "model": json.dumps(run.model),
                "run": dumps(run.to_json())}
        _atomic_write_bytes(d / "model.safetensors", st_save(state_for_saving(model), metadata=meta))
        self.save_artefacts(run.id, artefacts or {})
        _atomic_write_bytes(d / "run.json", dumps(run.to_json(), indent=1).encode())
        self._index(run)
        return run

    def _index(self, run: Run) -> None:
        summary = {"attack": run.attack.get("name"), "defense": (run.defense or {}).get("name"),
                   "model": run.model.get("name"), "device": run.device,
                   "paradigm": run.config.get("paradigm", "standalone"),
                   "victim": run.config.get("victim") if run.kind == "victim" else None,
                   # the work a run did, so a sweep's estimate can scale stored runs' seconds to other sizes
                   "images": _images_trained(run), "epochs": run.config.get("epochs"),
                   "n_train": run.config.get("n_train"), "n_clean": run.config.get("n_clean")}
        with closing(self._db()) as db, db:
            db.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       (run.id, run.kind, run.parent, run.created, run.dataset, run.name, run.status,
                        run.final.get("clean_acc"), run.final.get("asr"), run.timings.get("total_s"),
                        json.dumps(summary)))

    # -- moving runs between stores (sweep cells computed elsewhere) ------------------------------
    def export_run(self, run_id: str) -> dict[str, bytes]:
        """Every file of a stored run, by name: what :meth:`import_run` needs to re-create it in
        another store (a sweep's cell computed on another process or machine)."""
        self.get(run_id)
        return {p.name: p.read_bytes() for p in sorted(self.path(run_id).iterdir())
                if p.is_file() and _exportable(p.name)}

    def import_run(self, files: dict[str, bytes]) -> Run:
        """Store a run exported by :meth:`export_run` (weights checked to be safetensors, never
        unpickled; file names limited to a run's own). Importing the same run twice is harmless."""
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        if "run.json" not in files or "model.safetensors" not in files:
            raise CheckpointError("an exported run needs run.json and model.safetensors")
        bad = [n for n in files if not _exportable(n)]
        if bad:
            raise CheckpointError(f"unexpected file {bad[0]!r} in an exported run")
        try:
            run = Run.from_json(json.loads(files["run.json"]))
            state = st_load(bytes(files["model.safetensors"]))
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError, SafetensorError, ValueError) as exc:
            raise CheckpointError(f"an exported run is unreadable ({exc})") from None
        check_state_fits(model_shapes(run.model), state, f"the weights of exported run {run.id}")
        d = self.path(run.id)
        held = d / "model.safetensors"
        if held.is_file():  # the same run again is harmless; another one under its id must not replace it
            if held.read_bytes() == bytes(files["model.safetensors"]):
                return self._import_files(d, run, files)
            raise CheckpointError(f"run {run.id} is already stored here with other weights: refusing to replace it")
        return self._import_files(d, run, files)

    def _import_files(self, d: Path, run: Run, files: dict[str, bytes]) -> Run:
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():  # the record last: the index row follows it
            if name != "run.json":
                _atomic_write_bytes(d / name, bytes(data))
        _atomic_write_bytes(d / "run.json", bytes(files["run.json"]))
        self._index(run)
        return run

    # -- reading -------------------------------------------------------------------------------
    def list(self, kind: str | None = None, parent: str | None = None) -> list[dict]:
        """Index rows, newest first (fast: reads only the SQLite index)."""
        q, args = "SELECT * FROM runs", []
        conds = []
        if kind:
            conds.append("kind = ?")
            args.append(kind)
        if parent:
            conds.append("parent = ?")
            args.append(parent)
        if conds:
            q += " WHERE " + " AND ".join(conds)
        q += " ORDER BY created DESC"
        with closing(self._db()) as db:
            rows = [dict(r) for r in db.execute(q, args)]
        for r in rows:
            r.update(json.loads(r.pop("summary") or "{}"))
        return rows

    def get(self, run_id: str) -> Run:
        p = self.path(run_id) / "run.json"
        with closing(self._db()) as db:
            indexed = db.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone()
        if not indexed or not p.is_file():
            raise RunNotFound(f"no stored run {run_id!r} in {self.root} (list them with: python -m bdft_core runs list)")
        try:
            return Run.from_json(json.loads(p.read_text()))
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError, OSError) as exc:
            raise CheckpointError(f"the record of run {run_id} is unreadable ({exc})") from None

    def load_model(self, run_id: str, device="cpu"):
        """Rebuild the run's model and load its weights (safetensors, checked)."""
        from .models import build_model

        run = self.get(run_id)
        m = run.model
        from .uploads import _check_record

        _check_record(run.to_json(), f"the record of run {run_id}")  # a hand-edited model size builds nothing
        model = build_model(m["name"], m["num_classes"], m["channels"], **m.get("kwargs", {}))
        load_state_checked(model, self.path(run_id) / "model.safetensors", what=f"weights of run {run_id}")
        return run, model.to(device).eval()

    def save_artefacts(self, run_id: str, tensors: dict[str, torch.Tensor]) -> None:
        """Keep a defense's tensors (a reversed trigger, flagged indices) next to its weights."""
        from safetensors.torch import save as st_save

        if not tensors:
            return
        clean = {k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in tensors.items()}
        _atomic_write_bytes(self.path(run_id) / "artefacts.safetensors", st_save(clean))

    def load_artefacts(self, run_id: str) -> dict[str, torch.Tensor]:
        """A run's artefacts ({} when it has none)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        p = self.path(run_id) / "artefacts.safetensors"
        if not p.is_file():
            return {}
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"the artefacts of run {run_id} are unreadable ({exc})") from None

    def save_result(self, run_id: str, name: str, obj: dict) -> None:
        """Keep a JSON result computed later about a run (sequela, attributions) as
        ``<run_id>/<name>.json``, so reopening it is instant."""
        if not name.isidentifier():
            raise ValueError(f"bad result name {name!r}")
        self.get(run_id)
        _atomic_write_bytes(self.path(run_id) / f"{name}.json", dumps(obj, indent=1).encode())

    def load_result(self, run_id: str, name: str) -> dict | None:
        """A result kept with :meth:`save_result`, or None."""
        if not name.isidentifier():
            raise ValueError(f"bad result name {name!r}")
        p = self.path(run_id) / f"{name}.json"
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"the stored {name} result of run {run_id} is unreadable ({exc})") from None

    def children(self, run_id: str) -> list[dict]:
        """Every run made from this one: its defenses and, for a transfer attacker, its victims."""
        return self.list(parent=run_id)

    def defenses(self, run_id: str) -> list[dict]:
        """The defended versions of a run (not the victims a transfer attacker also parents)."""
        return self.list(kind="defense", parent=run_id)

    def newest_defenses(self, run_id: str, stopped: bool = True) -> dict[str, str]:
        """Defense name -> the id of its newest *finished* run on ``run_id``: the result per defense
        that pages compare and that a sequela result measures (stale when this mapping changes). A
        stopped run is half a defense: it stands in only where its defense has no finished run, and
        with ``stopped=False`` never (what Explain and Sequela measure as "after the defense")."""
        finished, partial = {}, {}
        for c in self.defenses(run_id):  # newest first
            (finished if c.get("status") != "stopped" else partial).setdefault(c["name"], c["id"])
        if stopped:
            for name, rid in partial.items():
                finished.setdefault(name, rid)
        return finished

    # -- removing ------------------------------------------------------------------------------
    def delete(self, run_id: str) -> list[str]:
        """Delete a run and the runs derived from it (its defenses, and theirs); returns the ids
        removed, the derived ones first. Works from the index and the folders alone, so a run whose
        record is damaged, or whose folder is gone, can still be deleted."""
        folder = self.path(run_id)
        with closing(self._db()) as db:
            indexed = db.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone()
            if not indexed and not folder.is_dir():
                raise RunNotFound(f"no stored run {run_id!r} in {self.root} (list them with: python -m bdft_core runs list)")
            found, todo = [], [run_id]
            while todo:  # every descendant once, even if a damaged index made a cycle
                rid = todo.pop()
                if rid not in found:
                    found.append(rid)
                    todo += [r[0] for r in db.execute("SELECT id FROM runs WHERE parent = ?", (rid,))]
        with closing(self._db()) as db, db:
            db.executemany("DELETE FROM runs WHERE id = ?", [(r,) for r in found])
        for rid in found:
            if _RUN_ID.fullmatch(rid):
                shutil.rmtree(self.root / rid, ignore_errors=True)
        return found[::-1]

    def gc(self) -> list[str]:
        """Remove folders that never made it into the index (a crash mid-write)."""
        with closing(self._db()) as db:
            known = {r[0] for r in db.execute("SELECT id FROM runs")}
        gone = []
        for d in self.root.iterdir():  # only run folders: sweeps/ and triggers/ live here too
            if d.is_dir() and d.name not in known and _RUN_ID.fullmatch(d.name):
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d.name)
        return gone


_RUN_ID = re.compile(r"\d{8}-\d{6}-[a-z_]+-[0-9a-f]{6}")


def _exportable(name: str) -> bool:
    return name in ("run.json", "model.safetensors", "artefacts.safetensors") or (
        name.endswith(".json") and name[:-5].isidentifier())


def finite_json(o):
    """``o`` with every NaN and infinity replaced by None: JSON has no NaN, and strict readers (jq,
    JavaScript, Python's ``json.loads(..., parse_constant=...)``) reject the bare ``NaN`` Python writes
    for it. A defense's first history row has no loss yet (NaN), and an ASR with no eligible test
    image is NaN."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: finite_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite_json(v) for v in o]
    return o


def dumps(obj, **kw) -> str:
    """``json.dumps`` for records and results: tensors as lists, paths as text, NaN/inf as null."""
    return json.dumps(finite_json(obj), default=_json_default, **kw)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return finite_json(o.tolist()) if o.numel() <= 64 else f"<tensor {tuple(o.shape)}>"
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


__all__ = ["Run", "RunStore", "check_record", "check_state_fits", "load_state_checked", "model_shapes", "new_run_id",
           "runs_dir", "versions"]
