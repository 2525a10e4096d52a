"""One-backward-pass per-sample clipping against clipping each example's own autograd gradient."""

import pytest
import torch
from fedshield.client.bookkeeping import (
    GRAD_SAMPLERS,
    BookKeepingClipper,
    BookKeepingDPOptimizer,
    conv2d_grad_sample,
    correlation_is_faster,
    grouped_conv_is_faster,
    linear_sq_norms,
    single_channel_conv_grad_sample,
    supports_bookkeeping,
)
from fedshield.tasks import get_task
from fedshield.tasks.models import MnistCNN, TanhCNN
from fedshield.tasks.scattering import ScatterCNN, ScatterLinear
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn


def clipped_sum_by_loop(model, x, y, c):
    """Reference: one autograd backward per example, clip, sum."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                    params,
                                    allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads,
                                                                         strict=True)]
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        factor = min(1.0, c / (float(norm) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    return total, params


def models():
    torch.manual_seed(0)
    digits = get_task("digits").build_model()
    # a Linear on (n, 3, 5) sequences takes Opacus' ghost-norm rule, not the rank-one shortcut
    sequence = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 10))
    return [(MnistCNN(), (1, 28, 28)), (TanhCNN(), (1, 28, 28)), (digits, (64,)),
            (ScatterLinear(), (81, 7, 7)), (ScatterCNN(), (81, 7, 7)), (sequence, (3, 5))]


@pytest.mark.parametrize("index", range(6))
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


GROUPED, CORRELATION = (grouped_conv_is_faster, conv2d_grad_sample), \
    (correlation_is_faster, single_channel_conv_grad_sample)


@pytest.mark.parametrize("rule, kwargs", [
    (GROUPED, dict(in_channels=16, out_channels=32, kernel_size=3, padding=1)),
    (GROUPED, dict(in_channels=16, out_channels=24, kernel_size=(3, 2), stride=2, padding=(1, 0),
                   bias=False)),
    (GROUPED, dict(in_channels=16, out_channels=16, kernel_size=3, dilation=2, groups=2)),
    (GROUPED, dict(in_channels=8, out_channels=8, kernel_size=1)),
    # TanhCNN
    (CORRELATION, dict(in_channels=1, out_channels=16, kernel_size=8, stride=2, padding=3)),
    (CORRELATION, dict(in_channels=1, out_channels=4, kernel_size=(3, 2), stride=(2, 3),
                       padding=(1, 0), bias=False)),
    (CORRELATION, dict(in_channels=1, out_channels=3, kernel_size=3, stride=2, dilation=2)),
    (CORRELATION, dict(in_channels=1, out_channels=5, kernel_size=4, stride=3, padding=2)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_our_conv_per_sample_gradients_equal_opacus_rule(rule, kwargs, dtype):
    """Each of our conv rules, in shapes where it is picked, against Opacus' unfold + bmm."""
    picks, grad_sample = rule
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs).to(dtype)
    a = torch.randn(5, kwargs["in_channels"], 13, 11, dtype=dtype)
    g = torch.randn_like(conv(a))
    assert picks(conv, g)
    assert grouped_conv_is_faster(conv, g) != correlation_is_faster(conv, g)  # never both
    ours = grad_sample(conv, a, g)
    theirs = GRAD_SAMPLERS[nn.Conv2d](conv, [a], g)
    assert set(ours) == set(theirs)
    for p in ours:
        torch.testing.assert_close(ours[p], theirs[p])


def test_grouped_conv_is_used_only_in_the_measured_shapes():
    g = torch.zeros(1)
    assert not grouped_conv_is_faster(nn.Conv2d(1, 32, 3), g)  # too few input channels
    assert not grouped_conv_is_faster(nn.Conv2d(64, 128, 3), g)  # too many output channels
    assert not grouped_conv_is_faster(nn.Conv2d(16, 16, 3, padding="same"), g)
    assert not grouped_conv_is_faster(nn.Conv2d(16, 16, 3, padding_mode="reflect"), g)
    assert not grouped_conv_is_faster(nn.Linear(16, 16), g)


def test_graph_starts_at_the_first_layer_and_in_place_ops_and_unused_layers_work():
    torch.manual_seed(1)
    unused = nn.Linear(3, 3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.act = nn.ReLU(inplace=True)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.ReLU(inplace=True),
                                      nn.Linear(5, 3))
            self.unused = unused

        def forward(self, x):
            return self.head(self.act(self.conv(x)))

    model = Net()
    seen = []
    model.act.register_forward_pre_hook(lambda _m, inp: seen.append(type(inp[0].grad_fn).__name__))
    x, y = torch.randn(7, 1, 6, 6), torch.randint(0, 3, (7,))
    expected, params = clipped_sum_by_loop(model, x, y, c=0.3)
    seen.clear()  # the reference's forward passes ran without the clipper
    clipper = BookKeepingClipper(model, max_grad_norm=0.3)
    clipper.backward(model, x, y)
    assert seen == ["CloneBackward0"]  # not ConvolutionBackward: no gradient for the input batch
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(unused.weight.grad) == 0


@pytest.mark.parametrize("frozen", ["", "weight", "bias"])
def test_linear_norms_count_only_trainable_parameters(frozen):
    torch.manual_seed(0)
    layer = nn.Linear(7, 3)
    if frozen:
        getattr(layer, frozen).requires_grad_(False)
    a, g = torch.randn(5, 7), torch.randn(5, 3)
    expected = torch.zeros(5)
    if frozen != "weight":
        expected += torch.einsum("ni,nj->nij", g, a).flatten(1).square().sum(1)
    if frozen != "bias":
        expected += g.square().sum(1)
    torch.testing.assert_close(linear_sq_norms(layer, a, g), expected)



def test_correlation_is_used_only_for_strided_single_channel_convs():
    g = torch.zeros(1)
    assert not correlation_is_faster(nn.Conv2d(1, 32, 3), g)  # stride 1: measured slower
    assert not correlation_is_faster(nn.Conv2d(3, 16, 3, stride=2), g)  # three input channels
    assert not correlation_is_faster(nn.Conv2d(1, 8, 3, stride=2, padding_mode="reflect"), g)
    assert not correlation_is_faster(nn.Linear(16, 16), g)


def test_bookkeeping_optimizer_keeps_opacus_noise_and_scaling():
    """The adopted optimizer steps exactly as Opacus' own would, without deep-copying grads."""
    results = []
    for adopt in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        opt = DPOptimizerFastGradientClipping(
            torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
            expected_batch_size=8, generator=torch.Generator().manual_seed(1))
        if adopt:
            opt = BookKeepingDPOptimizer.adopt(opt)
        clipper = BookKeepingClipper(model, 1.0)
        for _ in range(3):
            opt.zero_grad(set_to_none=adopt)
            clipper.backward(model, torch.randn(8, 4), torch.randint(0, 3, (8,)))
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="DPOptimizerFastGradientClipping"):
        BookKeepingDPOptimizer.adopt(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
