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
    # the norm is held at the old head's, not merely below it (the fresh head starts far smaller)
    assert w.norm() == pytest.approx(w0.norm().item(), rel=1e-5)


def test_a_small_new_head_is_scaled_up_to_the_old_norm():
    """Held at ||W_0|| as an equality: a fresh head that a few small steps leave far below it is
    scaled up (a clip from above only would leave it small)."""
    from bdft_core.models import build_model

    torch.manual_seed(0)
    m = build_model("fastnet", 10, 1, widths=[8, 8, 8])
    x = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    m.fit_data(x)
    with torch.no_grad():
        m.classifier.weight.mul_(50.0)  # a poisoned head far larger than a fresh one
    norm0 = m.classifier.weight.norm().item()
    build_defense("fst", alpha=0.0, lr=1e-4, epochs=1.0, min_steps=1, batch_size=64).apply(m, x, torch.arange(64) % 10)
    assert m.classifier.weight.norm().item() == pytest.approx(norm0, rel=1e-5)


def test_bad_alpha():
    with pytest.raises(ConfigError, match="alpha"):
        build_defense("fst", alpha=-1)
