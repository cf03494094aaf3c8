"""Activation Clustering: k-means, the silhouette score and the reduction on hand-built data, the
flagging rule, its errors; and, on the real poisoned CIFAR-10 model, the detection of both data
cleansers (Spectral Signatures on the target class's features, Activation Clustering on the whole
training set) and one retraining, Activation Clustering's, through run_defense."""
import time

import pytest
import torch

from bdft_core.defenses.activation_clustering import ActivationClustering, kmeans, reduce_dims, silhouette
from bdft_core.errors import ConfigError


def _blobs(n_a, n_b, dim=2, gap=10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_a, dim, generator=g)
    b = torch.randn(n_b, dim, generator=g) + gap
    return torch.cat([a, b])


def test_kmeans_separates_two_blobs():
    x = _blobs(30, 10)
    labels, centres, inertia = kmeans(x, 2, seed=0)
    assert len(torch.unique(labels[:30])) == 1 and len(torch.unique(labels[30:])) == 1
    assert labels[0] != labels[30]
    a, b = int(labels[0]), int(labels[30])
    assert torch.allclose(centres[a], x[:30].double().mean(0)) and torch.allclose(centres[b], x[30:].double().mean(0))
    within = ((x[:30] - x[:30].mean(0)) ** 2).sum() + ((x[30:] - x[30:].mean(0)) ** 2).sum()
    assert inertia == pytest.approx(float(within), rel=1e-5)
    assert torch.equal(kmeans(x, 2, seed=0)[0], labels)  # seeded: the same answer twice
    with pytest.raises(ConfigError, match="at least k"):
        kmeans(x[:1], 2)


def test_silhouette_by_hand():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # a = 1 for every point; b = 10.5, 9.5, 9.5, 10.5
    expect = (9.5 / 10.5 + 8.5 / 9.5) / 2
    assert silhouette(x, labels) == pytest.approx(expect, rel=1e-12)
    assert silhouette(x, torch.zeros(4, dtype=torch.long)) == 0.0
    # a point alone in its cluster counts 0
    assert silhouette(torch.tensor([[0.0], [1.0], [5.0]]), torch.tensor([0, 0, 1])) == pytest.approx(
        (1 - 1 / 5 + 1 - 1 / 4) / 3, rel=1e-12)


def test_reduce_dims_keeps_the_top_directions_and_whitens():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(200, 16, generator=g) * torch.linspace(0.1, 3.0, 16)
    z = reduce_dims(f, 10, whiten=True)
    assert z.shape == (200, 10)
    assert torch.allclose(z.std(0), torch.ones(10, dtype=torch.float64), atol=1e-6)
    z2 = reduce_dims(f, 10, whiten=False)
    assert bool((z2.var(0)[:-1] >= z2.var(0)[1:] - 1e-9).all())  # variance-ordered
    assert reduce_dims(f[:, :3], 10).shape == (200, 3)


def _classes(poison_share=0.2, n=200, dim=16, seed=0):
    """Class 0: a Gaussian blob plus ``poison_share`` of it in a far-away blob; class 1: a blob."""
    g = torch.Generator().manual_seed(seed)
    k = int(poison_share * n)
    c0 = torch.randn(n, dim, generator=g)
    c0[:k] += 12.0 * torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    c1 = torch.randn(n, dim, generator=g) + 3.0
    return torch.cat([c0, c1]), torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)]), k


def test_the_small_separated_cluster_is_flagged_and_nothing_else():
    feats, labels, k = _classes(0.2)
    ac = ActivationClustering()
    flagged, extra = ac.detect(feats, labels, seed=0)
    assert flagged.sort().values.tolist() == list(range(k)) and extra["classes_flagged"] == 1
    assert extra["silhouette_max"] == ac.report[0]["silhouette"]
    assert ac.last_artefacts["class_flagged"].tolist() == [True, False]
    assert ac.report[0]["flagged"] and not ac.report[1]["flagged"]
    assert ac.report[0]["size"] == pytest.approx(0.2) and ac.report[0]["silhouette"] > 0.6
    assert ac.report[1]["silhouette"] < 0.4  # one blob cut in two fits badly


