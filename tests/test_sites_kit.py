"""`fedshield site init`: certificates, node keys, configs and commands (no processes started)."""

import ipaddress
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from typer.testing import CliRunner

from fedshield.cli import app
from fedshield.errors import ConfigError
from fedshield.site import Layout, init_sites, supernode_command


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return init_sites(tmp_path_factory.mktemp("kit") / "deploy", 2, host="127.0.0.1", port=9193)


def test_server_certificate_is_signed_by_the_ca_for_the_host(kit):
    c = kit.coordinator
    ca = x509.load_pem_x509_certificate((c / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((c / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if not signed by this CA
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert (c / "server.key").stat().st_mode & 0o077 == 0  # private keys are not world-readable
    assert (c / "ca.key").stat().st_mode & 0o077 == 0


def test_each_site_gets_an_openssh_ecdsa_key_and_the_ca(kit):
    for k in (1, 2):
        site = kit.site(k)
        key = load_ssh_public_key((site / "node_key.pub").read_bytes())
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size == 384
        assert (site / "node_key").read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        assert (site / "ca.crt").read_bytes() == (kit.coordinator / "ca.crt").read_bytes()
    a, b = ((kit.site(k) / "node_key.pub").read_text() for k in (1, 2))
    assert a != b


def test_coordinator_files_carry_the_exact_commands(kit):
    home = tomllib.loads((kit.flwr_home / "config.toml").read_text())
    conn = home["superlink"][home["superlink"]["default"]]
    assert conn["address"] == "127.0.0.1:9193"
    assert conn["root-certificates"] == str((kit.coordinator / "ca.crt").resolve())
    text = (kit.coordinator / "COMMANDS.md").read_text()
    assert "--enable-supernode-auth" in text and "--disable-runtime-dependency-installation" in text
    assert "--port 9193" in text and "state.db" in text
    for k in (1, 2):
        key = (kit.site(k) / 'node_key.pub').resolve()
        assert f"flwr supernode register {key} fedshield" in text
    assert "flwr run " in text and "--format json" in text


def test_supernode_command_follows_the_edited_site_toml(kit, tmp_path):
    site = kit.site(2)
    cmd = supernode_command(site)
    assert cmd[cmd.index("--superlink") + 1] == "127.0.0.1:9193"
    assert cmd[cmd.index("--port") + 1] == "9195"
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(site.resolve() / "node_key")
    node = cmd[cmd.index("--node-config") + 1]
    assert "partition-id=1 num-partitions=2" in node and "data-path" not in node
    assert 'site-id="site-2"' in node
    assert f'ledger-dir="{site.resolve() / "ledger"}"' in node

    edited = tmp_path / "site-9"
    edited.mkdir()
    for name in ("ca.crt", "node_key"):
        (edited / name).write_bytes((site / name).read_bytes())
    toml = (site / "site.toml").read_text().replace('data-path = ""', 'data-path = "data/mine.csv"')
    (edited / "site.toml").write_text(toml.replace("max-epsilon = 8.0", "max-epsilon = 3.5"))
    node = supernode_command(edited)[-7]
    assert f'data-path="{edited.resolve() / "data/mine.csv"}"' in node
    assert "num-partitions" not in node and "max-epsilon=3.5" in node


def test_refuses_to_overwrite_and_insecure_mode_warns(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["site", "init", str(tmp_path / "open"), "--sites", "1",
                                 "--insecure"])
    assert result.exit_code == 0, result.output
    assert "WARNING" in result.output and "NOT encrypted" in result.output
    layout = Layout(tmp_path / "open")
    assert not (layout.coordinator / "ca.crt").exists()
    assert "insecure = true" in (layout.flwr_home / "config.toml").read_text()
    assert "--insecure" in supernode_command(layout.site(1))
    assert "WARNING" in (layout.coordinator / "COMMANDS.md").read_text()
    with pytest.raises(ConfigError, match="not empty"):
        init_sites(tmp_path / "open", 1)
    again = runner.invoke(app, ["site", "init", str(tmp_path / "open")])
    assert again.exit_code == 2 and "choose a new folder" in again.output


def test_a_site_can_only_tighten_the_privacy_budget(small_cfg):
    from fedshield.client.app import privacy_cap

    assert privacy_cap(small_cfg(), {}) == 0.0  # no budget anywhere
    assert privacy_cap(small_cfg(), {"max-epsilon": 3.0}) == 3.0
    capped = small_cfg(privacy={"max_epsilon": 5.0})
    assert privacy_cap(capped, {"max-epsilon": 3.0}) == 3.0
    assert privacy_cap(capped, {"max-epsilon": 9.0}) == 5.0
    assert privacy_cap(capped, {}) == 5.0


def test_site_toml_sets_the_data_cache_and_the_task_poll_interval(kit):
    from fedshield.site import POLL_ENV, supernode_env

    node = supernode_command(kit.site(1))[-7]
    assert f'cache-dir="{kit.site(1).resolve() / "cache"}"' in node
    assert supernode_env(kit.site(1)) == {POLL_ENV: "0.1"}
    printed = CliRunner().invoke(app, ["site", "command", str(kit.site(1))])
    assert printed.exit_code == 0 and printed.output.startswith(f"{POLL_ENV}=0.1 ")


def test_a_bad_task_poll_interval_is_refused(kit, tmp_path):
    from fedshield.site import supernode_env

    bad = tmp_path / "bad"
    bad.mkdir()
    toml = (kit.site(1) / "site.toml").read_text()
    (bad / "site.toml").write_text(toml.replace("task_poll_interval = 0.1",
                                                "task_poll_interval = 0"))
    with pytest.raises(ConfigError, match=r"task_poll_interval .* \[0.01, 60\]"):
        supernode_env(bad)


def test_supervisor_restarts_a_failing_supernode_and_stops_on_a_clean_exit(tmp_path):
    import json
    import sys

    from fedshield.site_supervisor import RestartPolicy, read_state, supervise

    # a stand-in SuperNode: fails twice, then exits cleanly
    script = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]); n = int(p.read_text() or 0) "
              "if p.exists() else 0; p.write_text(str(n + 1)); print('start', n); "
              "sys.exit(0 if n >= 2 else 3)")
    pauses = []
    code = supervise([sys.executable, "-c", script, str(tmp_path / "count")], {}, tmp_path,
                     RestartPolicy(first=2.0, longest=3.0), sleep=pauses.append)
    assert code == 0 and pauses == [2.0, 3.0]  # doubled, capped
    state = read_state(tmp_path)
    assert state["restarts"] == 2 and [e["code"] for e in state["exits"]] == [3, 3, 0]
    assert state["stopped"] and state["supernode_pid"] is None
    log = (tmp_path / "logs" / "supernode.log").read_text()
    assert [f"start {k}" in log for k in range(3)] == [True] * 3 and "exited with 3" in log
    json.dumps(state)

    # one that never starts properly: given up after max_restarts quick failures
    code = supervise([sys.executable, "-c", "raise SystemExit(1)"], {}, tmp_path,
                     RestartPolicy(max_restarts=2), sleep=pauses.append)
    assert code == 1 and read_state(tmp_path)["restarts"] == 2


def test_site_status_reads_the_log_the_ledger_and_the_data(kit, tmp_path):
    import json
    import os
    import shutil

    from fedshield.site import site_status
    from fedshield.site_supervisor import SupervisorState

    site = tmp_path / "site"
    shutil.copytree(kit.site(1), site)
    (site / "data.csv").write_text("label,a\n1,2\n")
    toml = (site / "site.toml").read_text()
    (site / "site.toml").write_text(toml.replace('data-path = ""', 'data-path = "data.csv"'))
    assert site_status(site)["connection"].startswith("never started")

    (site / "logs").mkdir()
    (site / "logs" / "supernode.log").write_text(
        "INFO : Starting Flower SuperNode\nINFO : SuperNode ID: 99\nINFO : [RUN 5, ROUND 1]\n"
        "INFO : Sent successfully\n"
        "INFO : Starting Flower SuperNode\nINFO : SuperNode ID: 42\nINFO : [RUN 7, ROUND 3]\n"
        "INFO : Receiving: train message\nINFO : [RUN 7, ROUND 3]\nINFO : Sent successfully\n")
    SupervisorState(os.getpid(), ["x"], supernode_pid=os.getpid(), restarts=1).write(
        site / "supervisor.json")
    st = site_status(site)
    assert st["connection"] == "connected (node id 42)" and st["restarts"] == 1
    assert st["last_round_served"] == {"run": 7, "round": "3"} and st["rounds_served"] == 2
    import hashlib
    digest = hashlib.sha256(b"data.csv\0label,a\n1,2\n\0").hexdigest()
    assert st["data_fingerprint"] == digest
    assert st["privacy"]["sites"] == []

    with open(site / "logs" / "supernode.log", "a") as f:  # the client's own timing lines
        for r in (1, 2):
            f.write("fedshield timing " + json.dumps({"kind": "train", "run": 8, "round": str(r)})
                    + "\n")
    st = site_status(site)
    assert st["last_round_served"] == {"run": 8, "round": "2"} and st["rounds_served"] == 2

    SupervisorState(os.getpid(), ["x"], supernode_pid=None).write(site / "supervisor.json")
    assert site_status(site)["connection"] == "not running"
    out = CliRunner().invoke(app, ["site", "status", str(site), "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["data_fingerprint"] == digest
    text = CliRunner().invoke(app, ["site", "status", str(site)]).output
    assert "last round served: run 8, round 2" in text and digest in text
