"""Local training pieces: the shift augmentation."""

import pytest
import torch
from fedshield.client.training import random_shift

from fedshield.errors import ConfigError
from tests.config_support import neutral_config


def test_each_image_moves_by_its_own_draw_within_max_pixels():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0  # one bright pixel in the middle
    shifted = random_shift(x.repeat(64, 1, 1, 1), 1.0, torch.Generator().manual_seed(0))
    assert shifted.shape == (64, 1, 9, 9)
    # Draws stay within one pixel; mass is conserved (bilinear weights sum to 1 away from the
    # border) and stays near the centre.
    assert torch.allclose(shifted.sum((1, 2, 3)), torch.ones(64), atol=1e-5)
    rows = torch.arange(9.0).view(1, 1, 9, 1)
    centre_row = (shifted * rows).sum((1, 2, 3))
    assert (centre_row - 4).abs().max() <= 1.0 + 1e-5
    assert centre_row.std() > 0.2  # each image gets its own draw


def test_a_full_draw_shifts_by_exactly_max_pixels(monkeypatch):
    x = torch.rand(1, 1, 8, 8)
    # A uniform draw of 1.0 means +max_pixels in x and y.
    monkeypatch.setattr(torch, "rand", lambda *shape, generator=None: torch.ones(*shape))
    shifted = random_shift(x, 1.0, torch.Generator())
    # +1 pixel in grid coordinates samples from the right/below: content moves left/up by one.
    assert torch.allclose(shifted[..., :-1, :-1], x[..., 1:, 1:], atol=1e-6)


def test_an_empty_batch_passes_through():
    empty = torch.zeros(0, 1, 28, 28)
    assert random_shift(empty, 2.0, torch.Generator()) is empty


def test_shift_refuses_flat_features():
    with pytest.raises(ValueError, match="needs image batches"):
        random_shift(torch.zeros(4, 64), 2.0, torch.Generator())


def test_augmenting_a_feature_task_is_refused_at_load():
    with pytest.raises(ConfigError, match="takes features, not pixels"):
        neutral_config({"task": {"name": "digits"}, "train": {"augment": "shift"}})