def test_the_size_rule_decides_about_large_poisoned_clusters():
    feats, labels, k = _classes(0.45)
    assert ActivationClustering().detect(feats, labels, 0)[0].sort().values.tolist() == list(range(k))
    assert len(ActivationClustering(size_threshold=0.35).detect(feats, labels, 0)[0]) == 0  # the paper's 0.35


def test_bad_settings_and_missing_poisoned_set():
    with pytest.raises(ConfigError, match="poisoned training set"):
        ActivationClustering().apply(torch.nn.Linear(2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.uint8),
                                     torch.zeros(1, dtype=torch.long))
    for bad, match in [({"size_threshold": 0.7}, "size_threshold"), ({"size_threshold": 0}, "size_threshold"),
                       ({"silhouette_threshold": 2}, "silhouette_threshold"), ({"n_components": 0}, "n_components"),
                       ({"n_components": 2.5}, "n_components"), ({"n_init": 0}, "n_init"),
                       ({"silhouette_samples": 3}, "silhouette_samples"), ({"whiten": "yes"}, "whiten")]:
        with pytest.raises(ConfigError, match=match):
            ActivationClustering(**bad)


def test_cleansers_on_a_real_poisoned_model(cifar_badnets, monkeypatch):
    """Detection of both cleansers on the demo's BadNets model (10% of CIFAR-10 relabelled to class 0,
    i.e. half of the target class), then AC's retraining through run_defense."""
    from bdft_core.defenses import DEFENSES
    from bdft_core.defenses.spectral_signatures import SpectralSignatures, penultimate_features
    from bdft_core.pipeline import attack_config_of, poisoned_training, prepare, run_defense

    run, model = cifar_badnets
    assert run.final["asr"] > 0.9
    s = prepare(attack_config_of(run))
    p = poisoned_training(run, attack_config_of(run), s)
    t0 = time.perf_counter()
    # Spectral Signatures only ever flags within a class; the poison is all in the target class, so
    # scoring that class alone gives the whole-set detection numbers at a fifth of the cost
    in0 = (p.y == 0).nonzero().squeeze(1)
    feats0 = penultimate_features(model, p.x[in0])
    ss = SpectralSignatures()
    flagged0, _ = ss.detect(feats0, p.y[in0], seed=0)
    det_ss = p.detection_scores(in0.cpu()[flagged0])
    print(f"spectral signatures on the target class: {det_ss} ({time.perf_counter() - t0:.1f} s)")
    # the top of the score is (nearly) all poison, but 1.5 * eps of the class is less than a third of it
    assert det_ss["n_flagged"] == ss.n_removed(len(in0)) and det_ss["precision"] > 0.9
    assert 0.2 < det_ss["recall"] < 0.35

    monkeypatch.setitem(DEFENSES, ActivationClustering.name, ActivationClustering)
    t0 = time.perf_counter()
    d_run, _ = run_defense(run, "activation_clustering", model=model, setting=s)
    f = d_run.final
    print(f"activation clustering: CA {run.final['clean_acc']:.3f} -> {f['clean_acc']:.3f}, ASR {run.final['asr']:.3f} "
          f"-> {f['asr']:.3f}, precision {f['precision']:.3f}, recall {f['recall']:.3f}, flagged {f['n_flagged']}, "
          f"detect {f['detect_s']:.1f} s, total {d_run.timings['total_s']:.1f} s ({time.perf_counter() - t0:.1f} s)")
    assert d_run.timings["total_s"] > 0 and d_run.defense["uses_poisoned_data"]
    assert f["classes_flagged"] == 1 and f["precision"] > 0.95 and f["recall"] > 0.8
    assert f["asr"] < 0.3  # the backdoor is gone with the removed cluster
    assert f["clean_acc"] > run.final["clean_acc"] - 0.1
