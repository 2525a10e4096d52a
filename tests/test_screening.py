import numpy as np
import pytest
from fedshield.server.flat import flatten, stack, unflatten
from fedshield.server.screening import Rejection, require_min_kept, screen_updates
from fedshield.server.strategy import array_view
from fedshield.tasks.models import mlp
from flwr.app import Array

from fedshield.errors import TooFewUpdates
from fedshield.schema import ScreeningConfig


@pytest.fixture(scope="module")
def reference():
    model = mlp(64, 10, (32,))
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def honest_updates(reference, n, seed=0, scale=0.01):
    rng = np.random.default_rng(seed)
    return [{k: (scale * rng.standard_normal(v.shape)).astype(v.dtype) for k,
             v in reference.items()}
            for _ in range(n)]


def codes(rejections):
    return {r.client: r.code for r in rejections}


def test_good_updates_are_all_kept(reference):
    kept, rejected = screen_updates(honest_updates(reference, 5), reference, ScreeningConfig(),
                                    [10, 11, 12, 13, 14])
    assert kept == [0, 1, 2, 3, 4] and rejected == []


def test_each_malformed_kind_is_rejected_with_its_code_and_the_round_goes_on(reference):
    ups = honest_updates(reference, 12)
    first, second = list(reference)[:2]
    del ups[1][first]                                                     # missing
    ups[2]["intruder.weight"] = np.zeros(3, np.float32)                   # extra
    ups[3][first] = ups[3][first][:-1]                                    # shape
    ups[4][first] = ups[4][first].astype(str)                             # dtype: strings
    ups[5][first] = ups[5][first].astype(np.complex64)                    # dtype: complex
    ups[6][first] = ups[6][first].astype(np.int64)                        # dtype: integers
    ups[7][first] = ups[7][first].copy()
    ups[7][first].flat[:12] = np.nan                                      # nan
    ups[8][second] = ups[8][second].copy()
    ups[8][second].flat[0] = np.inf                                       # inf
    ups[9] = {k: v * 1000 for k, v in ups[9].items()}                     # absurd norm
    ups[10][first] = ups[10][first].tolist()                              # not an array
    ids = [100 + i for i in range(12)]
    kept, rejected = screen_updates(ups, reference, ScreeningConfig(), ids)
    assert kept == [0, 11]
    assert codes(rejected) == {101: "missing", 102: "extra", 103: "shape", 104: "dtype",
                               105: "dtype", 106: "dtype", 107: "nan", 108: "inf", 109: "norm",
                               110: "dtype"}
    reasons = {r.client: r.reason for r in rejected}
    assert reasons[107] == f"nan: 12 NaN values in {first}"
    assert first in reasons[101] and "intruder.weight" in reasons[102]
    assert "complex64" in reasons[105] and "expected float" in reasons[105]
    assert [r.client for r in rejected] == sorted(r.client for r in rejected)


def test_float16_and_float64_updates_are_acceptable_for_a_float32_model(reference):
    ups = honest_updates(reference, 3)
    ups[0] = {k: v.astype(np.float16) for k, v in ups[0].items()}
    ups[1] = {k: v.astype(np.float64) for k, v in ups[1].items()}
    assert screen_updates(ups, reference, ScreeningConfig(), [0, 1, 2])[0] == [0, 1, 2]


def test_norm_ratio_needs_three_updates_and_respects_the_ratio(reference):
    ups = honest_updates(reference, 2)
    ups[1] = {k: v * 1000 for k, v in ups[1].items()}
    assert screen_updates(ups, reference, ScreeningConfig(), [0, 1])[0] == [0, 1]
    ups = honest_updates(reference, 4)
    ups[3] = {k: v * 5 for k, v in ups[3].items()}
    assert screen_updates(ups, reference, ScreeningConfig(max_norm_ratio=6.0),
                          [0, 1, 2, 3])[0] == [0, 1, 2, 3]
    kept, rejected = screen_updates(ups, reference, ScreeningConfig(max_norm_ratio=3.0),
                                    [0, 1, 2, 3])
    assert kept == [0, 1, 2] and codes(rejected) == {3: "norm"}
    assert screen_updates(ups, reference, ScreeningConfig(max_norm_ratio=0.0),
                          [0, 1, 2, 3])[0] == [0, 1, 2, 3]


