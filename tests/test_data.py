"""Dataset registry, formats, splits and batched augmentation."""
import gzip
import struct
import time

import numpy as np
import pytest
import torch

from bdft_core.data import Splits, augment, available_datasets, load_dataset, save_npz
from bdft_core.errors import ConfigError, DatasetNotFound


def test_digits_is_always_available_offline():
    d = load_dataset("digits")
    assert d.x_train.dtype == torch.uint8 and d.x_train.shape[1:] == (1, 8, 8)
    assert len(d.y_train) + len(d.y_test) == 1797 and d.num_classes == 10
    assert int(d.x_train.max()) == 255
    assert "digits" in available_datasets()


def _write_npz(path, n=20, shape=(6, 6, 3), classes=("a", "b")):
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (n, *shape), dtype=np.uint8), y_train=np.arange(n) % 2,
             x_test=rng.integers(0, 256, (n // 2, *shape), dtype=np.uint8), y_test=np.arange(n // 2) % 2,
             classes=np.array(classes))


def test_npz_path_and_registry_name_in_data_dir(tmp_path, monkeypatch):
    _write_npz(tmp_path / "cifar10.npz")
    d = load_dataset(str(tmp_path / "cifar10.npz"))
    assert d.x_train.shape == (20, 3, 6, 6) and d.classes == ["a", "b"]
    monkeypatch.setenv("BDFT_DATA_DIR", str(tmp_path))
    d2 = load_dataset("CIFAR-10")  # alias, case-insensitive, resolved in BDFT_DATA_DIR
    assert torch.equal(d.x_train, d2.x_train)


def test_npz_roundtrip(tmp_path):
    d = load_dataset("digits")
    save_npz(d, tmp_path / "x.npz")
    d2 = load_dataset(str(tmp_path / "x.npz"))
    assert torch.equal(d.x_train, d2.x_train) and torch.equal(d.y_test, d2.y_test) and d2.classes == d.classes


@pytest.mark.parametrize("bad,msg", [
    (dict(x_train=np.zeros((2, 4, 4, 3), np.float32)), "uint8"),
    (dict(y_train=None), "lacks"),
    (dict(y_train=np.zeros(3)), "does not match"),
])
def test_bad_npz_gives_clear_error(tmp_path, bad, msg):
    arrays = dict(x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.zeros(2), x_test=np.zeros((2, 4, 4, 3), np.uint8),
                  y_test=np.zeros(2))
    arrays.update(bad)
    np.savez(tmp_path / "b.npz", **{k: v for k, v in arrays.items() if v is not None})
    with pytest.raises(ConfigError, match=msg):
        load_dataset(str(tmp_path / "b.npz"))


def test_pickled_npz_is_refused(tmp_path):
    np.savez(tmp_path / "p.npz", x_train=np.array([object()], dtype=object), y_train=np.zeros(1),
             x_test=np.zeros((1, 2, 2, 3), np.uint8), y_test=np.zeros(1))
    with pytest.raises(ConfigError, match="never unpickles"):
        load_dataset(str(tmp_path / "p.npz"))


def test_not_an_npz_file(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"hello")
    with pytest.raises(ConfigError, match="not a readable"):
        load_dataset(str(tmp_path / "junk.npz"))


def test_missing_dataset_offline_is_a_clear_fast_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BDFT_DATA_DIR", str(tmp_path))
    t = time.perf_counter()
    with pytest.raises(DatasetNotFound, match=r"svhn\.npz.*BDFT_DATA_DIR"):
        load_dataset("svhn", download=False)
    monkeypatch.setenv("BDFT_OFFLINE", "1")
    with pytest.raises(DatasetNotFound, match="BDFT_OFFLINE"):
        load_dataset("mnist")
    assert time.perf_counter() - t < 10


def test_missing_dataset_without_network_does_not_hang(tmp_path, monkeypatch):
    import bdft_core.data as data

    monkeypatch.delenv("BDFT_OFFLINE", raising=False)  # CI sets it; here we test the reachability check
    monkeypatch.setattr(data, "_host_reachable", lambda host: False)
    with pytest.raises(DatasetNotFound, match="cannot be reached"):
        load_dataset("gtsrb", root=tmp_path)


def test_unknown_dataset_name():
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("imagenet")


def _idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_from_raw_idx_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 6)):
        _idx(raw / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    d = load_dataset("fashion_mnist", root=tmp_path)
    assert d.x_train.shape == (12, 1, 28, 28) and d.classes[0] == "T-shirt/top" and d.y_test.tolist() == [0, 1, 2, 3, 4, 5]


def test_image_folder_split_and_resize(tmp_path):
    from PIL import Image

    for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (12, 9), colour).save(tmp_path / "imgs" / c / f"{i}.png")
    d = load_dataset(str(tmp_path / "imgs"), image_size=16)
    assert d.classes == ["cat", "dog"] and d.x_train.shape[1:] == (3, 16, 16)
    assert len(d.y_train) == 8 and len(d.y_test) == 2 and sorted(d.y_test.tolist()) == [0, 1]
    assert d.x_train[d.y_train == 0][:, 0].min() == 255


