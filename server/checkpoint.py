"""Per-round server checkpoints: global weights + round + strategy state, written atomically.

Weights alternate between two slots and the JSON state, written last, names its slot, so a crash
at any point leaves the previous complete checkpoint intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

STATE = "checkpoint.json"


@dataclass
class Checkpoint:
    round: int
    weights: dict[str, torch.Tensor]
    state: dict


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, rnd: int, weights: dict[str, torch.Tensor], state: dict) -> None:
    slot = f"checkpoint-{rnd % 2}.safetensors"
    _atomic(run_dir / slot,
            lambda p: save_file({k: v.contiguous() for k, v in weights.items()}, str(p),
                                metadata={"round": str(rnd)}))
    _atomic(run_dir / STATE,
            lambda p: p.write_text(json.dumps({"round": rnd, "weights": slot, "state": state})))


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    state_path = run_dir / STATE
    if not state_path.exists():
        return None
    meta = json.loads(state_path.read_text())
    weights_path = run_dir / meta["weights"]
    with safe_open(str(weights_path), "pt") as fh:
        saved_round = int(fh.metadata().get("round", -1))
    if saved_round != meta["round"]:
        raise RuntimeError(f"{weights_path} holds round {saved_round} but {state_path} names "
                           f"round {meta['round']}; the run folder was modified by hand")
    return Checkpoint(meta["round"], load_file(str(weights_path)), meta["state"])
