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

from .data import pil_to_rgb
from .errors import CheckpointError, ConfigError

MAX_TRIGGER_BYTES = 10 * 1024 ** 2  # 10 MiB
MAX_TRIGGER_PIXELS = 4096 * 4096
MAX_CHECKPOINT_BYTES = 512 * 1024 ** 2  # far above any model this lab trains
MAX_HEADER_BYTES = 64 * 1024 ** 2
# bounds on what a run record may ask to be built, checked before anything is allocated; generous
# next to anything this tool exports (fastnet widths (24, 48, 96), resnet18 width 64, <= 100 classes)
MAX_NUM_CLASSES = 100_000
MAX_WIDTH = 4096  # a fastnet's ``widths`` entries, a resnet18's ``width``
MAX_BLOCKS = 8  # entries of a fastnet's ``widths``


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
            rgb = pil_to_rgb(im)  # 16-bit grey scaled: Pillow's convert("RGB") would clip it to white
    except ConfigError:
        raise
    except UnidentifiedImageError:  # Pillow's message names its in-memory buffer, nothing a user can use
        raise ConfigError(f"{filename}: not a readable PNG or JPEG image (its contents are not an image "
                          "Pillow recognises, whatever its name says)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
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
    # a safetensors length prefix may start with 0x80 too; its JSON header then starts at byte 8
    looks_safetensors = len(data) >= 9 and data[8:9] == b"{" and 8 + struct.unpack("<Q", data[:8])[0] <= len(data)
    if not looks_safetensors and (data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"):
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
    except (ValueError, RecursionError):  # ValueError: not UTF-8, not JSON, or an absurdly long number
        raise CheckpointError(f"{what} is not a safetensors file (its header is not JSON); "
                              "pickled PyTorch files (.pt/.pth) are refused on purpose") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{what} is not a safetensors file (malformed header)")
    return header


def _check_record(rec, filename: str) -> None:
    """Check the types of a run record's fields, its run id and its model description (bounded,
    so that nothing huge is built from it); raises CheckpointError."""
    from .runs import _RUN_ID, check_record

    try:
        check_record(rec)  # the fields and their types, as for a stored run
    except TypeError as exc:
        raise CheckpointError(f"{filename}: its bdft run record is damaged ({exc})") from None
    if not _RUN_ID.fullmatch(rec["id"]):
        raise CheckpointError(f"{filename}: the file's run id {rec['id'][:80]!r} is invalid (expected one like "
                              "20240101-120000-attack-1a2b3c)")
    if not _RUN_ID.fullmatch(f"00000000-000000-{rec['kind']}-000000"):  # a renamed copy gets an id from its kind
        raise CheckpointError(f"{filename}: its bdft run record is damaged (invalid kind {rec['kind'][:40]!r})")
    m = rec["model"]  # a name, whole numbers of classes and channels, kwargs a dict (check_record)
    n, c, kwargs = m["num_classes"], m["channels"], m.get("kwargs") or {}

    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not 2 <= n <= MAX_NUM_CLASSES:
        raise CheckpointError(f"{filename}: its run record says {str(n)[:40]} classes; a checkpoint must have "
                              f"between 2 and {MAX_NUM_CLASSES}")
    if c not in (1, 3):
        raise CheckpointError(f"{filename}: its run record says {str(c)[:40]} image channels; only 1 (grey) or "
                              "3 (colour) are supported")
    widths = kwargs.get("widths", [])
    width = kwargs.get("width", 1)
    if (not isinstance(widths, list) or not len(widths) <= MAX_BLOCKS
            or not all(whole(w) and 1 <= w <= MAX_WIDTH for w in widths)):
        raise CheckpointError(f"{filename}: its run record's model widths {str(widths)[:80]} are out of range "
                              f"(at most {MAX_BLOCKS} widths, each from 1 to {MAX_WIDTH})")
    if not whole(width) or not 1 <= width <= MAX_WIDTH:
        raise CheckpointError(f"{filename}: its run record's model width {str(width)[:40]} is out of range "
                              f"(1 to {MAX_WIDTH})")


def _check_shapes(header: dict, expected: dict, data_len: int, filename: str) -> None:
    """Compare the tensor names and shapes in a safetensors header with a model's ``state_dict``
    (built on the meta device, so nothing is allocated); raises CheckpointError."""
    shapes = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        shape = v.get("shape") if isinstance(v, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise CheckpointError(f"{filename} is not a safetensors file (malformed header entry {k[:80]!r})")
        shapes[k] = tuple(shape)
    import torch

    from .runs import check_state_fits

    check_state_fits(expected, {k: torch.empty(v, device="meta") for k, v in shapes.items()}, filename)
    if sum(v.numel() for v in expected.values()) > data_len:  # every stored value takes at least a byte
        raise CheckpointError(f"{filename} is truncated: its header describes more values than the file holds")


def import_checkpoint(data: bytes, store, filename: str = "checkpoint"):
    """Store an uploaded bdft checkpoint as a run (a new id if its id is taken by another run).
    Returns the stored :class:`~bdft_core.runs.Run`."""
    from .models import build_model
    from .runs import Run, load_state_checked, model_shapes, new_run_id

    if len(data) > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{filename}: {len(data) / 1024 ** 2:.0f} MiB is larger than any checkpoint this "
                              f"tool makes (at most {MAX_CHECKPOINT_BYTES // 1024 ** 2} MiB)")
    import torch

    header = safetensors_header(data, filename)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{filename} is not a safetensors file (its __metadata__ is not a map of strings)")
    if "run" not in meta:
        raise CheckpointError(f"{filename}: a safetensors file, but not one exported by bdft (its header has no "
                              "run record, so the model, dataset and attack are unknown)")
    try:
        rec = json.loads(meta["run"])
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{filename}: its bdft run record is damaged (not JSON: {str(exc)[:80]})") from None
    _check_record(rec, filename)  # field types, run id, bounded model size: before anything is built
    try:
        run = Run.from_json(rec)
        m = run.model
        _check_shapes(header, model_shapes(m), len(data), filename)  # on the meta device: no memory yet
        model = build_model(m["name"], m["num_classes"], m["channels"], **(m.get("kwargs") or {}))
    except (KeyError, TypeError, ValueError, RuntimeError, ConfigError) as exc:
        raise CheckpointError(f"{filename}: its bdft run record is damaged ({exc})") from None
    load_state_checked(model, data, what=filename)  # loads; refuses anything but valid safetensors
    try:
        existing = store.get(run.id)
    except Exception:
        existing = None
    if existing is not None:
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
