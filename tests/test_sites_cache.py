"""A partner site's data cache (client/data_cache.py): a new client process reads the site's
parsed data from its cache-dir instead of parsing it again, and reloads when the files change."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fedshield.client import data_cache
from fedshield.client.data import load_client_data
from flwr.app import Context, RecordDict

from tests.config_support import neutral_config

ROOT = Path(__file__).resolve().parents[1]


def site_data(path: Path, n: int = 120, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.random((n, 64), dtype=np.float32), y=rng.integers(0, 10, n))


def context(node: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})


@pytest.fixture
def site(tmp_path):
    data_cache.clear_memory()
    data_cache.LOADS.clear()
    site_data(tmp_path / "data.npz")
    node = {"data-path": str(tmp_path / "data.npz"), "partition-id": 0,
            "cache-dir": str(tmp_path / "cache")}
    yield tmp_path, node, neutral_config({"task": {"name": "digits"}})
    data_cache.clear_memory()


def load(node, cfg, new_process=True):
    if new_process:  # what a new flwr-clientapp process starts with: an empty memory
        data_cache.clear_memory()
    return load_client_data(context(node), cfg)


def test_second_process_reads_the_cache_and_a_changed_file_reloads(site, capsys):
    tmp, node, cfg = site
    _, train, val = load(node, cfg)
    assert data_cache.LOADS == {"source": 1}
    assert "loaded from the source" in capsys.readouterr().err
    _, train2, val2 = load(node, cfg)
    assert data_cache.LOADS == {"source": 1, "disk": 1}
    assert "hit" in capsys.readouterr().err
    np.testing.assert_array_equal(train2.x, train.x)  # the same arrays, bit for bit
    np.testing.assert_array_equal(val2.y, val.y)
    load(node, cfg, new_process=False)
    assert data_cache.LOADS["memory"] == 1  # the same process: no disk read at all

    # touched, same bytes: hashed again, the cache is kept
    os.utime(tmp / "data.npz", ns=(1, 1))
    load(node, cfg)
    assert data_cache.LOADS == {"source": 1, "disk": 2, "memory": 1}

    # different bytes: loaded from the source again, and the new data is what comes back
    site_data(tmp / "data.npz", n=150, seed=1)
    _, train3, val3 = load(node, cfg)
    assert data_cache.LOADS["source"] == 2
    assert len(train3) + len(val3) == 150
    # the old version's arrays are gone from the cache folder
    (folder,) = (tmp / "cache").iterdir()
    assert len(list(folder.glob("train_x-*.npy"))) == 1
    assert folder.stat().st_mode & 0o077 == 0  # a copy of the site's data: private


def test_a_different_split_recipe_never_reads_another_ones_cache(site):
    _, node, cfg = site
    load(node, cfg)
    load(node, neutral_config({"task": {"name": "digits"}, "seed": 7}))
    load({**node, "partition-id": 3}, cfg)
    assert data_cache.LOADS == {"source": 3}


def test_a_damaged_cache_is_loaded_again_from_the_source(site):
    tmp, node, cfg = site
    load(node, cfg)
    (folder,) = (tmp / "cache").iterdir()
    (folder / "meta.json").write_text("{trunc")
    _, train, _ = load(node, cfg)
    assert data_cache.LOADS == {"source": 2} and len(train) > 0
    for f in folder.glob("train_x-*.npy"):
        f.write_bytes(b"not an array")
    load(node, cfg)
    assert data_cache.LOADS == {"source": 3}


def test_without_cache_dir_nothing_is_cached(site):
    tmp, node, cfg = site
    node = {k: v for k, v in node.items() if k != "cache-dir"}
    load(node, cfg)
    load(node, cfg)
    assert not data_cache.LOADS and not (tmp / "cache").exists()


def test_simulation_partitions_are_cached_too(site):
    tmp, _, cfg = site
    cfg = neutral_config({"task": {"name": "digits"}, "federation": {"num_clients": 3}})
    node = {"partition-id": 1, "num-partitions": 3, "cache-dir": str(tmp / "cache")}
    _, train, _ = load(node, cfg)
    _, again, _ = load(node, cfg)
    assert data_cache.LOADS == {"source": 1, "disk": 1}
    np.testing.assert_array_equal(again.x, train.x)


def test_a_new_python_process_reads_the_cache(site):
    """The real thing: a second interpreter (as Flower's next flwr-clientapp) does not parse."""
    tmp, node, cfg = site
    load(node, cfg)
    script = textwrap.dedent(f"""
        from flwr.app import Context, RecordDict
        from fedshield.client import data_cache
        from fedshield.client.data import load_client_data
        from tests.config_support import neutral_config
        ctx = Context(run_id=2, node_id=1, node_config={node!r}, state=RecordDict(),
                      run_config={{}})
        load_client_data(ctx, neutral_config({{"task": {{"name": "digits"}}}}))
        print(dict(data_cache.LOADS))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "{'disk': 1}", out.stdout


def test_an_unwritable_cache_costs_speed_never_the_round(site, capsys):
    tmp, node, cfg = site
    (tmp / "not-a-folder").write_text("")
    _, train, _ = load({**node, "cache-dir": str(tmp / "not-a-folder")}, cfg)
    assert len(train) > 0 and data_cache.LOADS == {"source": 1}
    assert "could not write the cache" in capsys.readouterr().err
