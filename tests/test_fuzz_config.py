"""Config fuzzing: at least 300 mutations of a small config, each either refused with a
ConfigError naming the key, or accepted AND then built into a run without a traceback.

"Built" means what a run does before and in its first step: pre-flight, the saved config reloads,
the run folder stays inside output_dir, the strategy (aggregator, reputation) and the model are
built, and client 0 takes one local training step (DP-SGD when privacy is on). Hypothesis is
derandomized, so the mutations are the same on every machine and every run.
"""

import dataclasses
import os
import tempfile
from collections import Counter
from pathlib import Path

from fedshield.privacy.accounting import ACCOUNTANTS
from fedshield.server.preflight import preflight
from flwr.app import Context, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedshield import configio, schema, validation
from fedshield.errors import BudgetExhausted, ConfigError, DataValidationError, FedShieldError
from tests.config_support import neutral_config

MUTATIONS = int(os.environ.get("FEDSHIELD_FUZZ_EXAMPLES", 300))  # more for a deeper local search
FLAT = schema.Config().flat()
SECTIONS = sorted({k.split(".")[0] for k in FLAT if "." in k})
PATH_KEYS = {"output_dir", "resume", "init_weights", "privacy.ledger_dir",
             "deployment.registry_uri"}
FIELDS = {}
for top in dataclasses.fields(schema.Config):
    if top.default_factory is dataclasses.MISSING:
        FIELDS[top.name] = top
    else:
        for sub in dataclasses.fields(type(top.default_factory())):
            FIELDS[f"{top.name}.{sub.name}"] = sub

HOSTILE = [float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 5e-324, -0.0, 0, -1, 1,
           2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**64, -(2**63), True, False, "", " ", "+", "++",
           "hf:", "hf: ", "../x", "a/b", "..", "x\x00y", "tab\there", "\u202e", "é", "KRUM",
           "nnm+", "+krum", "none", "0,0", "0,-1", "1e3", "nan", "inf", "true", [], [1], {},
           {"a": 1}, "x" * 300]
PLAUSIBLE = [0, 1, 2, 3, 5, 10, 16, 100, 256, 1000, 0.0, 0.001, 0.1, 0.5, 0.9, 0.99, 1.0, 2.5,
             10.0, 1e-6, 1e-5, 3.0]
# Relative paths only: the test runs inside its own temporary folder.
PATHS = ["", "sub", "a b", "../up", "ü/x", "x\ny", "missing.safetensors", "not-a-folder"]
EXTRA_KEYS = ["train.lrr", "nope", "federation.rounds.x", "task"]


def values_for(key: str):
    f = FIELDS.get(key)
    pool = PATHS if key in PATH_KEYS else HOSTILE + PLAUSIBLE
    choices = list(f.metadata.get("choices") or ()) if f is not None else []
    if key == "aggregation.rule":
        choices += ["krum", "median", "nnm+cclip", "bucketing+krum", "bulyan", "multikrum", "flame",
                    "trimmed_mean", "geomed", "clip", "fltrust"]
    if key == "attack.name":  # names from the registries, not schema metadata
        choices += list(validation.attack_names())
    if key in ("privacy.accountant", "central_dp.accountant"):
        choices += list(ACCOUNTANTS)
    if key == "task.name":
        choices += ["digits", "adult", "mnist5k"]
    if key == "task.model":
        choices += ["", "cnn", "tanh_cnn", "scatter_linear"]
    likely = st.sampled_from(choices or (PATHS if key in PATH_KEYS else PLAUSIBLE))
    # Half the draws are plausible values, so that many mutated configs are accepted and built.
    return st.one_of(likely, likely, likely, st.sampled_from(pool), st.integers(-(2**70), 2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))


MUTATION = st.sampled_from(sorted(FLAT) + EXTRA_KEYS).flatmap(
    lambda key: st.tuples(st.just(key), values_for(key)))


