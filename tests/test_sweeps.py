"""Grids of runs: the robustness matrix and its worst-case table (tiny real federations)."""

import json

from fedshield.simulations.sweeps import robustness_matrix, worst_cases


def test_worst_case_picks_the_lowest_accuracy_attack():
    rows = [{"rule": "r", "partition": "iid", "byzantine_fraction": 0.0, "attack": "none",
             "final_accuracy": 0.9},
            {"rule": "r", "partition": "iid", "byzantine_fraction": 0.2, "attack": "a",
             "final_accuracy": 0.7},
            {"rule": "r", "partition": "iid", "byzantine_fraction": 0.2, "attack": "b",
             "final_accuracy": 0.4}]
    assert worst_cases(rows) == [{"rule": "r", "partition": "iid", "byzantine_fraction": 0.2,
                                  "no_attack_accuracy": 0.9, "worst_accuracy": 0.4,
                                  "worst_attack": "b"}]


def test_robustness_matrix_writes_tables_and_heatmap(small_cfg, tmp_path):
    base = small_cfg(federation={"rounds": 2}, reputation={"enabled": False})
    result = robustness_matrix(base, ["fedavg", "median"], ["none", "sign_flip"], [0.2],
                               ["iid"], tmp_path / "rob")
    assert len(result["rows"]) == 4
    for name in ("robustness.csv", "robustness.md", "worst_case.md", "robustness_heatmap.png"):
        assert (tmp_path / "rob" / name).is_file()
    rows = json.loads((tmp_path / "rob" / "robustness.json").read_text())
    attacked = {r["rule"]: r["final_accuracy"] for r in rows if r["attack"] == "sign_flip"}
    assert set(attacked) == {"fedavg", "median"}
    assert {r["rule"] for r in result["worst_case"]} == {"fedavg", "median"}