def test_absolute_norm_cap(reference):
    ups = honest_updates(reference, 3)
    norms = [np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in u.values()))
             for u in ups]
    cap = (sorted(norms)[1] + sorted(norms)[2]) / 2
    kept, rejected = screen_updates(ups, reference, ScreeningConfig(max_norm=cap), [0, 1, 2])
    assert len(kept) == 2 and codes(rejected) == {int(np.argmax(norms)): "norm_cap"}


def test_weights_are_measured_relative_to_the_reference(reference):
    # full weights: norms of (weights - reference), so the big shared weights do not hide an outlier
    deltas = honest_updates(reference, 4)
    deltas[2] = {k: v * 100 for k, v in deltas[2].items()}
    weights = [{k: reference[k] + d[k] for k in reference} for d in deltas]
    assert screen_updates(weights, reference, ScreeningConfig(), [0, 1, 2, 3])[0] == [0, 1, 2, 3]
    kept, rejected = screen_updates(weights, reference, ScreeningConfig(), [0, 1, 2, 3],
                                    relative_to_reference=True)
    assert kept == [0, 1, 3] and codes(rejected) == {2: "norm"}


def test_disabled_screening_keeps_only_structural_checks(reference):
    ups = honest_updates(reference, 4)
    first = next(iter(reference))
    ups[0][first] = np.full_like(ups[0][first], np.nan)
    ups[1] = {k: v * 1e6 for k, v in ups[1].items()}
    del ups[2][first]
    kept, rejected = screen_updates(ups, reference, ScreeningConfig(enabled=False), [0, 1, 2, 3])
    assert kept == [0, 1, 3] and codes(rejected) == {2: "missing"}


def test_require_min_kept_explains_what_happened():
    require_min_kept([0, 1], 2, [])
    with pytest.raises(TooFewUpdates, match=r"only 1 update.*2 needed.*2 nan, 1 norm"):
        require_min_kept([0], 2,
                         [Rejection(1, "nan: x"), Rejection(2, "nan: y"), Rejection(3, "norm: z")])


def test_flat_round_trip_in_reference_order(reference):
    names = list(reference)
    ups = honest_updates(reference, 3)
    matrix = stack(ups, names)
    assert matrix.dtype == np.float32 and matrix.shape == (3,
                                                           sum(v.size for v in reference.values()))
    assert np.array_equal(matrix[1], flatten(ups[1], names))
    back = unflatten(matrix[1], reference)
    assert list(back) == names
    for k in names:
        assert np.array_equal(back[k], ups[1][k]) and back[k].shape == reference[k].shape
    assert np.shares_memory(back[names[0]], matrix)  # views, no copy
    with pytest.raises(ValueError, match="does not hold"):
        unflatten(matrix[1][:-1], reference)


@pytest.mark.parametrize("array",
                         [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((), np.float64),
                                   np.zeros((0, 5), np.int64), np.asfortranarray(np.ones((3, 2))),
                                   np.arange(6, dtype=np.float16)])
def test_array_views_equal_flowers_own_deserialisation(array):
    packed = Array(np.asarray(array))
    view, copy = array_view(packed), packed.numpy()
    assert view.dtype == copy.dtype and view.shape == copy.shape and np.array_equal(view, copy)
    if view.size and not np.isfortran(copy):
        assert not view.flags.writeable and not view.flags.owndata  # shares the message's bytes


def test_a_truncated_array_payload_fails_like_numpy():
    packed = Array(np.arange(10, dtype=np.float32))
    packed.data = packed.data[:-4]
    with pytest.raises(ValueError):
        packed.numpy()
    with pytest.raises(ValueError):
        array_view(packed)
