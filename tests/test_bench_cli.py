"""`fedshield bench aggregators`: the issue's speed comparison, run from the CLI on tiny inputs."""

import json

from typer.testing import CliRunner

from fedshield.cli import app


def test_bench_aggregators_times_each_rule_against_flower(tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "aggregators", "--ns", "8,12", "--ds", "500",
                                      "--rules", "krum,median,nnm+cclip", "--repeats", "1",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["rule"], r["n"]) for r in rows] == [(rule, n) for n in (8, 12)
                                                   for rule in ("krum", "median", "nnm+cclip")]
    for r in rows:
        assert r["ours_s"] > 0 and r["f"] == int(0.2 * r["n"])
        has_flower = r["rule"] in ("krum", "median")  # nnm+cclip has no Flower counterpart
        assert (r["flower_s"] is not None) == has_flower
        if has_flower:
            assert r["speedup"] == r["flower_s"] / r["ours_s"]
            assert r["speedup_legacy"] == r["flower_legacy_s"] / r["ours_s"]  # Flower's older API
        else:
            assert r["flower_legacy_s"] is None
    assert "| krum | 8 |" in (out / "results.md").read_text()


def test_bench_aggregators_refuses_an_unknown_rule_before_timing(tmp_path):
    result = CliRunner().invoke(app, ["bench", "aggregators", "--rules", "krum,nope",
                                      "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "unknown rule 'nope'" in result.output
    assert not (tmp_path / "b").exists()
