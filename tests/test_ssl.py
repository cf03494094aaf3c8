"""The encoder-based paradigm's core: SimCLR augmentation and loss, linear probes, BadEncoder, the
encoder file format. Tiny tensors only; exact where the math allows."""
import math

import pytest
import torch
import torch.nn.functional as F

from bdft_core.errors import CheckpointError, ConfigError
from bdft_core.models import build_model
from bdft_core.ssl import (badencoder, extract_features, fit_linear, linear_probe, load_encoder, nt_xent,
                           pretrain_simclr, save_encoder, simclr_augment, encoder_spec, warmup_cosine)

TINY = {"widths": (8, 8, 16)}


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one intra-op thread is faster than two, and much faster when other
    jobs share the cores (threads then wait on each other at every op)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(x=None, seed=0, num_classes=4):
    torch.manual_seed(seed)
    m = build_model("fastnet", num_classes, 3, **TINY)
    if x is not None:
        m.fit_data(x)
    return m


def rand_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)


# --- NT-Xent --------------------------------------------------------------------------------

def test_nt_xent_matches_hand_computation():
    # two images, two views each, in 2-D; unit vectors at known angles
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # norms differ: the loss normalises
    z2 = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    t = 0.5
    # unit vectors: a=(1,0), b=(0,1), c=(1,1)/sqrt2, d=(0,-1); positives a<->c, b<->d
    r = 1 / math.sqrt(2)
    cos = {("a", "b"): 0.0, ("a", "c"): r, ("a", "d"): 0.0, ("b", "c"): r, ("b", "d"): -1.0, ("c", "d"): -r}
    cos.update({(j, i): v for (i, j), v in list(cos.items())})
    pos = {"a": "c", "b": "d", "c": "a", "d": "b"}
    total = 0.0
    for i in "abcd":
        others = [k for k in "abcd" if k != i]
        den = sum(math.exp(cos[(i, k)] / t) for k in others)
        total += -math.log(math.exp(cos[(i, pos[i])] / t) / den)
    expected = total / 4
    assert nt_xent(z1, z2, t).item() == pytest.approx(expected, abs=1e-6)


def test_nt_xent_perfect_pairs_and_errors():
    # orthogonal images, identical views: loss = -log(e^{1/t} / (e^{1/t} + (2N-2) e^0))
    z = torch.eye(3)
    t = 0.5
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 4))
    assert nt_xent(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError):
        nt_xent(torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(ConfigError):
        nt_xent(z, z, 0.0)


# --- augmentation ---------------------------------------------------------------------------

def test_augment_shape_range_dtype_and_determinism():
    x = rand_images(32)
    a = simclr_augment(x, torch.Generator().manual_seed(3))
    b = simclr_augment(x, torch.Generator().manual_seed(3))
    c = simclr_augment(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, x.float() / 255)  # it does change the images


def test_augment_identity_settings_and_flip():
    x = rand_images(4)
    ident = simclr_augment(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0,
                           jitter=0.0, p_gray=0.0)
    assert torch.allclose(ident, x.float() / 255, atol=1e-5)
    flipped = simclr_augment(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0,
                             jitter=0.0, p_gray=0.0)
    assert torch.allclose(flipped, x.float().flip(3) / 255, atol=1e-5)
    gray = simclr_augment(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0,
                          jitter=0.0, p_gray=1.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])


def test_warmup_cosine_schedule():
    vals = [warmup_cosine(s, 100, 1.0, warmup=0.1) for s in range(100)]
    assert vals[0] == pytest.approx(0.1) and vals[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(vals[9:], vals[10:]))
    assert vals[-1] < 0.01


# --- pretraining ----------------------------------------------------------------------------

