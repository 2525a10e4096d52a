"""Placeholder screening (replaced by the screening module)."""

from dataclasses import dataclass

import numpy as np


@dataclass
class Rejection:
    client: int
    reason: str


def screen_updates(updates, reference, cfg, client_ids):
    kept, rejected = [], []
    for i, (u, cid) in enumerate(zip(updates, client_ids)):
        bad = [k for k in reference if k not in u or u[k].shape != reference[k].shape
               or not np.isfinite(u[k]).all()]
        if bad:
            rejected.append(Rejection(cid, f"malformed: {bad[0]}"))
        else:
            kept.append(i)
    return kept, rejected
