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


def _split_tensors(tree, tensors: dict[str, torch.Tensor], path: str = "state"):
    """JSON-able copy of ``tree``; its tensors move to ``tensors`` under their path."""
    if isinstance(tree, torch.Tensor):
        tensors[path] = tree.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(tree, dict):
        return {k: _split_tensors(v, tensors, f"{path}/{k}") for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split_tensors(v, tensors, f"{path}/{i}") for i, v in enumerate(tree)]
    return tree


def _join_tensors(tree, tensors: dict[str, torch.Tensor]):
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join_tensors(v, tensors) for v in tree]
    return tree


def save_checkpoint(run_dir: Path, rnd: int, weights: dict[str, torch.Tensor], state: dict) -> None:
    slot = f"checkpoint-{rnd % 2}.safetensors"
    tensors = {f"weights/{k}": v.detach().cpu().contiguous() for k, v in weights.items()}
    plain_state = _split_tensors(state, tensors)
    _atomic(run_dir / slot, lambda p: save_file(tensors, str(p), metadata={"round": str(rnd)}))
    _atomic(run_dir / STATE,
            lambda p: p.write_text(json.dumps({"round": rnd, "weights": slot, "state": plain_state})))


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
    tensors = load_file(str(weights_path))
    weights = {k.removeprefix("weights/"): v for k, v in tensors.items() if k.startswith("weights/")}
    return Checkpoint(meta["round"], weights, _join_tensors(meta["state"], tensors))
