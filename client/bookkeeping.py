"""Per-sample clipping in one backward pass ("book-keeping", Bu et al. 2023).

Opacus' ghost clipping runs two backward passes: one for the per-sample gradient norms, a second on
the loss reweighted by the clipping factors to get the clipped sum. Book-keeping keeps every layer's
input activations A and output gradients G from the single pass and forms the clipped sum from them:
for a Linear layer sum_i c_i G_i^T A_i is one GEMM on (c * G) and A; for other layers Opacus' own
per-sample gradient rule gives each g_i once, for its norm and for the weighted sum. During the
pass the parameters do not require grad, so autograd computes activation gradients only, never the
unclipped weight gradients that would be thrown away.

Per-layer math is Opacus' (its ghost-norm rule for Linear, its per-sample rules otherwise), except
for 2-d convolutions on CPU in the shapes where oneDNN's grouped weight-gradient kernel
(``conv2d_grad_sample``) or, for strided one-channel inputs, a forward correlation
(``single_channel_conv_grad_sample``) is faster than Opacus' unfold + bmm, and for the norms of
Linear layers on (n, features) inputs, which are two row reductions (``linear_sq_norms``). Noise,
scaling and accounting are Opacus': the clipped sum goes to ``p.grad`` for Opacus'
DPOptimizerFastGradientClipping (``BookKeepingDPOptimizer`` only drops its gradient deepcopy),
exactly what its ghost mode leaves there.

Output gradients are caught by tensor hooks on each layer's output. A layer whose output needs no
gradient (the first one: the data needs none and the weights are frozen) starts the backward graph
at its output, so autograd never computes a gradient for the input batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import cast

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
)
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn

GRAD_SAMPLERS = GradSampleModule.GRAD_SAMPLERS
LINEAR_NORM = GradSampleHooksFastGradientClipping.NORM_SAMPLERS[nn.Linear]


def trainable_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that hold trainable parameters of their own."""
    return [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def supports_bookkeeping(model: nn.Module) -> bool:
    """Whether Opacus has a per-layer rule for every layer with trainable parameters."""
    return all(type(m) is nn.Linear or type(m) in GRAD_SAMPLERS for m in trainable_layers(model))


def linear_sq_norms(layer: nn.Linear, activations: torch.Tensor,
                    backprops: torch.Tensor) -> torch.Tensor:
    """(n,) per-sample squared gradient norms of a Linear layer's trainable parameters.

    With (n, features) inputs example i's weight gradient g_i a_i^T has rank one, so its squared
    norm is ||g_i||^2 ||a_i||^2: two row reductions. Opacus' einsum form of the same took ~10x
    longer on CPU (1.2 ms vs 0.1 ms for 64 x 3969 inputs), the largest DP cost of small models.
    Inputs with more dimensions (sequences) use Opacus' ghost-norm rule.
    """
    if backprops.dim() != 2:
        per_param = LINEAR_NORM(layer, [activations], backprops).values()
        return sum(v.float().square() for v in per_param)
    g_sq = torch.linalg.vector_norm(backprops.float(), dim=1).square()
    out = torch.zeros_like(g_sq)
    if layer.weight.requires_grad:
        out += g_sq * torch.linalg.vector_norm(activations.float(), dim=1).square()
    if layer.bias is not None and layer.bias.requires_grad:
        out += g_sq
    return out


def grouped_conv_is_faster(layer: nn.Module, backprops: torch.Tensor) -> bool:
    """Whether ``conv2d_grad_sample`` beats Opacus' unfold + bmm for this layer.

    Measured on CPU (2 cores, batch 64, 13 shapes from 1->32 to 128->128 channels, 7x7 to 32x32):
    oneDNN's grouped kernel is up to 3.5x faster with >= 8 input and <= 64 output channels per
    group, and up to 4x slower outside that range (few input channels, or 128 output channels).
    """
    if type(layer) is not nn.Conv2d or backprops.device.type != "cpu":
        return False
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return False
    return layer.in_channels // layer.groups >= 8 and layer.out_channels // layer.groups <= 64


def conv2d_grad_sample(layer: nn.Conv2d, activations: torch.Tensor,
                       backprops: torch.Tensor) -> dict:
    """Per-sample gradients of a Conv2d as one weight-gradient call with the batch as groups.

    Example i's gradient is the weight gradient of group i in a convolution whose input and output
    channels are the whole batch's, laid side by side (no unfolded copy of the input).
    """
    n, groups = len(activations), layer.groups * len(activations)
    out_channels = layer.out_channels
    weight = layer.weight.detach()
    # Only the weight's shape enters a weight gradient (output_mask asks for nothing else), so
    # the stacked weight is left uninitialised rather than filled with n copies of the layer's.
    stacked = weight.new_empty(n * out_channels, *weight.shape[1:])
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        backprops.reshape(1, n * out_channels, *backprops.shape[2:]),
        activations.to(backprops.dtype).reshape(1, n * layer.in_channels, *activations.shape[2:]),
        stacked, None, list(layer.stride), list(layer.padding), list(layer.dilation), False,
        [0, 0], groups, [False, True, False])
    out = {layer.weight: grad_weight.view(n, *weight.shape)} if layer.weight.requires_grad else {}
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out


