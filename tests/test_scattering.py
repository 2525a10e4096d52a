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
    monkeypatch.setattr(scattering, "scatter",
                        lambda x, **kw: calls.append(len(x)) or real(x, **kw))
    first = scattering.cached_scatter("t", images)
    again = scattering.cached_scatter("t", images)
    np.testing.assert_array_equal(first, again)
    assert calls == [4]
    scattering.cached_scatter("t", images[:2])  # other images, other file
    assert calls == [4, 2]
    assert sorted(p.suffix for p in cache.iterdir()) == [".json"] * 2 + [".lock"] * 2 + [".npy"] * 2
    # The key covers the transform's parameters too: other parameters, other file.
    monkeypatch.setattr(scattering, "CACHE_FORMAT", scattering.CACHE_FORMAT + 1)
    scattering.cached_scatter("t", images)
    assert calls == [4, 2, 4]


def _corrupt_truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _corrupt_edit(path):  # same size, same header: only the content digest sees it
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _corrupt_garbage(path):
    path.write_bytes(b"not an npy file")


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_edit, _corrupt_garbage,
                                     lambda path: path.with_suffix(".json").unlink()])
def test_a_damaged_cache_file_is_detected_and_recomputed(cache, monkeypatch, corrupt):
    images = load_mnist5k()[0].x[:3]
    # a copy: the features are a map of the file, and these edits write into it in place
    good = np.array(scattering.cached_scatter("t", images))
    (path,) = cache.glob("*.npy")
    corrupt(path)
    calls = []
    real = scattering.scatter
    monkeypatch.setattr(scattering, "scatter",
                        lambda x, **kw: calls.append(len(x)) or real(x, **kw))
    with pytest.warns(RuntimeWarning, match="truncated, edited or incomplete; recomputing"):
        again = scattering.cached_scatter("t", images)
    assert calls == [3]
    np.testing.assert_array_equal(again, good)
    # ... and the recomputed file is whole again: the next read uses it.
    np.testing.assert_array_equal(scattering.cached_scatter("t", images), good)
    assert calls == [3] and not list(cache.glob("*.tmp*"))


def test_progress_is_a_start_and_finish_line_off_a_terminal(cache, capsys):
    scattering.cached_scatter("t", load_mnist5k()[0].x[:2])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("computing ScatterNet features of t") and "2 images" in lines[0]
    assert "done in" in lines[1]


def test_progress_draws_a_bar_on_a_terminal(monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # the plain bar
    out = Terminal()
    with scattering.Progress(10, "features", stream=out) as bar:
        bar.update(4)
        bar.update(6)
    text = out.getvalue()
    assert "\rfeatures: 4/10 (40%)" in text and "\rfeatures: 10/10 (100%)" in text
    assert text.rstrip().endswith("s") and "features: done in" in text


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