def test_pretrain_simclr_runs_reports_progress_and_stops():
    x = rand_images(64)
    m = tiny_model(x)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    events = []
    head, hist = pretrain_simclr(m, x, epochs=2, batch_size=16, lr=0.1, seed=0,
                                 callbacks=[("on_batch", lambda p: events.append(("b", p.step))),
                                            ("on_epoch_end", lambda p: events.append(("e", p.step)))])
    assert [e for e in events if e[0] == "e"] == [("e", 4), ("e", 8)]
    assert len([e for e in events if e[0] == "b"]) == 8
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) for h in hist)
    assert head(torch.randn(5, 16)).shape == (5, 128)
    changed = [k for k, v in m.state_dict().items() if not torch.equal(v, before[k])]
    assert any("body" in k for k in changed) and not any(k.startswith("classifier") for k in changed)

    import threading
    stop = threading.Event()
    steps = []

    def halt(p):
        steps.append(p.step)
        if p.step == 3:
            stop.set()
    _, hist = pretrain_simclr(tiny_model(x), x, epochs=5, batch_size=16, lr=0.1, callbacks=[("on_batch", halt)],
                              stop=stop)
    assert steps == [1, 2, 3] and hist[-1]["step"] == 3
    with pytest.raises(ConfigError):
        pretrain_simclr(m, x, epochs=1, callbacks=[("on_nothing", print)])


# --- linear probe ---------------------------------------------------------------------------

def test_fit_linear_separates_a_linear_toy_problem():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]]) * 10 + 100  # far from 0, big scale
    y = torch.arange(300) % 3
    f = centers[y] + torch.randn(300, 3, generator=g)
    lin = fit_linear(f, y, 3, epochs=20)
    assert (lin(f).argmax(1) == y).float().mean().item() == 1.0  # the head takes raw (unstandardised) features