def correlation_is_faster(layer: nn.Module, backprops: torch.Tensor) -> bool:
    """Whether ``single_channel_conv_grad_sample`` beats Opacus' unfold + bmm for this layer.

    Measured on CPU (2 cores) for TanhCNN's first layer (1 -> 16 channels, 8x8 kernel, stride 2 on
    28x28): 1.17 vs 1.36 ms at batch 64, 0.63 vs 0.99 ms at 48, 13.8 vs 39 ms at 1024 (Opacus'
    unfolded copy is 16x the image there). With stride 1 (3x3, 5x5 kernels) it was 15-25% slower.
    """
    if type(layer) is not nn.Conv2d or backprops.device.type != "cpu":
        return False
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return False
    return layer.in_channels == 1 and layer.groups == 1 and max(layer.stride) >= 2


def single_channel_conv_grad_sample(layer: nn.Conv2d, activations: torch.Tensor,
                                    backprops: torch.Tensor) -> dict:
    """Per-sample gradients of a one-input-channel Conv2d as one forward convolution.

    Example i's gradient at kernel offset (u, v) is sum_t G_i[o, t] x_i[stride t + dilation (u, v)]:
    a correlation of the padded image with its own output gradients, used as kernels dilated by
    the layer's stride (the batch as groups). Nothing is unfolded.
    """
    # a numeric padding: nn.Conv2d keeps pairs of ints (a 'same'/'valid' string never gets here)
    kh, kw = layer.kernel_size
    ph, pw = cast(tuple[int, int], layer.padding)
    n = len(activations)
    x = activations.to(backprops.dtype)
    if ph or pw:
        x = nn.functional.pad(x, (pw, pw, ph, ph))
    kernels = backprops.reshape(n * layer.out_channels, 1, *backprops.shape[2:])
    grads = nn.functional.conv2d(x.reshape(1, n, *x.shape[2:]), kernels, stride=layer.dilation,
                                 dilation=layer.stride, groups=n)
    # rows/columns past the kernel exist when the stride does not divide the padded size
    out = {layer.weight: grads[..., :kh, :kw].reshape(n, *layer.weight.shape)} \
        if layer.weight.requires_grad else {}
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out


class BookKeepingDPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' ghost-mode optimizer (noise, scaling, accounting hook unchanged) without its
    per-step ``copy.deepcopy`` of every gradient: 0.28 ms a step for 8 small tensors against
    0.03 ms for ``clone``, a visible share of a small model's step."""

    def accumulate(self) -> None:
        """Add this step's clipped gradients to ``summed_grad`` (clone on the first step)."""
        for p in self.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad)
            else:
                p.summed_grad = p.grad.detach().clone()

    @classmethod
    def adopt(cls, optimizer: DPOptimizerFastGradientClipping) -> BookKeepingDPOptimizer:
        """The optimizer PrivacyEngine.make_private built, as this class (no state is added)."""
        if type(optimizer) is not DPOptimizerFastGradientClipping:
            raise TypeError("expected Opacus' DPOptimizerFastGradientClipping, got "
                            f"{type(optimizer)}")
        optimizer.__class__ = cls
        return optimizer


