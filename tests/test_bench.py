"""The benchmark's conventional pipeline poisons the same images the same way as ours (so the
throughput comparison is like for like), for colour and grayscale data."""
import os
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from throughput import PoisonedImages  # noqa: E402

from bdft_core.attacks import build_attack  # noqa: E402


@pytest.mark.parametrize("channels", [1, 3])
def test_per_image_poisoning_matches_the_batched_attack(channels):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, channels, 8, 8), dtype=torch.uint8, generator=g)
    y = np.array([1, 2, 3, 4])
    attack = build_attack("badnets", (channels, 8, 8), 10, size=2, target=0)
    ds = PoisonedImages(x.permute(0, 2, 3, 1).numpy(), y, attack, {1, 3}, T.ToTensor())
    want = (attack.apply(x.float() / 255) * 255).round() / 255  # the attack on the whole batch at once
    for i in range(4):
        img, label = ds[i]
        assert img.shape == (channels, 8, 8)
        if i in (1, 3):
            assert label == 0 and torch.allclose(img, want[i], atol=1e-6)
        else:
            assert label == y[i] and torch.allclose(img, x[i].float() / 255, atol=1e-6)
        assert not torch.allclose(want[i], x[i].float() / 255)  # the patch changed the image
