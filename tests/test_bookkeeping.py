"""One-backward-pass per-sample clipping against clipping each example's own autograd gradient."""

import pytest
import torch
from torch import nn

from client.bookkeeping import BookKeepingClipper, supports_bookkeeping
from tasks import get_task
from tasks.models import MnistCNN, TanhCNN


def clipped_sum_by_loop(model, x, y, c):
    """Reference: one autograd backward per example, clip, sum."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        factor = min(1.0, c / (float(norm) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    return total, params


def models():
    torch.manual_seed(0)
    digits = get_task("digits").build_model()
    return [(MnistCNN(), (1, 28, 28)), (TanhCNN(), (1, 28, 28)), (digits, (64,))]


@pytest.mark.parametrize("index", range(3))
def test_clipped_sum_matches_per_example_autograd(index):
    model, shape = models()[index]
    gen = torch.Generator().manual_seed(index)
    x, y = torch.randn(12, *shape, generator=gen), torch.randint(0, 10, (12,), generator=gen)
    expected, params = clipped_sum_by_loop(model, x, y, c=0.5)
    clipper = BookKeepingClipper(model, max_grad_norm=0.5)
    losses = clipper.backward(model, x, y)
    clipper.remove()
    assert losses.shape == (12,)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
        assert p.requires_grad  # unfrozen again


def test_a_large_bound_gives_the_plain_summed_gradient():
    model, _ = models()[0]
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    plain = torch.autograd.grad(nn.functional.cross_entropy(model(x), y, reduction="sum"),
                                list(model.parameters()))
    clipper = BookKeepingClipper(model, max_grad_norm=1e9)
    clipper.backward(model, x, y)
    for p, g in zip(model.parameters(), plain, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    assert not clipper.saved  # nothing kept between steps


def test_empty_batch_gives_zero_gradients():
    model, _ = models()[2]
    clipper = BookKeepingClipper(model, 1.0)
    clipper.backward(model, torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_layers_without_a_rule_and_shared_layers_are_refused():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.w

    odd = nn.Sequential(nn.Linear(4, 4), Scale())
    assert not supports_bookkeeping(odd)
    with pytest.raises(ValueError, match="no per-sample gradient rule for Scale.*hooks"):
        BookKeepingClipper(odd, 1.0)
    shared = nn.Linear(4, 4)
    twice = nn.Sequential(shared, nn.Tanh(), shared)
    clipper = BookKeepingClipper(twice, 1.0)
    with pytest.raises(ValueError, match="runs twice"):
        clipper.backward(twice, torch.randn(3, 4), torch.tensor([0, 1, 2]))
