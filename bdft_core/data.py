"""Datasets: a registry by name, loaded once into uint8 tensors, plus seeded splits and batched
on-device augmentation.

Where a dataset comes from, in order (``load_dataset``):

1. ``<data_dir>/<name>.npz`` in the schema of ``shared/data/README.md``
   (``x_train`` uint8 (N,H,W,C) or (N,H,W), ``y_train``, ``x_test``, ``y_test``, optional ``classes``);
2. torchvision's own layout under ``<data_dir>`` (what ``download=True`` would leave there);
3. torchvision's download into ``<data_dir>``, with its progress bar, when the host answers;
4. otherwise :class:`~bdft_core.errors.DatasetNotFound`, saying what to put where.

``data_dir`` is ``$BDFT_DATA_DIR``, else ``~/.bdft/data``. ``digits`` (scikit-learn's bundled 8x8
digits) is always available offline. A path to an ``.npz`` file or to an image folder (one
subfolder per class, optionally under ``train/`` and ``test/``) works wherever a name does.
"""
from __future__ import annotations

import gzip
import os
import socket
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DatasetNotFound

DEFAULT_DATA_DIR = Path("~/.bdft/data")
_CONNECT_TIMEOUT_S = 3.0  # how long we wait to learn whether a download host is reachable
_DOWNLOAD_TIMEOUT_S = 60.0  # socket timeout during a download: a stalled transfer fails, never hangs


def data_dir() -> Path:
    """The data directory: ``$BDFT_DATA_DIR`` if set, else ``~/.bdft/data``."""
    return Path(os.environ.get("BDFT_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


@dataclass
class ImageData:
    """A dataset held as tensors: images uint8 (N, C, H, W), labels int64 (N,)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device) -> "ImageData":
        """The same data on ``device`` (a no-op when already there)."""
        device = torch.device(device)
        if self.x_train.device == device:
            return self
        return ImageData(self.name, self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                         self.y_test.to(device), list(self.classes), self.source)

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> "ImageData":
        """A seeded random slice (for quick demos and tests); the class list is kept whole."""
        g = torch.Generator().manual_seed(seed)

        def pick(x, y, n):
            if n is None or n >= len(y):
                return x, y
            idx = torch.randperm(len(y), generator=g)[:n].to(y.device)
            return x[idx], y[idx]

        xtr, ytr = pick(self.x_train, self.y_train, n_train)
        xte, yte = pick(self.x_test, self.y_test, n_test)
        return ImageData(self.name, xtr, ytr, xte, yte, list(self.classes), self.source)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    tv_class: str | None = None  # torchvision.datasets class name
    host: str | None = None  # download host, checked before any download
    split_kw: str = "train"  # how torchvision names the split argument ("train" bool or "split" str)
    resize: int | None = None  # images of varying size are resized to this square
    extra_dirs: tuple[str, ...] = field(default_factory=tuple)  # other places to look for raw files


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", "CIFAR-10: 32x32 colour photos, 10 classes", "CIFAR10", "www.cs.toronto.edu"),
    "gtsrb": DatasetSpec("gtsrb", "GTSRB: German traffic signs, 43 classes, resized to 32x32", "GTSRB",
                         "sid.erda.dk", split_kw="split", resize=32),
    "fashion_mnist": DatasetSpec("fashion_mnist", "Fashion-MNIST: 28x28 greyscale clothing, 10 classes",
                                 "FashionMNIST", "fashion-mnist.s3-website.eu-central-1.amazonaws.com",
                                 extra_dirs=("/usr/share/datasets/fashion-mnist",)),
    "mnist": DatasetSpec("mnist", "MNIST: 28x28 greyscale handwritten digits, 10 classes", "MNIST",
                         "ossci-datasets.s3.amazonaws.com"),
    "svhn": DatasetSpec("svhn", "SVHN: 32x32 colour house-number digits, 10 classes", "SVHN",
                        "ufldl.stanford.edu", split_kw="split"),
    "digits": DatasetSpec("digits", "scikit-learn digits: 8x8 greyscale, 10 classes, bundled (always offline)"),
}

_ALIASES = {"cifar-10": "cifar10", "fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist",
            "fmnist": "fashion_mnist"}


def dataset_names() -> list[str]:
    return list(DATASETS)


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def available_datasets(root: Path | None = None) -> dict[str, str]:
    """Which registered datasets can load right now without a download: name -> where from."""
    root = Path(root) if root else data_dir()
    found = {}
    for name, spec in DATASETS.items():
        if name == "digits":
            found[name] = "bundled with scikit-learn"
        elif (root / f"{name}.npz").is_file():
            found[name] = str(root / f"{name}.npz")
        elif _raw_idx_dir(spec, root) is not None:
            found[name] = str(_raw_idx_dir(spec, root))
    return found


def load_dataset(name: str, root: str | Path | None = None, download: str | bool = "auto",
                 image_size: int = 32, cache: bool = True) -> ImageData:
    """Load a dataset by registry name, ``.npz`` path or image-folder path (see module docstring).

    ``download``: "auto" downloads when the host answers within a few seconds and ``BDFT_OFFLINE``
    is unset; True always tries; False never. ``cache`` writes ``<name>.npz`` into the data
    directory after a torchvision load, so the next load is one fast read."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("dataset name is empty: give a registered name "
                          f"({', '.join(DATASETS)}), an .npz path or an image folder")
    p = Path(name).expanduser()
    if name.endswith(".npz") or p.suffix == ".npz":
        if not p.is_file():
            raise DatasetNotFound(f"no such .npz file: {p}")
        return load_npz(p)
    if p.is_dir() and canonical_name(name) not in DATASETS:
        return load_image_folder(p, image_size=image_size)
    key = canonical_name(name)
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, "
                          "or give a path to an .npz file or an image folder")
    spec = DATASETS[key]
    if key == "digits":
        return load_digits()
    root = Path(root).expanduser() if root else data_dir()
    npz = root / f"{key}.npz"
    if npz.is_file():
        return load_npz(npz, name=key)
    raw = _raw_idx_dir(spec, root)
    if raw is not None:
        return _load_idx(key, raw)
    data = _load_torchvision(spec, root, download)
    if cache:
        try:
            save_npz(data, npz)
            data.source += f" (cached as {npz})"
        except OSError:
            pass  # read-only data dir: fine, we just load from torchvision's layout next time
    return data


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------

