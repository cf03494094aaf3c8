"""Files that users hand in: trigger images and checkpoints. Everything is checked before use and
nothing is ever unpickled.

- :func:`save_trigger_image` accepts PNG or JPEG bytes (bounded in bytes and in pixels, so a
  "decompression bomb" is refused before it is decoded), stores a normalised PNG in the runs
  directory under its content hash and returns the path an attack's ``pattern`` can take. The
  image is thus kept with the runs that use it, not just referenced where it was uploaded from.
- :func:`import_checkpoint` accepts a ``.safetensors`` file written by this tool (its header
  carries the run record), checks that the weights fit the model the record describes, and stores
  it as a run. A file that is not safetensors, is truncated, has no bdft record, or whose tensors
  do not fit gets a specific :class:`~bdft_core.errors.CheckpointError`."""
from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path

from .errors import CheckpointError, ConfigError

MAX_TRIGGER_BYTES = 10 * 1024 ** 2  # 10 MiB
MAX_TRIGGER_PIXELS = 4096 * 4096
MAX_CHECKPOINT_BYTES = 512 * 1024 ** 2  # far above any model this lab trains
MAX_HEADER_BYTES = 64 * 1024 ** 2


def save_trigger_image(data: bytes, filename: str = "trigger", root: str | Path | None = None) -> Path:
    """Check an uploaded trigger image and store it as PNG; returns its path."""
    from PIL import Image, UnidentifiedImageError

    from .runs import runs_dir

    if not data:
        raise ConfigError(f"{filename}: the file is empty")
    if len(data) > MAX_TRIGGER_BYTES:
        raise ConfigError(f"{filename}: {len(data) / 1024 ** 2:.1f} MiB is too large for a trigger image "
                          f"(at most {MAX_TRIGGER_BYTES // 1024 ** 2} MiB)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            w, h = im.size
            if fmt not in ("PNG", "JPEG"):
                raise ConfigError(f"{filename}: a trigger image must be PNG or JPEG, this is {fmt or 'unknown'}")
            if w * h > MAX_TRIGGER_PIXELS:  # checked from the header, before decoding the pixels
                raise ConfigError(f"{filename}: {w}x{h} pixels is too large for a trigger image "
                                  f"(at most {MAX_TRIGGER_PIXELS} pixels, e.g. 4096x4096)")
            im.load()
            rgb = im.convert("RGB")
    except ConfigError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ConfigError(f"{filename}: not a readable PNG or JPEG image ({exc})") from None
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    png = out.getvalue()
    folder = Path(root) if root else runs_dir() / "triggers"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(png).hexdigest()[:16]}.png"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(png)
        tmp.replace(path)
    return path


def safetensors_header(data: bytes, what: str = "checkpoint") -> dict:
    """Parse and check a safetensors header (8-byte little-endian length + JSON) without loading
    any tensor; raises CheckpointError for anything else."""
    if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":
        raise CheckpointError(f"{what} looks like a pickled PyTorch file (.pt/.pth); it is refused because "
                              "unpickling can run code. Use a .safetensors checkpoint exported by bdft")
    if len(data) < 8:
        raise CheckpointError(f"{what} is not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise CheckpointError(f"{what} is not a safetensors file, or is truncated (its header claims {n} bytes "
                              f"of {len(data)})")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{what} is not a safetensors file (its header is not JSON); "
                              "pickled PyTorch files (.pt/.pth) are refused on purpose") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{what} is not a safetensors file (malformed header)")
    return header


def import_checkpoint(data: bytes, store, filename: str = "checkpoint"):
    """Store an uploaded bdft checkpoint as a run (a new id if its id is taken by another run).
    Returns the stored :class:`~bdft_core.runs.Run`."""
    from .models import build_model
    from .runs import Run, load_state_checked, new_run_id

    if len(data) > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{filename}: {len(data) / 1024 ** 2:.0f} MiB is larger than any checkpoint this "
                              f"tool makes (at most {MAX_CHECKPOINT_BYTES // 1024 ** 2} MiB)")
    meta = safetensors_header(data, filename).get("__metadata__") or {}
    if "run" not in meta:
        raise CheckpointError(f"{filename}: a safetensors file, but not one exported by bdft (its header has no "
                              "run record, so the model, dataset and attack are unknown)")
    try:
        run = Run.from_json(json.loads(meta["run"]))
        m = run.model
        model = build_model(m["name"], int(m["num_classes"]), int(m["channels"]), **(m.get("kwargs") or {}))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{filename}: its bdft run record is damaged ({exc})") from None
    load_state_checked(model, data, what=filename)  # names, shapes; refuses anything but safetensors
    try:
        existing = store.get(run.id)
    except Exception:
        existing = None
    if existing is not None:
        import torch
        from safetensors.torch import load as st_load

        mine = st_load((store.path(run.id) / "model.safetensors").read_bytes())
        theirs = model.state_dict()
        if mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k].to(mine[k].dtype)) for k in mine):
            return existing  # the same weights again: nothing to do
        run.id = new_run_id(run.kind)
    if run.parent:
        try:
            store.get(run.parent)
        except Exception:
            run.parent = None  # its poisoned parent is not here; keep the run, standalone
    run.status = run.status if run.status in ("finished", "stopped") else "finished"
    run.config = {**run.config, "imported_from": str(filename)}
    store.save(run, model)
    return run


__all__ = ["MAX_CHECKPOINT_BYTES", "MAX_TRIGGER_BYTES", "MAX_TRIGGER_PIXELS", "import_checkpoint",
           "safetensors_header", "save_trigger_image"]
