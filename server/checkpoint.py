"""Per-round server checkpoints: global weights + round + strategy state, written atomically.

Weights alternate between two slots and the JSON state, written last, names its slot, so a crash
at any point leaves the previous complete checkpoint intact.

Tamper-evident: the JSON state carries the sha256 of its weights file and a sha256 digest of its
own content; both are verified on load, so a flipped byte, a truncated file or a hand edit is a
clear refusal (StateCorrupted), never a resume from altered weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from fedshield.errors import StateCorrupted

STATE = "checkpoint.json"
SLOTS = ("checkpoint-0.safetensors", "checkpoint-1.safetensors")
FORMAT = 2  # 2: with weights_sha256 and digest


@dataclass
class Checkpoint:
    """One saved round: its global weights and the strategy's state."""
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


def _digest(meta: dict) -> str:
    """sha256 of the checkpoint's JSON content (every key but the digest itself)."""
    # Round-tripped first: JSON turns int keys into strings, which would sort differently.
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != "digest"}))
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_checkpoint(run_dir: Path, rnd: int, weights: dict[str, torch.Tensor], state: dict) -> None:
    """Save round ``rnd`` atomically into the slot it does not share with the previous round."""
    slot = SLOTS[rnd % 2]
    tensors = {f"weights/{k}": v.detach().cpu().contiguous() for k, v in weights.items()}
    plain_state = _split_tensors(state, tensors)
    _atomic(run_dir / slot, lambda p: save_file(tensors, str(p), metadata={"round": str(rnd)}))
    meta = {"format": FORMAT, "round": rnd, "weights": slot,
            "weights_sha256": hashlib.sha256((run_dir / slot).read_bytes()).hexdigest(),
            "state": plain_state}
    meta["digest"] = _digest(meta)
    _atomic(run_dir / STATE, lambda p: p.write_text(json.dumps(meta)))


def _refuse(state_path: Path, problem: str) -> StateCorrupted:
    return StateCorrupted(f"{state_path}: {problem}; the run cannot be resumed from it. Restore "
                          "the run folder from a backup, or start a new run (resume = \"\")")


def _read_meta(state_path: Path) -> dict:
    try:
        meta = json.loads(state_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _refuse(state_path, f"not valid JSON (truncated or edited: {exc})") from None
    if not isinstance(meta, dict):
        raise _refuse(state_path, "not a checkpoint (expected a JSON object)")
    if meta.get("format") != FORMAT or "digest" not in meta:
        raise _refuse(state_path, "written without integrity hashes (an older fedshield, or "
                      "edited), so its weights cannot be verified")
    if meta["digest"] != _digest(meta):
        raise _refuse(state_path, "its content does not match its sha256 digest (edited by hand "
                      "or corrupted)")
    if (not isinstance(meta.get("round"), int) or meta["round"] < 1
            or meta.get("weights") not in SLOTS or not isinstance(meta.get("state"), dict)):
        raise _refuse(state_path, "round, weights or state is missing or malformed")
    return meta


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The verified checkpoint of ``run_dir``; None if it has none; StateCorrupted if it is
    truncated, altered or inconsistent."""
    state_path = Path(run_dir) / STATE
    if not state_path.exists():
        return None
    meta = _read_meta(state_path)
    weights_path = Path(run_dir) / meta["weights"]
    if not weights_path.is_file():
        raise _refuse(state_path, f"its weights file {weights_path.name} is missing")
    raw = weights_path.read_bytes()  # hashed and parsed from the same bytes
    if hashlib.sha256(raw).hexdigest() != meta.get("weights_sha256"):
        raise _refuse(state_path, f"{weights_path.name} does not match the sha256 recorded for "
                      "it (the weights were altered or damaged)")
    try:
        tensors = load_bytes(raw)
        # The round in the weights' own metadata: a swapped slot would name another round.
        header_len = int.from_bytes(raw[:8], "little")
        saved_meta = json.loads(raw[8:8 + header_len]).get("__metadata__", {})
        saved_round = int(saved_meta.get("round", -1))
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise _refuse(state_path, f"{weights_path.name} is unreadable ({exc})") from None
    if saved_round != meta["round"]:
        raise _refuse(state_path, f"{weights_path.name} holds round {saved_round} but "
                      f"{STATE} names round {meta['round']}")
    weights = {k.removeprefix("weights/"): v for k, v in tensors.items()
               if k.startswith("weights/")}
    try:
        state = _join_tensors(meta["state"], tensors)
    except KeyError as exc:
        raise _refuse(state_path, f"its state names a tensor {exc} that is not saved") from None
    return Checkpoint(meta["round"], weights, state)
