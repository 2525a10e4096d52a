"""The per-client hot path of a simulated round gives what the plain code gave: .npy arrays
encoded byte for byte as Flower's ``Array`` does and decoded through a cache of parsed headers,
the client's Config validated once per run config (and never for a different one), torch
seeding without the lazy-accelerator path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedshield.client.app import run_config
from fedshield.client.training import seed_torch
from flwr.app import Array, ArrayRecord, Context, RecordDict

from fedshield.errors import ConfigError
from fedshield.records import ReplyLimits, array_views, npy_view, to_array
from fedshield.schema import Config

ARRAYS = [np.arange(12, dtype=np.float32).reshape(3, 4), np.float64(2.5),
          np.zeros((0, 3), np.int64), np.arange(5, dtype=">f4"), np.ones(3, bool),
          np.arange(6.0).reshape(2, 3).T,  # Fortran-ordered: Flower's encoder
          np.array([1.0, -2.0], np.float16), np.zeros((1,) * 30, np.uint8), [1, 2], 3.5]


@pytest.mark.parametrize("value", ARRAYS, ids=lambda v: str(np.asarray(v).dtype))
def test_to_array_is_flowers_array_byte_for_byte(value):
    ours, flowers = to_array(value), Array(np.asarray(value))
    assert (ours.dtype, ours.shape, ours.stype) == (flowers.dtype, flowers.shape, flowers.stype)
    assert ours.data == flowers.data
    view = npy_view(ours, "x")  # and reads back (twice: the second from the header cache)
    again = npy_view(to_array(value), "x")
    for got in (view, again):
        assert got.dtype == np.asarray(value).dtype and np.array_equal(got, value)


def test_a_cached_header_still_checks_the_payload():
    good = to_array(np.zeros(4, np.float32))
    npy_view(good, "w")  # its header is now cached
    truncated = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-4])
    with pytest.raises(Exception, match="truncated or padded"):
        npy_view(truncated, "w")
    long_header = Array(dtype=good.dtype, shape=good.shape, stype=good.stype,
                        data=good.data[:8] + (5000).to_bytes(2, "little") + good.data[10:])
    with pytest.raises(Exception, match="undecodable .npy header"):
        npy_view(long_header, "w", ReplyLimits(max_npy_header_bytes=4096))


def test_array_views_are_zero_copy_and_a_bad_array_is_a_value_error():
    record = ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))})
    views = array_views(record)
    assert views["w"].tolist() == [0.0, 1.0, 2.0] and not views["w"].flags.writeable
    bad = ArrayRecord({"w": Array(dtype="float32", shape=(3,), stype="numpy.ndarray",
                                  data=b"not npy")})
    with pytest.raises(ValueError, match="w"):
        array_views(bad)


def _context(flat: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=flat)


def test_the_clients_config_is_cached_per_typed_run_config():
    flat = Config().flat()
    first, second = run_config(_context(dict(flat))), run_config(_context(dict(flat)))
    assert first is second and first == Config()
    other = run_config(_context({**flat, "federation.rounds": 7}))
    assert other.federation.rounds == 7
    assert run_config(_context(flat)).federation.rounds == flat["federation.rounds"] != 7
    # 1 and True hash alike: a bool where an int belongs must still be refused, every time
    key = next(k for k, v in flat.items() if type(v) is int and v in (0, 1))
    for _ in range(2):
        with pytest.raises(ConfigError):
            run_config(_context({**flat, key: bool(flat[key])}))


def test_seed_torch_draws_what_manual_seed_draws():
    seed_torch(123)
    ours = torch.rand(5)
    torch.manual_seed(123)
    assert torch.equal(ours, torch.rand(5))