def test_splits_disjoint_nested_and_seeded():
    s = Splits(1000, seed=3)
    d5 = set(s.defender_indices(0.05).tolist())
    d50 = set(s.defender_indices(0.5).tolist())
    p = set(s.poison_indices(100).tolist())
    assert len(d5) == 50 and d5 <= d50 and not (d50 & p)
    assert Splits(1000, 3).poison_indices(10).tolist() == s.poison_indices(10).tolist()
    assert Splits(1000, 4).poison_indices(10).tolist() != s.poison_indices(10).tolist()
    assert len(s.defender_indices(0.005)) == 5 and len(s.defender_indices(1.0)) == 1000
    for bad in (0, 0.001, 1.5):
        with pytest.raises(ConfigError, match="clean fraction"):
            s.defender_indices(bad)


def test_augment_flip_and_translate_are_exact_shifts():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).reshape(2, 1, 6, 6)
    g = torch.Generator().manual_seed(0)
    seen_flip = seen_keep = False
    for _ in range(20):
        out = augment(x, flip=True, translate=0, generator=g)
        for i in range(2):
            assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2))
            seen_flip |= torch.equal(out[i], x[i].flip(2))
            seen_keep |= torch.equal(out[i], x[i])
    assert seen_flip and seen_keep
    out = augment(x.float(), flip=False, translate=1, generator=g)
    pad = torch.nn.functional.pad(x.float(), (1, 1, 1, 1), mode="reflect")
    for i in range(2):  # each output is one of the 9 crops of the reflect-padded image
        crops = [pad[i, :, dy:dy + 6, dx:dx + 6] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], c) for c in crops)
    assert augment(x, translate=2, generator=g).dtype == torch.uint8


def _npz(path, **over):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8), y_train=np.arange(6) % 2,
                  x_test=rng.integers(0, 256, (4, 4, 4, 3), dtype=np.uint8), y_test=np.arange(4) % 2)
    arrays.update(over)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


def test_npz_labels_without_classes_are_bounded(tmp_path):
    y = np.arange(6) % 2
    y[3] = 2 ** 40  # would otherwise build a list of 2**40 class names
    t = time.perf_counter()
    with pytest.raises(ConfigError, match="largest label is 1099511627776"):
        load_dataset(_npz(tmp_path / "huge.npz", y_train=y))
    assert time.perf_counter() - t < 5
    with pytest.raises(ConfigError, match=r"labels must lie in 0\.\.1, found 0\.\.1099511627776"):
        load_dataset(_npz(tmp_path / "huge_cls.npz", y_train=y, classes=np.array(["a", "b"])))
    with pytest.raises(ConfigError, match=r"labels must lie in 0\.\.1, found 0\.\.2"):
        load_dataset(_npz(tmp_path / "short.npz", y_test=np.array([0, 1, 2, 1]), classes=np.array(["a", "b"])))
    d = load_dataset(_npz(tmp_path / "ok.npz", y_train=np.array([0, 1, 2, 3, 0, 1], np.uint8)))
    assert d.classes == ["0", "1", "2", "3"] and d.y_train.dtype == torch.int64