def _to_nchw(x: np.ndarray, what: str) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise ConfigError(f"{what} must be uint8 images (0..255), got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ConfigError(f"{what} must have shape (N, H, W, C) with C = 1 or 3, got {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


MAX_CLASSES = 10_000  # without a ``classes`` array, a larger label is taken for a typo, not a class count


def _check_labels(y: np.ndarray, what: str, where) -> np.ndarray:
    """Integer (or bool) labels as int64 (N,); floats and strings are refused, never truncated."""
    if y.dtype.kind not in "iub":
        raise ConfigError(f"{where}: {what} must hold integer class labels, got {y.dtype}")
    return y.astype(np.int64).reshape(-1)


def _check_label_range(y_train: np.ndarray, y_test: np.ndarray, classes: list[str] | None, where) -> list[str]:
    """The class list: ``classes`` when given (labels must index it), else ``"0".."K-1"`` for the
    largest label K-1, refused above :data:`MAX_CLASSES` before any list is built, and refused when a
    label below K-1 never occurs (a stray label, not a class count)."""
    lo, hi = int(min(y_train.min(), y_test.min())), int(max(y_train.max(), y_test.max()))
    if classes is None:
        if hi >= MAX_CLASSES:
            raise ConfigError(f"{where}: the largest label is {hi}, and without a 'classes' array that would "
                              f"mean {hi + 1} classes (at most {MAX_CLASSES} allowed): labels must be 0..K-1")
        if lo >= 0:
            unused = np.setdiff1d(np.arange(hi + 1), np.union1d(y_train, y_test))
            if len(unused):  # a stray 255 among 0..9 would otherwise make 256 classes, 246 of them empty
                shown = ", ".join(str(int(u)) for u in unused[:5]) + (", ..." if len(unused) > 5 else "")
                raise ConfigError(f"{where}: without a 'classes' array the labels must be 0..K-1 with every class "
                                  f"present, but the largest label is {hi} and {len(unused)} of 0..{hi} never "
                                  f"occur ({shown}): fix the stray labels, or add a 'classes' array naming all "
                                  f"{hi + 1} classes")
        classes = [str(i) for i in range(hi + 1)]
    if lo < 0 or hi >= len(classes):
        raise ConfigError(f"{where}: labels must lie in 0..{len(classes) - 1}, found {lo}..{hi}")
    return classes


def load_npz(path: str | Path, name: str | None = None) -> ImageData:
    """Read an ``.npz`` in the shared schema; never unpickles (object arrays are refused).

    Labels must be integers (or bools) in ``0..len(classes)-1``; without a ``classes`` array the
    classes are ``"0".."K-1"`` for the largest label ``K-1``, at most :data:`MAX_CLASSES` of them, each
    occurring in ``y_train`` or ``y_test``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFound(f"no such .npz file: {path}")
    if not zipfile.is_zipfile(path):  # .npy, text, a truncated download: numpy's own errors mislead
        raise ConfigError(f"{path} is not a readable .npz file: it is not a valid .npz (zip) archive "
                          "(a truncated download, or an .npy or other file renamed to .npz?)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise ConfigError(f"{path} lacks {', '.join(missing)}: an .npz needs x_train, y_train, "
                                  "x_test, y_test (uint8 images N,H,W,C and integer labels)")
            xtr, ytr, xte, yte = (z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
            cls = z["classes"] if "classes" in z.files else None
    except ConfigError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):  # object arrays need pickle, which we refuse
            raise ConfigError(f"{path} is not a readable plain .npz file ({exc}); bdft reads numeric arrays "
                              "only and never unpickles") from None
        raise ConfigError(f"{path} is not a readable .npz file: an array in it is damaged ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ConfigError(f"{path} is not a readable .npz file: the archive is damaged ({exc})") from None
    except MemoryError:  # a member's header can claim any shape
        raise ConfigError(f"{path}: an array in it claims more memory than this machine has (a damaged or "
                          "hand-made header?)") from None
    for k, a in (("x_train", xtr), ("y_train", ytr), ("x_test", xte), ("y_test", yte), ("classes", cls)):
        if a is not None and not isinstance(a, np.ndarray):
            raise ConfigError(f"{path}: {k} is not a numpy array (a member of the archive that is not .npy)")
    if cls is not None and cls.ndim != 1:
        raise ConfigError(f"{path}: classes must be a 1-D array of class names, got shape {cls.shape}")
    classes = [str(c) for c in cls] if cls is not None else None
    x_train, x_test = _to_nchw(xtr, "x_train"), _to_nchw(xte, "x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ConfigError(f"{path}: train images {tuple(x_train.shape[1:])} and test images "
                          f"{tuple(x_test.shape[1:])} differ in shape")
    if ytr.size != len(x_train) or yte.size != len(x_test):
        raise ConfigError(f"{path}: the number of labels does not match the number of images")
    ytr, yte = _check_labels(ytr, "y_train", path), _check_labels(yte, "y_test", path)
    if len(x_train) == 0 or len(x_test) == 0:
        raise ConfigError(f"{path} has no {'training' if len(x_train) == 0 else 'test'} images")
    classes = _check_label_range(ytr, yte, classes, path)
    return ImageData(name or path.stem, x_train, torch.from_numpy(ytr), x_test, torch.from_numpy(yte), classes,
                     str(path))


def save_npz(data: ImageData, path: str | Path) -> None:
    """Write ``data`` in the shared schema, atomically (a temp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x_train=data.x_train.cpu().numpy().transpose(0, 2, 3, 1),
             y_train=data.y_train.cpu().numpy().astype(np.int64),
             x_test=data.x_test.cpu().numpy().transpose(0, 2, 3, 1),
             y_test=data.y_test.cpu().numpy().astype(np.int64), classes=np.array(data.classes))
    os.replace(tmp, path)


def load_digits() -> ImageData:
    """scikit-learn's bundled 8x8 digits (1,797 images), a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as _ld
    from sklearn.model_selection import train_test_split

    d = _ld()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255, (N,1,8,8)
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.2, random_state=0, stratify=d.target)
    return ImageData("digits", torch.from_numpy(xtr), torch.from_numpy(ytr.astype(np.int64)),
                     torch.from_numpy(xte), torch.from_numpy(yte.astype(np.int64)),
                     [str(i) for i in range(10)], "scikit-learn (bundled)")


_IMG_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}


def _hidden(p: Path) -> bool:
    """Hidden entries and OS/tool clutter (.git, .ipynb_checkpoints, ._x.png, __MACOSX): never data."""
    return p.name.startswith(".") or p.name == "__MACOSX"


def pil_to_rgb(im):
    """A PIL image as 8-bit RGB. 16-bit greyscale (modes ``I;16*``, and ``I``, which Pillow uses for
    16-bit files too) is scaled from 0..65535 to 0..255 (divided by 257, ``I`` clipped to 0..65535
    first); float images (mode ``F``) are taken as 0..1 and scaled by 255 when their maximum is at
    most 1, else as 0..255 and clipped. Pillow's own ``convert`` would clip them to white or black."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
        else:
            a = np.clip(a, 0, 65535) / 257.0
        im = Image.fromarray(np.round(np.clip(np.nan_to_num(a), 0, 255)).astype(np.uint8), "L")
    return im.convert("RGB")


MAX_FOLDER_IMAGE_PIXELS = 16 * 10 ** 6  # a dataset image; a decompression bomb would take gigabytes


def load_image_folder(path: str | Path, image_size: int = 32, test_fraction: float = 0.2,
                      seed: int = 0) -> ImageData:
    """One subfolder per class (names sorted = labels). With ``train/`` and ``test/`` subfolders,
    those are the splits (both must have the same class folders); otherwise a seeded stratified
    ``test_fraction`` is held out. Hidden folders and files (``.git``, ``.ipynb_checkpoints``,
    ``__MACOSX``) are skipped; a class folder without images is refused. Images are converted to
    RGB (16-bit and float images scaled to 0..255, see :func:`pil_to_rgb`) and resized to
    ``image_size`` square, once, at load time."""
    from PIL import Image

    root = Path(path)

    def class_dirs(d: Path) -> list[str]:
        return sorted(p.name for p in d.iterdir() if p.is_dir() and not _hidden(p))

    def read_tree(d: Path, classes=None):
        cls = classes or class_dirs(d)
        xs, ys = [], []
        for i, c in enumerate(cls):
            n = len(xs)
            for f in sorted((d / c).iterdir()) if (d / c).is_dir() else []:
                if f.suffix.lower() in _IMG_EXT and not _hidden(f):
                    try:
                        with Image.open(f) as im:
                            if im.width * im.height > MAX_FOLDER_IMAGE_PIXELS:  # read from the header, not decoded
                                raise ConfigError(f"{f} is {im.width}x{im.height} pixels, more than the "
                                                  f"{MAX_FOLDER_IMAGE_PIXELS // 10 ** 6} million an image may have "
                                                  f"here (each is resized to {image_size}x{image_size}): shrink it")
                            im = pil_to_rgb(im).resize((image_size, image_size), Image.BILINEAR)
                            xs.append(np.asarray(im, dtype=np.uint8))
                    except ConfigError:
                        raise
                    except Exception as exc:
                        raise ConfigError(f"{f} is not a readable image ({exc})") from exc
                    ys.append(i)
            if len(xs) == n:
                raise ConfigError(f"class folder {d / c} holds no images ({', '.join(sorted(_IMG_EXT))}): "
                                  "add some or remove it (an image folder holds one subfolder of images per class, "
                                  "or train/ and test/ each holding such subfolders)")
        return cls, xs, ys

    if (root / "train").is_dir() and (root / "test").is_dir():
        tr_cls, te_cls = class_dirs(root / "train"), class_dirs(root / "test")
        if tr_cls != te_cls:
            only = (("train", sorted(set(tr_cls) - set(te_cls))), ("test", sorted(set(te_cls) - set(tr_cls))))
            diff = [f"only in {split}/: {', '.join(names)}" for split, names in only if names]
            raise ConfigError(f"{root}: train/ and test/ must hold the same class folders ({'; '.join(diff)})")
        classes, xtr, ytr = read_tree(root / "train")
        _, xte, yte = read_tree(root / "test", classes)
    else:
        classes, xs, ys = read_tree(root)
        rng = np.random.default_rng(seed)
        ys_a = np.array(ys)
        test_mask = np.zeros(len(ys), bool)
        for c in range(len(classes)):
            idx = np.flatnonzero(ys_a == c)
            rng.shuffle(idx)
            test_mask[idx[: int(round(len(idx) * test_fraction))]] = True
        xtr = [x for x, m in zip(xs, test_mask) if not m]
        ytr = [y for y, m in zip(ys, test_mask) if not m]
        xte = [x for x, m in zip(xs, test_mask) if m]
        yte = [y for y, m in zip(ys, test_mask) if m]
    if len(classes) < 2 or not xtr or not xte:
        raise ConfigError(f"{root}: an image folder needs at least two class subfolders with images "
                          "(and enough images for a test split)")
    return ImageData(root.name, _to_nchw(np.stack(xtr), "images"), torch.tensor(ytr, dtype=torch.int64),
                     _to_nchw(np.stack(xte), "images"), torch.tensor(yte, dtype=torch.int64), classes, str(root))


# -- raw idx files (MNIST family, and Debian's dataset-fashion-mnist package) ------------------

_IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_TV_FOLDER = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot"]


def _raw_idx_dir(spec: DatasetSpec, root: Path) -> Path | None:
    if spec.name not in _TV_FOLDER:
        return None
    for d in (root / _TV_FOLDER[spec.name] / "raw", *map(Path, spec.extra_dirs)):
        if all(_find_idx(d, f) for pair in _IDX.values() for f in pair):
            return d
    return None


def _find_idx(d: Path, stem: str) -> Path | None:
    for cand in (d / stem, d / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ConfigError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).copy()
    if arr.size != int(np.prod(dims)):
        raise ConfigError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


def _load_idx(key: str, d: Path) -> ImageData:
    parts = {}
    classes = _FASHION_CLASSES if key == "fashion_mnist" else [str(i) for i in range(10)]
    for split, (img, lab) in _IDX.items():
        x, y = _read_idx(_find_idx(d, img)), _read_idx(_find_idx(d, lab))
        if y.ndim != 1 or len(y) != len(x):
            raise ConfigError(f"{d}: {img} holds {len(x)} images but {lab} holds {y.size} labels "
                              f"(shape {y.shape}): the number of labels must match the number of images")
        if len(x) and int(y.max()) >= len(classes):
            raise ConfigError(f"{d}: {lab} has label {int(y.max())}: labels must lie in 0..{len(classes) - 1}")
        parts[split] = (x, y)
    return ImageData(key, _to_nchw(parts["train"][0], "x_train"), torch.from_numpy(parts["train"][1].astype(np.int64)),
                     _to_nchw(parts["test"][0], "x_test"), torch.from_numpy(parts["test"][1].astype(np.int64)),
                     list(classes), str(d))


# -- torchvision ------------------------------------------------------------------------------

def _host_reachable(host: str) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=_CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def _missing_message(spec: DatasetSpec, root: Path, why: str) -> str:
    return (f"dataset {spec.name!r} not found and {why}. Put {spec.name}.npz (keys x_train, y_train, x_test, "
            f"y_test; uint8 images N,H,W,C) in {root}, or torchvision's {spec.tv_class} files there, or set "
            "BDFT_DATA_DIR to the folder that holds them; 'digits' always works offline")


def _load_torchvision(spec: DatasetSpec, root: Path, download) -> ImageData:
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.tv_class)

    def build(split: str, dl: bool):
        kw = {spec.split_kw: (split == "train") if spec.split_kw == "train" else split}
        return cls(str(root), download=dl, **kw)

    try:  # already in torchvision's layout?
        tr, te = build("train", False), build("test", False)
    except (RuntimeError, FileNotFoundError, OSError):
        if download is False:
            raise DatasetNotFound(_missing_message(spec, root, "downloads are disabled")) from None
        if download == "auto" and os.environ.get("BDFT_OFFLINE"):
            raise DatasetNotFound(_missing_message(spec, root, "BDFT_OFFLINE is set")) from None
        if not _host_reachable(spec.host):
            raise DatasetNotFound(_missing_message(spec, root, f"its download host {spec.host} cannot be "
                                                               "reached (offline?)")) from None
        root.mkdir(parents=True, exist_ok=True)
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
        try:
            tr, te = build("train", True), build("test", True)
        except Exception as exc:
            raise DatasetNotFound(_missing_message(spec, root, f"the download failed ({exc})")) from exc
        finally:
            socket.setdefaulttimeout(old)
    xtr, ytr = _tv_arrays(tr, spec)
    xte, yte = _tv_arrays(te, spec)
    classes = [str(c) for c in getattr(tr, "classes", [])] or [str(i) for i in range(int(max(ytr.max(), yte.max())) + 1)]
    return ImageData(spec.name, _to_nchw(xtr, "x_train"), torch.from_numpy(ytr), _to_nchw(xte, "x_test"),
                     torch.from_numpy(yte), classes, f"torchvision {spec.tv_class} in {root}")


def _tv_arrays(ds, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    if spec.resize:  # images of varying size (GTSRB): decode and resize once, here, not per step
        from PIL import Image

        xs, ys = [], []
        for path, label in ds._samples:
            with Image.open(path) as im:
                xs.append(np.asarray(im.convert("RGB").resize((spec.resize, spec.resize), Image.BILINEAR)))
            ys.append(label)
        return np.stack(xs).astype(np.uint8), np.asarray(ys, dtype=np.int64)
    x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    if spec.name == "svhn":
        x = x.transpose(0, 2, 3, 1)  # SVHN stores (N, C, H, W)
    y = getattr(ds, "targets", None)
    if y is None:
        y = ds.labels
    y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    return x.astype(np.uint8), y.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

CLEAN_FRACTION_MIN, CLEAN_FRACTION_MAX = 0.005, 1.0


@dataclass(frozen=True)
class Splits:
    """Who sees which training images, from one seeded permutation of the training set.

    The defender's clean data is the *front* of the permutation (a fraction ``f`` gives the first
    ``round(f*N)`` indices, so smaller budgets are subsets of larger ones); the attacker's poisoned
    samples are the first *eligible* indices from the *back*. The two do not overlap as long as the
    defender's front share and the stretch of the permutation the attacker's selection reaches leave
    room for each other, i.e. roughly ``clean_fraction + n_poison / (eligible share * N) <= 1``. When
    every image is eligible that stretch is just ``poison_rate``; when only some are (all-to-one
    attacks skip the target class, clean-label attacks poison the target class only) it reaches
    further forward: 10% all-to-one poisoning over 10 classes reaches about 11% of the permutation
    (the demo's 20% defender share leaves ample room), whereas 5% clean-label poisoning of one class
    in ten reaches about half of it. Either way the defender always receives the original, clean
    images of its indices, so an overlap only means that some of the attacker's images are in the
    defender's set in their clean form. Test data is the dataset's separate test split, seen by
    neither."""

    n_train: int
    seed: int = 0

    def order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(self.seed) + 7919)
        return torch.randperm(self.n_train, generator=g)

    def defender_indices(self, clean_fraction: float) -> torch.Tensor:
        check_clean_fraction(clean_fraction)
        k = max(1, int(round(clean_fraction * self.n_train)))
        return self.order()[:k]

    def poison_indices(self, n: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` indices from the back of the permutation, restricted to ``eligible`` (a bool mask
        over the training set) when given, e.g. target-class images for a clean-label attack."""
        order = self.order().flip(0)
        if eligible is not None:
            order = order[eligible.cpu()[order]]
        if n > len(order):
            raise ConfigError(f"cannot poison {n} images: only {len(order)} are eligible")
        return order[:n]


def check_clean_fraction(f: float) -> float:
    if not (CLEAN_FRACTION_MIN <= float(f) <= CLEAN_FRACTION_MAX):
        raise ConfigError(f"clean fraction must be between {CLEAN_FRACTION_MIN} (0.5%) and 1 (100%), got {f}")
    return float(f)


# --------------------------------------------------------------------------------------------
# Batched augmentation on the device
# --------------------------------------------------------------------------------------------

def augment(x: torch.Tensor, flip: bool = True, translate: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random horizontal flip and random translation by up to ``translate`` pixels (reflect-padded
    crop), for a whole batch at once on its own device. Works on uint8 or float (N, C, H, W).
    ``translate`` must be smaller than the image's height and width (reflect padding needs that)."""
    n, _, h, w = x.shape
    dev = x.device
    if translate >= min(h, w):
        raise ConfigError(f"augment: translate={translate} pixels must be smaller than the image side "
                          f"({h}x{w}); use at most {min(h, w) - 1}")
    if flip:
        m = torch.rand(n, device=dev, generator=generator) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    if translate > 0:
        r = translate
        xp = torch.nn.functional.pad(x.float() if x.dtype == torch.uint8 else x, (r, r, r, r), mode="reflect")
        dx = torch.randint(0, 2 * r + 1, (n,), device=dev, generator=generator)
        dy = torch.randint(0, 2 * r + 1, (n,), device=dev, generator=generator)
        rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])  # (N, H)
        cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])  # (N, W)
        xp = xp.gather(2, rows[:, None, :, None].expand(n, xp.shape[1], h, xp.shape[3]))
        xp = xp.gather(3, cols[:, None, None, :].expand(n, xp.shape[1], h, w))
        x = xp.to(x.dtype) if x.dtype == torch.uint8 else xp
    return x
