import gzip
import struct

import numpy as np
import pytest
from fedshield.client.validation import quality_report, validate_split
from fedshield.tasks import Split, get_task
from fedshield.tasks.images import read_idx

from fedshield.errors import DataValidationError


@pytest.mark.parametrize("name, shape, n_train, n_test", [
    ("digits", (64,), 1438, 359),
    ("mnist5k", (1, 28, 28), 4000, 1000),
    ("mnist", (1, 28, 28), 60000, 10000),
    ("adult", None, 32561, 16281),
])
def test_tasks_load_real_data(name, shape, n_train, n_test):
    task = get_task(name)
    train, test = task.load()
    assert (len(train), len(test)) == (n_train, n_test)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.x.shape[1:] == task.input_shape
    if shape:
        assert task.input_shape == shape
    assert set(np.unique(train.y)) == set(range(task.num_classes))
    validate_split(train, task)
    model = task.build_model()
    assert model(__import__("torch").from_numpy(train.x[:4])).shape == (4, task.num_classes)


def test_adult_features_are_named_and_standardised():
    task = get_task("adult")
    train, _ = task.load()
    assert len(task.feature_names) == train.x.shape[1]
    assert "age" in task.feature_names and "sex=Female" in task.feature_names
    assert abs(train.x[:, 0].mean()) < 1e-3 and abs(train.x[:, 0].std() - 1) < 1e-2


def test_idx_parser(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">III", 2, 3, 4)
                                   + images.tobytes()))
    assert np.array_equal(read_idx(path), images)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)
    with pytest.raises(DataValidationError, match="bad magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(DataValidationError, match="header says"):
        read_idx(short)


@pytest.fixture
def digits():
    task = get_task("digits")
    return task, task.load()[0].subset(np.arange(50))


@pytest.mark.parametrize("mutate, message", [
    (lambda x, y: (x[:, :10], y), "shape"),
    (lambda x, y: (x.astype(np.int32), y), "dtype int32"),
    (lambda x, y: (x, y.astype(np.float32)), "labels have dtype"),
    (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x).astype(np.float32),
                   y), "NaN/Inf"),
    (lambda x, y: (x, np.where(np.arange(len(y)) == 3, 12, y)), "label 12 at row 3"),
    (lambda x, y: (x, y[:-1]), "labels"),
    (lambda x, y: (x[:0], y[:0]), "no examples"),
])
def test_validation_names_the_problem(digits, mutate, message):
    task, data = digits
    x, y = mutate(data.x.copy(), data.y.copy())
    with pytest.raises(DataValidationError, match=message):
        validate_split(Split(x, y), task)


def test_quality_report(digits):
    task, data = digits
    report = quality_report(data, task.num_classes)
    assert report["examples"] == 50
    assert sum(report[f"class-{k}"] for k in range(10)) == 50
    assert report["missing-values"] == 0


def test_a_workers_partition_splits_are_kept_and_follow_the_loaders_data():
    """client/data.py keeps each simulation partition's splits per process (the same objects on
    the next message), but a loader that returns other arrays gets its own splits."""
    from dataclasses import replace

    from fedshield.client.data import _partition_splits

    from fedshield.schema import PartitionConfig

    task = get_task("digits")
    part = PartitionConfig()
    first = _partition_splits(task, 1, 4, part, 0)
    assert _partition_splits(task, 1, 4, part, 0) is first
    train, test = task.load()
    other = Split(train.x + 1.0, train.y)
    shifted = _partition_splits(replace(task, load=lambda: (other, test)), 1, 4, part, 0)
    assert shifted is not first
    np.testing.assert_array_equal(shifted[0].x, first[0].x + 1.0)  # the same rows, the new data
    np.testing.assert_array_equal(shifted[0].y, first[0].y)


def test_the_partition_split_memo_is_bounded_in_bytes_least_recently_used_out():
    """A worker of a many-client federation serves different clients each round: the memo
    keeps at most its byte budget (the newest entry always), dropping the least recently used."""
    from fedshield.client import data

    from fedshield.schema import PartitionConfig

    task, part = get_task("digits"), PartitionConfig()
    data._PARTITION_SPLITS.clear()
    one = data._split_bytes(data._partition_splits(task, 0, 8, part, 0))
    budget = 3 * one + one // 2  # room for three digits partitions of about this size
    for pid in range(1, 8):
        data._partition_splits(task, pid, 8, part, 0, budget=budget)
        held = sum(data._split_bytes(v[1]) for v in data._PARTITION_SPLITS.values())
        assert held <= budget or len(data._PARTITION_SPLITS) == 1
    kept = [key[1] for key in data._PARTITION_SPLITS]
    assert kept[-1] == 7 and 0 not in kept and len(kept) <= 4
    again = data._partition_splits(task, kept[0], 8, part, 0, budget=budget)  # a hit: now newest
    assert list(data._PARTITION_SPLITS)[-1][1] == kept[0]
    assert data._PARTITION_SPLITS[list(data._PARTITION_SPLITS)[-1]][1] is again
    data._PARTITION_SPLITS.clear()
