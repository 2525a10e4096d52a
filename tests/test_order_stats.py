"""The column-vectorised sorting network behind median, trimmed mean and Bulyan."""

import itertools

import numpy as np
import pytest
from fedshield.server.aggregation import order_stats
from fedshield.server.aggregation.order_stats import (
    batcher_network,
    closest_to_median_mean,
    network_for,
    sorted_window_mean,
)


def apply(pairs, values):
    v = list(values)
    for a, b in pairs:
        if v[a] > v[b]:
            v[a], v[b] = v[b], v[a]
    return v


@pytest.mark.parametrize("n", range(1, 15))
def test_batcher_network_sorts_every_zero_one_input(n):
    """0-1 principle: a comparator network that sorts all 2^n zero-one inputs sorts everything."""
    pairs = batcher_network(n)
    assert all(0 <= a < b < n for a, b in pairs)
    for bits in itertools.product((0, 1), repeat=n):
        assert apply(pairs, bits) == sorted(bits), bits


@pytest.mark.parametrize("n,rows", [(100, (49, 50)), (25, (12,)),
                                    (20, tuple(range(3)) + tuple(range(17, 20)))])
def test_pruned_network_is_smaller_and_still_right_on_its_rows(n, rows):
    full, pruned = network_for(n), network_for(n, rows)
    assert len(pruned) < len(full)
    rng = np.random.default_rng(n)
    for _ in range(200):
        v = rng.integers(0, 5, size=n).tolist()  # many ties
        out, ref = apply(pruned.tolist(), v), sorted(v)
        assert [out[r] for r in rows] == [ref[r] for r in rows]


def ref_window(x, first, stop):
    return np.sort(x.astype(np.float64), axis=0)[first:stop].mean(axis=0)  # exact values, f64 sum


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,d,seed", [(1, 7, 0), (2, 300, 1), (7, 1000, 2), (100, 777, 3),
                                      (129, 50, 4), (300, 33, 5)])
def test_window_means_match_a_full_sort(n, d, seed, dtype):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(dtype)
    x[: n // 3, : d // 2] = np.round(x[: n // 3, : d // 2])  # ties
    middle = (n - 1) // 2
    windows = {(middle, n - middle), (0, n), (n // 5, n - n // 5)}
    for first, stop in windows:
        if first < stop:
            np.testing.assert_allclose(sorted_window_mean(x, first, stop), ref_window(x, first,
                                                                                      stop),
                                       rtol=1e-9, atol=1e-15)
    # the median is exact: the network only moves values
    got = sorted_window_mean(x, middle, n - middle)
    assert np.array_equal(got, np.median(x.astype(np.float64), axis=0))


def test_non_contiguous_and_half_precision_inputs():
    x = np.random.default_rng(0).standard_normal((9, 40))
    np.testing.assert_allclose(sorted_window_mean(x[:, ::2], 4, 5), np.median(x[:, ::2], axis=0))
    h = x.astype(np.float16)
    np.testing.assert_allclose(sorted_window_mean(h, 4, 5), np.median(h.astype(np.float32), axis=0))


def ref_closest(x, beta):
    center = np.median(x, axis=0)
    idx = np.argsort(np.abs(x - center), axis=0, kind="stable")[:beta]
    return np.take_along_axis(x, idx, axis=0).mean(axis=0)


@pytest.mark.parametrize("n,beta", [(5, 1), (11, 3), (60, 20), (61, 20), (99, 99)])
def test_closest_to_median_mean_matches_reference(n, beta):
    x = np.random.default_rng(n).standard_normal((n, 500))
    np.testing.assert_allclose(closest_to_median_mean(x, beta), ref_closest(x, beta), rtol=1e-12)


def test_many_rows_fall_back_to_numpy_with_the_same_answer(monkeypatch):
    x = np.random.default_rng(0).standard_normal((40, 300))
    fast = sorted_window_mean(x, 5, 35), closest_to_median_mean(x, 11)
    monkeypatch.setattr(order_stats, "MAX_NETWORK_ROWS", 10)
    slow = sorted_window_mean(x, 5, 35), closest_to_median_mean(x, 11)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize("first,stop", [(-1, 3), (3, 3), (0, 11)])
def test_bad_windows_are_refused(first, stop):
    with pytest.raises(ValueError, match="outside"):
        sorted_window_mean(np.zeros((10, 3)), first, stop)
