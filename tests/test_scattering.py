"""The ScatterNet task: kymatio's transform, computed once per machine, and DP-ready models."""

import numpy as np
import pytest
import torch
from fedshield.tasks import get_task, scattering
from fedshield.tasks.images import load_mnist5k
from opacus.validators import ModuleValidator

from fedshield.errors import ConfigError
from tests.config_support import neutral_config


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSHIELD_CACHE", str(tmp_path))
    return tmp_path


def test_features_are_kymatio_scattering_coefficients():
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    images = load_mnist5k()[0].x[:8]
    features = scattering.scatter(images, chunk=3)  # chunks must not change the result
    assert features.shape == (8, 81, 7, 7) and features.dtype == np.float32
    direct = ScatteringTorch2D(J=2, shape=(28, 28), L=8)(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(features, direct.reshape(8, 81, 7, 7), rtol=1e-5, atol=1e-6)
    # Order 0 is the image blurred and subsampled; distinct digits give distinct features.
    assert not np.allclose(features[0], features[1])


def test_features_are_computed_once_and_keyed_by_the_images(cache, monkeypatch):
    images = load_mnist5k()[0].x[:4]
    calls = []
    real = scattering.scatter
    monkeypatch.setattr(scattering, "scatter", lambda x: calls.append(len(x)) or real(x))
    first = scattering.cached_scatter("t", images)
    again = scattering.cached_scatter("t", images)
    np.testing.assert_array_equal(first, again)
    assert calls == [4]
    scattering.cached_scatter("t", images[:2])  # other images, other file
    assert calls == [4, 2]
    assert sorted(p.suffix for p in cache.iterdir()) == [".lock", ".lock", ".npy", ".npy"]


@pytest.mark.parametrize("model", ["scatter_linear", "scatter_cnn"])
def test_models_take_the_features_and_are_opacus_valid(model):
    task = get_task("mnist-scattering", model)
    assert task.input_shape == (81, 7, 7)
    net = task.build_model()
    assert ModuleValidator.validate(net, strict=False) == []
    assert net(torch.randn(3, 81, 7, 7)).shape == (3, 10)


def test_config_refuses_a_model_of_another_task_and_augmenting_features():
    with pytest.raises(ConfigError, match="not a model of task 'mnist-scattering'"):
        neutral_config({"task": {"name": "mnist-scattering", "model": "tanh_cnn"}})
    with pytest.raises(ConfigError, match="takes features, not pixels"):
        neutral_config({"task": {"name": "mnist-scattering"}, "train": {"augment": "shift"}})
    assert neutral_config({"task": {"name": "mnist-scattering", "model": "scatter_cnn"}})