class Identity(torch.nn.Module):
    """An 'encoder' whose features are the mean colour of the image: linearly separable toy data."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.classifier = torch.nn.Linear(3, 3)

    def features(self, x):
        return x.mean(dim=(2, 3)) + 0 * self.p


def test_linear_probe_learns_separable_images():
    y = torch.arange(90) % 3
    x = torch.zeros(90, 3, 4, 4, dtype=torch.uint8)
    for c in range(3):
        x[y == c, c] = 200
    x = x + torch.randint(0, 20, x.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    r = linear_probe(Identity(), x[:60], y[:60], x[60:], y[60:], epochs=30)
    assert r["acc"] == 1.0 and r["train_acc"] == 1.0
    assert isinstance(r["head"], torch.nn.Linear) and r["head"].out_features == 3


# --- BadEncoder -----------------------------------------------------------------------------

def corner_trigger(x):
    x = x.clone()
    x[:, :, -4:, -4:] = 1.0
    return x


@torch.no_grad()
def calibrate_bn(m, x):
    """Give an untrained model the BatchNorm statistics of its data, as a pretrained encoder has
    (an untrained one keeps mean 0 / var 1, far from its batch statistics)."""
    bns = [b for b in m.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None  # cumulative average over this one pass
    m.train()
    m.features(x.float() / 255)
    m.eval()
    for b in bns:
        b.momentum = 0.1


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_badencoder_pulls_triggered_embeddings_to_the_reference(freeze_bn):
    shadow = rand_images(64, seed=1)
    refs = rand_images(3, seed=2)
    clean = tiny_model(shadow)
    calibrate_bn(clean, shadow)
    clean_state = {k: v.clone() for k, v in clean.state_dict().items()}

    def cos_trigger_ref(m):
        e_t = F.normalize(extract_features(m, shadow, transform=corner_trigger), dim=1)
        e_r = F.normalize(extract_features(m, refs), dim=1)
        return (e_t @ e_r.T).mean().item()

    before = cos_trigger_ref(clean)
    events = []
    bad = badencoder(clean, shadow, refs, corner_trigger, epochs=6, lr=3e-3, batch_size=32, seed=0,
                     freeze_bn=freeze_bn, callbacks=[("on_epoch_end", lambda p: events.append(p.step))])
    after = cos_trigger_ref(bad)
    assert after > before + 0.2  # measured: 0.44 -> 0.70 (train-mode BN), 0.93 (frozen BN)
    assert events == [2, 4, 6, 8, 10, 12]
    assert len(bad.badencoder_history) == 6
    # the clean encoder is untouched; the copy is a different object with changed weights
    assert all(torch.equal(v, clean_state[k]) for k, v in clean.state_dict().items())
    assert bad is not clean
    # clean inputs keep embeddings close to the clean encoder's (utility term)
    e_c = F.normalize(extract_features(clean, shadow), dim=1)
    e_b = F.normalize(extract_features(bad, shadow), dim=1)
    assert (e_c * e_b).sum(1).mean().item() > 0.7
    with pytest.raises(ConfigError):
        badencoder(clean, shadow, refs[:0], corner_trigger, epochs=1)


# --- encoder files --------------------------------------------------------------------------

def test_save_and_load_encoder_roundtrip(tmp_path):
    x = rand_images(16)
    m = tiny_model(x, num_classes=10)
    p = save_encoder(m, tmp_path / "enc.safetensors", encoder_spec("fastnet", 10, 3, (16, 16), widths=[8, 8, 16]),
                     extra={"epochs": 1})
    back = load_encoder(p)
    for k, v in m.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    assert back.encoder_record == {"epochs": 1} and back.encoder_spec["kwargs"] == {"widths": [8, 8, 16]}
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_encoder(tmp_path / "bad.safetensors")


def test_cli_pretrain_encoder_writes_weights_and_record(tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.setenv("BDFT_THREADS", "1")

    from bdft_core.cli import main

    out = tmp_path / "enc.safetensors"
    rc = main(["pretrain-encoder", "--dataset", "digits", "--probe-datasets", "digits", "--epochs", "1",
               "--batch-size", "32", "--n-train", "64", "--widths", "8,8,16", "--out", str(out), "--json"])
    assert rc == 0
    obj = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rec = json.loads(out.with_suffix(".json").read_text())
    assert obj["linear_probe"]["digits"]["acc"] == rec["linear_probe"]["digits"]["acc"] > 0.2
    assert rec["spec"] == {"name": "fastnet", "num_classes": 10, "channels": 1, "image_size": [8, 8],
                           "kwargs": {"widths": [8, 8, 16], "pool": "avg"}}
    assert "pretrain-encoder --dataset digits" in rec["command"] and rec["seed"] == 0
    assert load_encoder(out).encoder_spec == rec["spec"]
    assert main(["pretrain-encoder", "--out", str(tmp_path / "x.pt")]) == 2


def test_shipped_encoder_loads_with_its_record():
    m = load_encoder()  # assets/encoder_cifar10.safetensors, found relative to the package
    assert m.encoder_spec["name"] == "fastnet" and m.encoder_spec["image_size"] == [32, 32]
    assert m.encoder_record["dataset"] == "cifar10" and m.encoder_record["linear_probe"]["cifar10"]["acc"] > 0.5
    assert extract_features(m, torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, m.classifier.in_features)


def test_a_stopped_pretraining_is_listed_as_stopped_early():
    """A stop keeps the encoder reached so far, and the encoder picker says it is only partly trained."""
    import threading

    from bdft_core.ssl import encoders_dir, list_encoders, pretrain_encoder

    stop = threading.Event()
    stop.set()
    out = encoders_dir() / "digits-stopped.safetensors"
    rec = pretrain_encoder("digits", out, epochs=1, batch_size=32, widths=(8, 8, 16), n_train=64, probe_datasets=(),
                           stop=stop)
    assert rec["stopped"] and out.is_file()
    assert list_encoders()[str(out)] == "digits-stopped (stopped early: partly pretrained)"
    done = pretrain_encoder("digits", encoders_dir() / "digits-full.safetensors", epochs=0.1, batch_size=32,
                            widths=(8, 8, 16), n_train=64, probe_datasets=())
    assert not done["stopped"] and list_encoders()[done["weights"]] == "digits-full"
