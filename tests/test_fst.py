"""FST: the head is re-initialised, pushed away from the poisoned head, and kept at its norm.
(On a real poisoned model: tests/test_e2e_baselines.py.)"""
import pytest
import torch

from bdft_core.defenses import build_defense
from bdft_core.errors import ConfigError


def test_head_moves_away_and_keeps_its_norm():
    from bdft_core.data import load_dataset
    from bdft_core.models import build_model

    torch.manual_seed(0)
    d = load_dataset("digits")
    m = build_model("fastnet", 10, 1, widths=[8, 8, 8])
    m.fit_data(d.x_train)
    w0 = m.classifier.weight.detach().clone()
    build_defense("fst", alpha=1.0, epochs=1.0, min_steps=20).apply(m, d.x_train[:400], d.y_train[:400])
    w = m.classifier.weight.detach()
    cos = torch.nn.functional.cosine_similarity(w.flatten(), w0.flatten(), dim=0)
    assert cos < 0  # pushed to the opposite side of the old head
    assert w.norm() <= w0.norm() * (1 + 1e-5)


def test_bad_alpha():
    with pytest.raises(ConfigError, match="alpha"):
        build_defense("fst", alpha=-1)