class BookKeepingClipper:
    """Hooks on ``model``'s trainable layers; ``backward`` leaves sum_i clip(g_i) in each p.grad."""

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        if not supports_bookkeeping(model):
            unknown = sorted({type(m).__name__ for m in trainable_layers(model)
                              if type(m) is not nn.Linear and type(m) not in GRAD_SAMPLERS})
            raise ValueError(f"no per-sample gradient rule for {', '.join(unknown)}; use "
                             "privacy.grad_sample_mode = 'hooks'")
        self.max_grad_norm = max_grad_norm
        self.layers = trainable_layers(model)
        self.params = [p for m in self.layers for p in m.parameters(recurse=False)
                       if p.requires_grad]
        self.saved: dict[nn.Module, tuple[list[torch.Tensor], torch.Tensor]] = {}
        self.inputs: dict[nn.Module, list[torch.Tensor]] = {}
        self.handles = []
        self.recording = False
        for layer in self.layers:
            self.handles.append(layer.register_forward_hook(self._record))

    def _record(self, layer: nn.Module, inputs: tuple, output):
        if not self.recording:  # forward passes outside backward() (evaluation, ...) are ignored
            return None
        if layer in self.inputs:  # output gradients arrive only after the forward pass
            raise ValueError(f"{type(layer).__name__} runs twice in one forward pass (shared "
                             "weights); use privacy.grad_sample_mode = 'hooks'")
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"{type(layer).__name__} returns {type(output).__name__}, not a "
                             "tensor; use privacy.grad_sample_mode = 'hooks'")
        self.inputs[layer] = [t.detach() for t in inputs if isinstance(t, torch.Tensor)]
        if not output.requires_grad:
            # Nothing before this layer needs a gradient: the graph starts here. The clone keeps
            # the result a non-leaf, so a following in-place op (ReLU(inplace=True)) stays legal.
            output = output.detach().requires_grad_(True).clone()
        # A hook registered before any in-place change sees the gradient of the layer's own output.
        output.register_hook(partial(self._keep_output_grad, layer))
        return output

    def _keep_output_grad(self, layer: nn.Module, grad: torch.Tensor) -> None:
        self.saved[layer] = (self.inputs.pop(layer), grad.detach())

    @contextmanager
    def _weights_frozen(self) -> Iterator[None]:
        for p in self.params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in self.params:
                p.requires_grad_(True)

    def backward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward + one backward pass on (x, y); sets each p.grad to the clipped per-sample sum.
        Returns the per-sample losses (detached)."""
        self.inputs.clear()
        self.saved.clear()
        if len(x) == 0:
            for p in self.params:
                p.grad = torch.zeros_like(p)
            return torch.zeros(0)
        with self._weights_frozen():
            self.recording = True
            try:
                losses = nn.functional.cross_entropy(model(x), y, reduction="none")
            finally:
                self.recording = False
            losses.sum().backward()  # sum: output gradients are per-sample, unscaled
        # a layer the loss does not depend on (unused in this pass) has zero per-sample gradients
        for layer in self.layers:
            if layer not in self.saved:
                for p in layer.parameters(recurse=False):
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
        per_sample = {layer: self._per_sample(layer) for layer in self.saved}
        sq_norms = torch.zeros(len(x), device=x.device, dtype=torch.float32)
        for kind, values in per_sample.values():
            if kind == "sq_norm":  # _per_sample: "sq_norm" comes with a tensor, "grad" a dict
                sq_norms += cast(torch.Tensor, values)
            else:
                for v in cast(dict, values).values():
                    sq_norms += v.flatten(1).float().square().sum(1)
        # Opacus' factor (DPOptimizer.clip_and_accumulate): min(1, C / (||g_i|| + 1e-6))
        coef = (self.max_grad_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)
        for layer, (kind, values) in per_sample.items():
            grads = (self._linear_clipped_sum(cast(nn.Linear, layer), coef) if kind == "sq_norm"
                     else {p: torch.einsum("n,n...->...", coef.to(g.dtype), g)
                           for p, g in cast(dict, values).items()})
            for p, g in grads.items():
                p.grad = g
        self.saved.clear()
        self.inputs.clear()
        return losses.detach()

    def _per_sample(self, layer: nn.Module) -> tuple[str, torch.Tensor | dict]:
        """("sq_norm", (n,) squared norms) for Linear layers, ("grad", per-sample grads) else."""
        activations, backprops = self.saved[layer]
        if type(layer) is nn.Linear:
            return "sq_norm", linear_sq_norms(layer, activations[0], backprops)
        if grouped_conv_is_faster(layer, backprops):
            return "grad", conv2d_grad_sample(cast(nn.Conv2d, layer), activations[0], backprops)
        if correlation_is_faster(layer, backprops):
            return "grad", single_channel_conv_grad_sample(cast(nn.Conv2d, layer), activations[0],
                                                           backprops)
        return "grad", GRAD_SAMPLERS[type(layer)](layer, activations, backprops)

    def _linear_clipped_sum(self, layer: nn.Linear, coef: torch.Tensor) -> dict:
        (a,), g = self.saved[layer]
        g = g * coef.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
        a, g = a.reshape(-1, a.shape[-1]).to(g.dtype), g.reshape(-1, g.shape[-1])
        out = {layer.weight: g.T @ a} if layer.weight.requires_grad else {}
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = g.sum(0)
        return out

    def remove(self) -> None:
        """Remove the hooks and drop the saved activations."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.saved.clear()
        self.inputs.clear()