def test_npz_stray_label_without_classes_is_refused(tmp_path):
    y = np.arange(6) % 2
    y[4] = 255  # a stray byte among 0..1: not a 256-class dataset
    with pytest.raises(ConfigError, match=r"largest label is 255 and 253 of 0\.\.255 never occur \(2, 3, 4, 5, 6, \.\.\.\)"):
        load_dataset(_npz(tmp_path / "stray.npz", y_train=y))
    # the same labels with a classes array naming all 256 are the user's stated intent
    d = load_dataset(_npz(tmp_path / "named.npz", y_train=y, classes=np.array([f"c{i}" for i in range(256)])))
    assert d.num_classes == 256
    # a class seen only in the test split still counts as present
    d = load_dataset(_npz(tmp_path / "test_only.npz", y_test=np.array([0, 1, 2, 1])))
    assert d.classes == ["0", "1", "2"]


def test_npz_labels_must_be_integers(tmp_path):
    with pytest.raises(ConfigError, match="y_train must hold integer class labels, got float32"):
        load_dataset(_npz(tmp_path / "f.npz", y_train=(np.arange(6) % 2 + 0.7).astype(np.float32)))
    with pytest.raises(ConfigError, match="y_test must hold integer class labels, got <U1"):
        load_dataset(_npz(tmp_path / "s.npz", y_test=np.array(list("0101"))))
    d = load_dataset(_npz(tmp_path / "b.npz", y_train=np.arange(6) % 2 == 1, y_test=np.arange(4) % 2 == 1))
    assert d.y_train.tolist() == [0, 1, 0, 1, 0, 1] and d.num_classes == 2


def test_broken_npz_files_give_one_clear_message(tmp_path):
    _npz(tmp_path / "good.npz")
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04garbage")
    (tmp_path / "text.npz").write_text("hello, not an archive")
    np.save(tmp_path / "single.npy", np.zeros((2, 4, 4, 3), np.uint8))
    (tmp_path / "single.npz").write_bytes((tmp_path / "single.npy").read_bytes())
    for bad in ("trunc", "garbage", "text", "single"):
        with pytest.raises(ConfigError, match=r"is not a valid \.npz \(zip\) archive"):
            load_dataset(str(tmp_path / f"{bad}.npz"))
    with pytest.raises(ConfigError, match="lacks x_test, y_test") as exc:
        load_dataset(_npz(tmp_path / "miss.npz", x_test=None, y_test=None))
    assert "unpickles" not in str(exc.value)
    with pytest.raises(ConfigError, match="has no training images"):
        load_dataset(_npz(tmp_path / "e.npz", x_train=np.zeros((0, 4, 4, 3), np.uint8), y_train=np.zeros(0, int)))
    with pytest.raises(ConfigError, match="has no test images"):
        load_dataset(_npz(tmp_path / "e2.npz", x_test=np.zeros((0, 4, 4, 3), np.uint8), y_test=np.zeros(0, int)))
    with pytest.raises(ConfigError, match="classes must be a 1-D array"):
        load_dataset(_npz(tmp_path / "c0.npz", classes=np.array("a")))


def _png_folder(root, classes, n=3, colour=(0, 128, 255)):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (5, 5), colour).save(root / c / f"{i}.png")


