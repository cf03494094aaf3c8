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
import os
import platform
import re
import shutil
import sqlite3
import time
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, RunNotFound

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
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    @property
    def name(self) -> str:
        return self.defense["name"] if self.kind == "defense" and self.defense else self.attack.get("name", "?")


def new_run_id(kind: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{uuid.uuid4().hex[:6]}"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


class RunStore:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root else runs_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.index = self.root / "index.sqlite"
        with closing(self._db()) as db, db:
            db.execute("""CREATE TABLE IF NOT EXISTS runs (
                id TEXT PRIMARY KEY, kind TEXT NOT NULL, parent TEXT, created REAL NOT NULL,
                dataset TEXT, name TEXT, status TEXT, clean_acc REAL, asr REAL, seconds REAL, summary TEXT)""")

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.index, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def path(self, run_id: str) -> Path:
        if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
            raise RunNotFound(f"{run_id!r} is not a valid run id")
        return self.root / run_id

    # -- writing -------------------------------------------------------------------------------
    def save(self, run: Run, model: torch.nn.Module) -> Run:
        """Write weights and record atomically, then index the run."""
        from safetensors.torch import save as st_save

        d = self.path(run.id)
        d.mkdir(parents=True, exist_ok=True)
        # the record travels inside the weights file, so a downloaded checkpoint can be re-imported
        meta = {"bdft_run": run.id, "model": json.dumps(run.model),
                "run": json.dumps(run.to_json(), default=_json_default)}
        _atomic_write_bytes(d / "model.safetensors", st_save(state_for_saving(model), metadata=meta))
        _atomic_write_bytes(d / "run.json", json.dumps(run.to_json(), indent=1, default=_json_default).encode())
        self._index(run)
        return run

    def _index(self, run: Run) -> None:
        summary = {"attack": run.attack.get("name"), "defense": (run.defense or {}).get("name"),
                   "model": run.model.get("name"), "device": run.device,
                   "paradigm": run.config.get("paradigm", "standalone"),
                   "victim": run.config.get("victim") if run.kind == "victim" else None}
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
            st_load(bytes(files["model.safetensors"]))
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError, SafetensorError, ValueError) as exc:
            raise CheckpointError(f"an exported run is unreadable ({exc})") from None
        d = self.path(run.id)
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
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"the record of run {run_id} is unreadable ({exc})") from None

    def load_model(self, run_id: str, device="cpu"):
        """Rebuild the run's model and load its weights (safetensors, checked)."""
        from .models import build_model

        run = self.get(run_id)
        m = run.model
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
        _atomic_write_bytes(self.path(run_id) / f"{name}.json", json.dumps(obj, indent=1, default=_json_default).encode())

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
        return self.list(parent=run_id)

    # -- removing ------------------------------------------------------------------------------
    def delete(self, run_id: str) -> list[str]:
        """Delete a run and the defenses derived from it; returns the ids removed."""
        self.get(run_id)
        removed = []
        for child in self.children(run_id):
            removed += self.delete(child["id"])
        with closing(self._db()) as db, db:
            db.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        shutil.rmtree(self.path(run_id), ignore_errors=True)
        return removed + [run_id]

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


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist() if o.numel() <= 64 else f"<tensor {tuple(o.shape)}>"
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


__all__ = ["Run", "RunStore", "load_state_checked", "new_run_id", "runs_dir", "versions"]
