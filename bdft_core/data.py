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


def load_npz(path: str | Path, name: str | None = None) -> ImageData:
    """Read an ``.npz`` in the shared schema; never unpickles (object arrays are refused)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise ConfigError(f"{path} lacks {', '.join(missing)}: an .npz needs x_train, y_train, "
                                  "x_test, y_test (uint8 images N,H,W,C and integer labels)")
            xtr, ytr, xte, yte = (z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
            classes = [str(c) for c in z["classes"]] if "classes" in z.files else None
    except (ValueError, OSError, EOFError) as exc:  # object arrays need pickle, which we refuse
        raise ConfigError(f"{path} is not a readable plain .npz file ({exc}); bdft reads numeric arrays only "
                          "and never unpickles") from None
    x_train, x_test = _to_nchw(xtr, "x_train"), _to_nchw(xte, "x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ConfigError(f"{path}: train images {tuple(x_train.shape[1:])} and test images "
                          f"{tuple(x_test.shape[1:])} differ in shape")
    y_train = torch.from_numpy(ytr.astype(np.int64).reshape(-1))
    y_test = torch.from_numpy(yte.astype(np.int64).reshape(-1))
    if len(y_train) != len(x_train) or len(y_test) != len(x_test):
        raise ConfigError(f"{path}: the number of labels does not match the number of images")
    k = int(max(y_train.max(), y_test.max())) + 1
    if classes is None:
        classes = [str(i) for i in range(k)]
    if len(classes) < k or int(min(y_train.min(), y_test.min())) < 0:
        raise ConfigError(f"{path}: labels must lie in 0..{len(classes) - 1}")
    return ImageData(name or path.stem, x_train, y_train, x_test, y_test, classes, str(path))


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


def load_image_folder(path: str | Path, image_size: int = 32, test_fraction: float = 0.2,
                      seed: int = 0) -> ImageData:
    """One subfolder per class (names sorted = labels). With ``train/`` and ``test/`` subfolders,
    those are the splits; otherwise a seeded stratified ``test_fraction`` is held out. Images are
    converted to RGB and resized to ``image_size`` square, once, at load time."""
    from PIL import Image

    root = Path(path)

    def read_tree(d: Path, classes=None):
        cls = classes or sorted(p.name for p in d.iterdir() if p.is_dir())
        xs, ys = [], []
        for i, c in enumerate(cls):
            for f in sorted((d / c).iterdir()) if (d / c).is_dir() else []:
                if f.suffix.lower() in _IMG_EXT:
                    try:
                        with Image.open(f) as im:
                            im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                            xs.append(np.asarray(im, dtype=np.uint8))
                    except Exception as exc:
                        raise ConfigError(f"{f} is not a readable image ({exc})") from exc
                    ys.append(i)
        return cls, xs, ys

    if (root / "train").is_dir() and (root / "test").is_dir():
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
    for split, (img, lab) in _IDX.items():
        parts[split] = (_read_idx(_find_idx(d, img)), _read_idx(_find_idx(d, lab)))
    classes = _FASHION_CLASSES if key == "fashion_mnist" else [str(i) for i in range(10)]
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
    samples are taken from the *back*. Whenever ``clean_fraction + poison_rate <= 1`` the two never
    overlap; and the defender always receives the original, clean images of its indices. Test data
    is the dataset's separate test split, seen by neither."""

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
    crop), for a whole batch at once on its own device. Works on uint8 or float (N, C, H, W)."""
    n, _, h, w = x.shape
    dev = x.device
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
