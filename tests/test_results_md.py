"""benchmarks/RESULTS.md is generated from the result JSON files, so no figure is hand-copied."""

import json
import math
import re

import pytest
from fedshield.benchmarks import results_md as rmd

SWEEP = rmd.RESULTS / "cpu-2026-12-01" / "privacy-sweep-scattering-audit" / "privacy_sweep.json"


def test_results_md_is_the_generators_output():
    assert rmd.OUTPUT.read_text() == rmd.render(), (
        "benchmarks/RESULTS.md is stale: run `python -m fedshield.benchmarks.results_md`")


def test_every_result_json_is_rendered_under_its_own_heading():
    text = rmd.OUTPUT.read_text()
    headings = set(re.findall(r"^## (.+)$", text, flags=re.M))
    for f in rmd.RESULTS.rglob("*.json"):
        rel = f.relative_to(rmd.RESULTS).as_posix()
        if rmd.is_summary(f):  # one run: a row named by its file in its folder's table
            assert rel.rpartition("/")[0] in headings and f"| {f.stem} |" in text, rel
        else:
            assert rel in headings, rel


def test_every_section_names_a_command():
    sections = rmd.OUTPUT.read_text().split("\n## ")[1:]
    missing = [s.splitlines()[0] for s in sections if not re.search(r"Commands?: `", s)]
    assert not missing, f"result files without a command in benchmarks/results_md.py: {missing}"


def test_figures_are_the_recorded_values_formatted_not_changed(tmp_path):
    runs = [{"rule": "nnm+cclip", "final_accuracy": 0.9726, "epsilon_max": 2.999989,
             "wall_seconds": 767.93, "target_epsilon": math.inf, "run_dir": "/somewhere"}]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    text = rmd.render(tmp_path)
    assert "| nnm+cclip | inf | 3.000 | 97.26% | 768 |" in text
    assert "/somewhere" not in text  # machine-local paths are not figures


def test_a_result_of_unknown_shape_is_refused_with_what_to_do(tmp_path):
    (tmp_path / "odd.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="teach benchmarks/results_md.py"):
        rmd.render(tmp_path)


def test_the_readmes_privacy_sweep_table_is_the_generated_one():
    from pathlib import Path

    readme = (Path(rmd.ROOT) / "README.md").read_text()
    assert rmd.privacy_sweep_table(SWEEP) in readme