def base(root: Path) -> dict:
    return {"name": "fz", "seed": 0, "output_dir": "runs",
            "task": {"name": "digits", "model": ""},
            "federation": {"num_clients": 4, "rounds": 2},
            "partition": {"kind": "iid"},
            "train": {"lr": 0.1, "batch_size": 16, "max_steps": 1},
            "privacy": {"ledger_dir": str(root / "ledgers"), "noise_multiplier": 1.0,
                        "accountant": "rdp"},
            "deployment": {"handoff": False}}


def names_a_key(message: str) -> bool:
    return ("unknown key" in message or any(k in message for k in FLAT)
            or any(f"{s}." in message or f"{s}:" in message for s in SECTIONS))


def build_run(cfg: schema.Config, root: Path) -> str:
    """Everything a run builds before and in its first client step; returns the outcome."""
    from fedshield.client.app import fit_locally
    from fedshield.client.data import load_client_data
    from fedshield.server.outputs import new_run_dir
    from fedshield.server.strategy import ShieldStrategy
    from fedshield.tasks import task_for

    saved = root / "config.toml"
    saved.write_text(configio.to_toml(cfg))
    assert validation.load(saved) == cfg, "the resolved config does not reload"
    assert validation.from_run_config(cfg.flat()) == cfg, "the Flower run config does not reload"
    run_dir = new_run_dir(cfg)
    assert run_dir.resolve().parent == Path(cfg.output_dir).resolve(), run_dir
    if not cfg.secagg.enabled:
        ShieldStrategy(cfg)
    model = task_for(cfg.task).build_model()
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=cfg.flat(),
                      node_config={"partition-id": 0,
                                   "num-partitions": cfg.federation.num_clients})
    rc = {"num-rounds": cfg.federation.rounds, "server-round": 1, "run-key": run_dir.name,
          **configio.flatten({"train": dataclasses.asdict(cfg.train)})}
    try:
        fit_locally(context, cfg, load_client_data, model.state_dict(), rc)
    except (BudgetExhausted, DataValidationError):
        return "client-refused"  # a typed refusal the client sends; the round goes on
    return "trained"


def test_config_mutations_are_refused_clearly_or_run():
    outcomes: Counter = Counter()
    root = Path(tempfile.mkdtemp(prefix="fedshield-fuzz-"))
    work = root / "work"
    work.mkdir()
    (work / "not-a-folder").write_text("x")
    here = os.getcwd()

    @settings(max_examples=MUTATIONS, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(MUTATION, min_size=1, max_size=3))
    def one(mutations):
        flat = configio.flatten(base(root))
        for key, value in mutations:
            flat[key] = value
        outcomes["total"] += 1
        try:
            cfg = neutral_config(configio.unflatten(flat))
            preflight(cfg)
        except ConfigError as exc:
            assert names_a_key(str(exc)), f"{mutations}: the message names no key: {exc}"
            outcomes["refused"] += 1
            if os.environ.get("FEDSHIELD_FUZZ_LOG"):  # to read the messages: a file path
                with open(os.environ["FEDSHIELD_FUZZ_LOG"], "a") as fh:
                    fh.write(f"{mutations!r}\n    {exc}\n")
            return
        except FedShieldError as exc:  # e.g. StateCorrupted for a resume folder
            assert names_a_key(str(exc)) or "resume" in str(exc), exc
            outcomes["refused"] += 1
            return
        # Accepted: from here on any exception, typed or not, is accepted-then-broken.
        try:
            outcomes[build_run(cfg, root)] += 1
        except Exception as exc:
            raise AssertionError(f"accepted then broken: {mutations}: "
                                 f"{type(exc).__name__}: {exc}") from exc

    os.chdir(work)  # relative output_dir / resume paths land in the temporary folder
    try:
        one()
    finally:
        os.chdir(here)
    assert outcomes["total"] >= MUTATIONS, outcomes
    # Not vacuous: both outcomes occur in numbers, and some accepted mutations really trained.
    assert outcomes["refused"] >= 100 and outcomes["trained"] >= 30, outcomes