def test_image_folder_skips_hidden_and_refuses_empty_or_mismatched_classes(tmp_path):
    root = tmp_path / "imgs"
    _png_folder(root, ["cat", "dog", ".ipynb_checkpoints", "__MACOSX"])
    (root / ".git").mkdir()
    (root / "cat" / "._0.png").write_bytes(b"\0\5\x16\7AppleDouble")  # macOS resource fork: not an image
    d = load_dataset(str(root), image_size=8)
    assert d.classes == ["cat", "dog"] and sorted(d.y_train.tolist() + d.y_test.tolist()) == [0] * 3 + [1] * 3
    (root / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"class folder .*empty holds no images"):
        load_dataset(str(root), image_size=8)
    tt = tmp_path / "tt"
    _png_folder(tt / "train", ["a", "b", "c"])
    _png_folder(tt / "test", ["a", "b", "z"])
    with pytest.raises(ConfigError, match=r"same class folders \(only in train/: c; only in test/: z\)"):
        load_dataset(str(tt), image_size=8)


def test_image_folder_scales_16_bit_and_float_images(tmp_path):
    from PIL import Image

    cases = {"g16": (np.full((6, 6), 30000, np.uint16), "png", 117),  # mode I;16: 30000 / 257
             "i32": (np.full((6, 6), 65535, np.int32), "tif", 255),  # mode I, taken as 16-bit
             "f01": (np.full((6, 6), 0.5, np.float32), "tif", 128),  # mode F in 0..1
             "f255": (np.full((6, 6), 100.0, np.float32), "tif", 100)}  # mode F in 0..255
    for name, (arr, ext, _) in cases.items():
        for c in ("a", "b"):
            (tmp_path / name / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(arr).save(tmp_path / name / c / f"{i}.{ext}")
    assert Image.open(tmp_path / "g16" / "a" / "0.png").mode == "I;16"
    for name, (_, _, want) in cases.items():
        d = load_dataset(str(tmp_path / name), image_size=4)
        assert d.x_train.unique().tolist() == [want], name


def _idx_raw(tmp_path, n_train=12, train_labels=None):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _idx(raw / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    _idx(raw / "train-labels-idx1-ubyte.gz", np.arange(12) % 10 if train_labels is None else np.asarray(train_labels))
    _idx(raw / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (4, 28, 28)))
    _idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(4))


def test_raw_idx_labels_are_checked(tmp_path):
    _idx_raw(tmp_path / "n", n_train=13)
    with pytest.raises(ConfigError, match="holds 13 images but train-labels-idx1-ubyte holds 12 labels"):
        load_dataset("mnist", root=tmp_path / "n")
    _idx_raw(tmp_path / "r", train_labels=[0] * 11 + [200])
    with pytest.raises(ConfigError, match=r"has label 200: labels must lie in 0\.\.9"):
        load_dataset("mnist", root=tmp_path / "r")


def test_augment_translate_must_be_smaller_than_the_image():
    x = torch.zeros(2, 1, 8, 6)
    assert augment(x, translate=5).shape == x.shape
    with pytest.raises(ConfigError, match=r"translate=6 pixels must be smaller than the image side \(8x6\)"):
        augment(x, translate=6)


def test_an_npz_member_claiming_terabytes_and_a_huge_folder_image_get_clear_errors(tmp_path):
    import io
    import zipfile

    from PIL import Image

    def npy(a):
        b = io.BytesIO()
        np.save(b, a)
        return b.getvalue()
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": (10 ** 13,)})
    x, y = np.zeros((20, 8, 8), np.uint8), np.arange(20) % 2
    with zipfile.ZipFile(tmp_path / "big.npz", "w") as z:
        z.writestr("x_train.npy", head.getvalue() + b"\0" * 4)
        for k, v in (("y_train", y), ("x_test", x), ("y_test", y)):
            z.writestr(f"{k}.npy", npy(v))
    with pytest.raises(ConfigError, match="claims more memory than this machine has"):
        load_dataset(str(tmp_path / "big.npz"))
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / c / "small.png")
    Image.new("1", (5000, 4000)).save(tmp_path / "imgs" / "b" / "huge.png")  # 20 MP, a few kB on disk
    with pytest.raises(ConfigError, match=r"huge.png is 5000x4000 pixels, more than the 16 million"):
        load_dataset(str(tmp_path / "imgs"))
