"""Pre-flight checks: everything that can be known to fail is refused before anything trains.

``preflight(cfg)`` runs in the simulation runner and in the ServerApp's main (so ``flwr run`` with a
bad config fails too, before round 1). It re-validates the config, checks that the run folder can
be created or resumed, that the model fits the task, that the aggregation rule can aggregate this
federation, and that every client's partition can make a batch: DP-SGD samples each example with
rate batch_size / examples, which must be <= 1, so a batch larger than a partition is refused with
the options to change (clamping it would silently change every client's privacy accounting).

The checks themselves are small functions on plain values; only ``preflight`` loads anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fedshield import schema, validation
from fedshield.errors import ConfigError, StateCorrupted

log = logging.getLogger(__name__)

# client/data.py holds this share of a partition out for local evaluation, from 20 examples on.
# Mirrored here (a test keeps both equal to what load_client_data returns).
VAL_FRACTION = 0.1
VAL_MIN_EXAMPLES = 20


@dataclass(frozen=True)
class PreflightReport:
    """What the checks found: shown to the user, and used by tests."""

    task: str
    num_classes: int
    model_parameters: int
    train_sizes: tuple[int, ...]  # each client's training examples (after the local hold-out)
    notes: tuple[str, ...]


def local_train_size(partition_size: int) -> int:
    """Examples a client trains on out of its partition (client/data.py's hold-out rule)."""
    held_out = int(partition_size * VAL_FRACTION) if partition_size >= VAL_MIN_EXAMPLES else 0
    return partition_size - held_out


def partition_problem(train_sizes: tuple[int, ...], batch_size: int,
                      private: bool) -> str | None:
    """Why some client cannot train on its partition with ``batch_size`` (or None)."""
    if not train_sizes:
        return None
    smallest = min(train_sizes)
    who = train_sizes.index(smallest)
    options = ("use fewer federation.num_clients, partition.kind = \"iid\", or a larger "
               "partition.min_partition_size (Dirichlet)")
    if smallest == 0:
        return f"client {who} gets no training examples; {options}"
    if private and batch_size > smallest:
        return (f"train.batch_size = {batch_size} exceeds the {smallest} training examples of "
                f"client {who} (the smallest partition): DP-SGD samples each example with rate "
                f"batch_size / examples, which must be <= 1. Lower train.batch_size to at most "
                f"{smallest}, or {options}")
    return None


def partition_notes(train_sizes: tuple[int, ...], batch_size: int) -> list[str]:
    """Without DP a batch larger than a partition is simply the whole partition: say so."""
    small = [i for i, n in enumerate(train_sizes) if n < batch_size]
    if not small:
        return []
    return [f"train.batch_size = {batch_size} exceeds the partitions of {len(small)} of "
            f"{len(train_sizes)} clients (smallest: {min(train_sizes)} examples); they train on "
            "their whole partition as one batch"]


def run_dir_problem(cfg: schema.Config) -> str | None:
    """Why a new run folder could not be created under output_dir (or None)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        return f"output_dir = {cfg.output_dir!r} is a file, not a folder; choose another output_dir"
    # The run folder must stay inside output_dir (config.safe_name; checked again here because a
    # Config can be built directly, bypassing load).
    base = (out / cfg.name).resolve()
    if base.parent != out.resolve():
        return f"name = {cfg.name!r} would write outside output_dir; choose a plain name"
    return None


def check_resume(run_dir: Path) -> None:
    """A folder to resume must hold a complete, verified checkpoint (and readable metrics).

    Starting again in a folder that has results but no checkpoint would silently mix two runs
    (rounds_completed past the schedule), so that is refused too."""
    from fedshield.server.checkpoint import STATE, load_checkpoint  # torch
    from fedshield.server.outputs import RunFolder

    what = f"resume = {str(run_dir)!r}"
    if not run_dir.exists():
        raise ConfigError(f"{what} does not exist; give the folder of the run to continue "
                          "(runs/<name>-<timestamp>), or resume = \"\" to start a new run")
    if not run_dir.is_dir():
        raise ConfigError(f"{what} is a file, not a run folder")
    if not (run_dir / STATE).exists():
        leftovers = sorted(p.name for p in run_dir.iterdir())
        if leftovers:
            raise StateCorrupted(
                f"{what} holds {', '.join(leftovers[:4])}{' ...' if len(leftovers) > 4 else ''} "
                f"but no {STATE}: it cannot be resumed, and starting over there would mix two "
                "runs. Start a new run (resume = \"\") or restore the checkpoint from a backup")
        raise ConfigError(f"{what} is empty: there is nothing to resume; give the folder of the "
                          "run to continue, or resume = \"\" to start a new run")
    checkpoint = load_checkpoint(run_dir)  # StateCorrupted if truncated or altered
    rounds = [m.round for m in RunFolder(run_dir).read_metrics()]  # StateCorrupted if corrupt
    done = checkpoint.round if checkpoint else 0
    if [r for r in rounds if r <= done] != list(range(1, done + 1)):
        raise StateCorrupted(f"{what}: the checkpoint is at round {done} but metrics.jsonl holds "
                             f"rounds {rounds[:10]}; the metrics were truncated or edited. "
                             "Restore them from a backup or start a new run")


def check_model(cfg: schema.Config):
    """The task, after a forward pass of its model on two test inputs gave one logit per class."""
    import torch
    from fedshield.tasks import task_for

    task = task_for(cfg.task)
    _, test = task.load()
    model = task.build_model()
    which = f"task.model = {cfg.task.model!r}" if cfg.task.model else "the default model"
    if len(test) == 0:
        raise ConfigError(f"task {task.name!r} has an empty test split; the server evaluates on it")
    try:
        with torch.no_grad():
            out = model.eval()(torch.from_numpy(test.x[:2]))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"{which} does not fit task.name = {task.name!r} (inputs "
            f"{tuple(test.x.shape[1:])}): {exc}; choose a model of this task") from exc
    if tuple(out.shape) != (min(2, len(test)), task.num_classes):
        raise ConfigError(f"{which} gives outputs of shape {tuple(out.shape[1:])} on task "
                          f"{task.name!r}, which has {task.num_classes} classes; choose a model "
                          "of this task")
    if cfg.init_weights:
        check_init_weights(cfg.init_weights, model.state_dict())
    if cfg.privacy.enabled:
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(model.train(), strict=False)
        if errors:
            raise ConfigError(f"privacy.enabled = true but {which} is not DP-compatible: "
                              f"{errors[0]}; choose another model")
    return task, sum(p.numel() for p in model.parameters())


def check_init_weights(path: str, expected: dict) -> None:
    """init_weights must be a safetensors file with exactly the model's tensors and shapes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    what = f"init_weights = {path!r}"
    if not Path(path).is_file():
        raise ConfigError(f"{what} does not exist; give a model.safetensors of a run of this task, "
                          "or init_weights = \"\" for a random initialisation")
    try:
        saved = {k.removeprefix("_module."): v for k, v in load_file(path).items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{what} is not a readable safetensors file ({exc})") from None
    shapes = {k: tuple(v.shape) for k, v in saved.items()}
    wanted = {k: tuple(v.shape) for k, v in expected.items()}
    if shapes != wanted:
        diff = (sorted(set(shapes) ^ set(wanted))
                or sorted(k for k in wanted if shapes[k] != wanted[k]))
        raise ConfigError(f"{what} does not fit the model of this task (first difference: "
                          f"{diff[0]!r}); give weights of the same task.name and task.model")


def train_sizes(cfg: schema.Config) -> tuple[int, ...]:
    """Each simulated client's training examples: the partitions the clients will load."""
    from fedshield.tasks.partition import cached_partitions  # clients reuse it

    parts = cached_partitions(cfg.task.name, cfg.federation.num_clients, cfg.partition, cfg.seed)
    return tuple(local_train_size(len(p)) for p in parts)


def preflight(cfg: schema.Config, *, partitions: str = "refuse") -> PreflightReport:
    """Refuse ``cfg`` (ConfigError / StateCorrupted, naming the key and what to change) if it
    cannot run; otherwise return what was checked.

    ``partitions``: "refuse" a partition no batch fits (the simulation runner: it knows the
    clients use the simulated partitions), only "warn" (the ServerApp: on a SuperLink, partner
    sites bring their own data, which the server cannot see), or "off"."""
    if partitions not in ("refuse", "warn", "off"):
        raise ValueError(f"partitions = {partitions!r}: use 'refuse', 'warn' or 'off'")
    # every field and cross-check, also for a Config built directly
    validation.from_dict(cfg.to_dict())
    if cfg.resume:
        check_resume(Path(cfg.resume))
    else:
        problem = run_dir_problem(cfg)
        if problem:
            raise ConfigError(problem)
    task, n_params = check_model(cfg)
    from fedshield.tasks import resolve_device

    resolve_device(cfg.train.device)  # "cuda" on a machine without one: refused now, not in round 1
    if cfg.attack.name != "none" and cfg.attack.target_label >= task.num_classes:
        raise ConfigError(f"attack.target_label = {cfg.attack.target_label} is not a class of task "
                          f"{task.name!r} (0..{task.num_classes - 1}); choose one of those")
    from fedshield.server.aggregation import build_aggregator

    fed = cfg.federation
    build_aggregator(cfg.aggregation.rule, cfg.aggregation, fed.num_clients, cfg.seed)
    # A round hands the rule the sampled clients' updates, not the federation's: an explicit f
    # must leave an honest majority among those too (e.g. f = 2 of 4 sampled is refused now).
    sampled = min(fed.num_clients,
                  max(fed.min_clients, round(fed.num_clients * fed.fraction_train)))
    if not cfg.central_dp.enabled and sampled != fed.num_clients:
        build_aggregator(cfg.aggregation.rule, cfg.aggregation, sampled, cfg.seed)
    sizes: tuple[int, ...] = train_sizes(cfg) if partitions != "off" else ()
    notes: list[str] = []
    problem = partition_problem(sizes, cfg.train.batch_size, cfg.privacy.enabled)
    if problem is None and sizes and cfg.privacy.enabled:
        from fedshield.privacy.planner import check_delta

        try:
            check_delta(cfg.privacy.delta, max(sizes))
        except ConfigError as exc:
            problem = (f"privacy.delta: {exc} (the largest client has {max(sizes)} training "
                       "examples)")
    if problem and partitions == "refuse":
        raise ConfigError(problem)
    if problem:
        notes.append(f"clients on the simulated partitions would refuse to train: {problem}")
    if not cfg.privacy.enabled:
        notes += partition_notes(sizes, cfg.train.batch_size)
    for note in notes:
        log.warning("pre-flight: %s", note)
    return PreflightReport(task.name, task.num_classes, n_params, sizes, tuple(notes))
