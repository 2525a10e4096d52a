"""Integrated Gradients explanations (Captum): per-input attributions, global feature importance,
and an attribution picture for image tasks.

Baselines: zeros for tabular inputs (the training mean after standardisation; a blank pixel for
digits), the darkest input value for images (a black picture after normalisation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from captum.attr import IntegratedGradients
from torch import nn


def baseline_for(x: torch.Tensor, is_image: bool) -> torch.Tensor:
    """The integrated-gradients baseline: the darkest pixel for images, zeros for features."""
    return torch.full_like(x, float(x.min())) if is_image else torch.zeros_like(x)


def integrated_gradients(model: nn.Module, x: np.ndarray, is_image: bool,
                         target: np.ndarray | None = None,
                         steps: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Attributions with the shape of ``x`` for ``target`` (default: the predicted class).

    Returns ``(attributions, targets)``.
    """
    model.eval()
    inputs = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if target is None:
        with torch.no_grad():
            target = model(inputs).argmax(1).numpy()
    ig = IntegratedGradients(model)
    attr = ig.attribute(inputs, baselines=baseline_for(inputs, is_image),
                        target=torch.as_tensor(np.asarray(target, dtype=np.int64)), n_steps=steps)
    return attr.detach().numpy(), np.asarray(target)


def feature_importance(model: nn.Module, x: np.ndarray, feature_names: tuple[str, ...],
                       steps: int = 32) -> list[dict]:
    """Mean |IG attribution| per feature over ``x``, one entry per feature, most important first."""
    attr, _ = integrated_gradients(model, x, is_image=False, steps=steps)
    scores = np.abs(attr).mean(0)
    names = feature_names or tuple(f"feature_{i}" for i in range(len(scores)))
    order = np.argsort(-scores, kind="stable")
    return [{"feature": names[i], "importance": float(scores[i])} for i in order]


def attribution_picture(model: nn.Module, x: np.ndarray, y: np.ndarray, path: str | Path,
                        steps: int = 32) -> Path:
    """PNG: each image beside its IG heatmap for the predicted class (red adds, blue removes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attr, pred = integrated_gradients(model, x, is_image=True, steps=steps)
    n = len(x)
    fig, axes = plt.subplots(2, n, figsize=(1.8 * n, 3.8), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(x[i].mean(0), cmap="gray")
        axes[0, i].set_title(f"label {y[i]} / pred {pred[i]}", fontsize=8)
        heat = attr[i].sum(0)
        lim = float(np.abs(heat).max()) or 1.0
        axes[1, i].imshow(heat, cmap="bwr", vmin=-lim, vmax=lim)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle("Integrated Gradients (baseline: black image)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
