"""Partner-site deployment kit: certificates, node keys, and the exact commands for each side.

``fedshield site init OUT --sites 3`` writes::

    OUT/coordinator/   ca.crt ca.key server.pem server.key  flwr-home/config.toml  COMMANDS.md
    OUT/site-K/        site.toml (the partner edits it)  ca.crt  node_key node_key.pub  COMMANDS.md

The coordinator runs a SuperLink with TLS and SuperNode authentication, registers every site's
public key (``fedshield site register OUT``) and submits runs with ``flwr run``. Each partner starts
one SuperNode with its private key, its data path and its privacy settings as node config
(``fedshield site command OUT/site-K`` prints the command for the edited ``site.toml``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console

from fedshield.errors import ConfigError

CONNECTION = "fedshield"  # the name of the SuperLink connection in the coordinator's FLWR_HOME
CERT_DAYS = 365
# Flower's SuperExec waits this long between checks for a task to start (its default 1 s).
TASK_POLL_INTERVAL = 0.1
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
# How the site runs its ClientApp: one long-lived process for every message (fedshield's executor,
# fedshield/site_worker.py, next to `flower-supernode --isolation process`), or Flower's own
# flower-superexec starting a flwr-clientapp process per message.
CLIENT_PROCESSES = ("long-lived", "per-message")
console = Console(stderr=True)


@dataclass(frozen=True)
class Layout:
    """Where ``site init`` puts things under ``root``."""

    root: Path

    @property
    def coordinator(self) -> Path:
        """The coordinator's folder of the kit."""
        return self.root / "coordinator"

    @property
    def flwr_home(self) -> Path:
        """The coordinator's FLWR_HOME (Flower's state, not ~/.flwr)."""
        return self.coordinator / "flwr-home"

    def site(self, k: int) -> Path:
        """The folder of site ``k``."""
        return self.root / f"site-{k}"

    def sites(self) -> list[Path]:
        """The kit's site folders (those with a site.toml), in site order."""
        return sorted((p for p in self.root.glob("site-*")
                       if p.name[5:].isdigit() and (p / "site.toml").is_file()),
                      key=lambda p: int(p.name[5:]))


def app_dir() -> Path:
    """The Flower App folder `flwr run` submits: this project's root (where pyproject.toml is)."""
    return Path(__file__).resolve().parents[1]


def flwr_bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (it must also be on PATH for
    SuperLink/SuperNode, which start ``flower-superexec`` by name)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


# --- certificates and keys ------------------------------------------------------------------
def write_certificates(folder: Path, host: str) -> None:
    """A CA and a SuperLink server certificate whose subjectAltName covers ``host``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def key_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedshield"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate clock skew
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(name("fedshield coordinator CA"))
               .issuer_name(name("fedshield coordinator CA")).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now)
               .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA384()))
    try:
        alt: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(host))]
    except ValueError:  # a host name
        alt = [x509.DNSName(host)]
    if host != "localhost":
        alt.append(x509.DNSName("localhost"))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder().subject_name(name(host))
                   .issuer_name(ca_cert.subject).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
                   .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False)
                   .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    _write_private(folder / "ca.key", key_pem(ca_key))
    (folder / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    _write_private(folder / "server.key", key_pem(server_key))
    (folder / "server.pem").write_bytes(server_cert.public_bytes(pem))


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def write_node_key(path: Path, comment: str) -> None:
    """An OpenSSH ECDSA P-384 key pair (the only kind flwr 1.42 accepts for SuperNode auth)."""
    if shutil.which("ssh-keygen") is None:
        raise ConfigError("ssh-keygen not found: install OpenSSH (package openssh-client) to "
                          "create SuperNode keys")
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", comment,
                    "-f", str(path)], check=True, capture_output=True, timeout=60)


# --- the files each side reads --------------------------------------------------------------
def flwr_config_toml(address: str, ca: Path | None) -> str:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection (absolute certificate path)."""
    tls = f'root-certificates = "{ca.resolve()}"\n' if ca else "insecure = true\n"
    return (f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{address}"\n{tls}')


def superlink_command(layout: Layout, host: str, port: int, insecure: bool) -> list[str]:
    """The ``flower-superlink`` command line for the coordinator (TLS unless insecure)."""
    c = layout.coordinator.resolve()
    tls = ["--insecure"] if insecure else [
        "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.pem"),
        "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth"]
    return ["flower-superlink", *tls, "--disable-runtime-dependency-installation",
            "--host", host, "--port", str(port), "--database", str(c / "state.db")]


def site_toml(k: int, num_sites: int, address: str, insecure: bool, clientappio_port: int) -> str:
    """The commented site.toml written for site ``k`` of the kit."""
    return f'''# Site {k}: edit this file, then print your SuperNode command with
#   fedshield site command <this folder>
name = "site-{k}"
superlink = "{address}"          # the coordinator's SuperLink (host:port)
insecure = {str(insecure).lower()}              # true only for a throw-away local test
root_certificates = "ca.crt"    # the coordinator's CA (relative to this folder)
private_key = "node_key"        # keep it secret; the coordinator has node_key.pub
port = {clientappio_port}                     # this SuperNode's local runtime API port (127.0.0.1)
max_retries = 10                 # give up after this many failed reconnects
# Seconds between the SuperNode's checks for a new task to start (Flower's SuperExec knob,
# FLWR_SUPEREXEC_TASK_POLL_INTERVAL; Flower's default is 1.0). Each message waits up to this long.
task_poll_interval = {TASK_POLL_INTERVAL}
# "long-lived": one fedshield process serves every message (torch, the task and your data stay
# loaded; it runs the fedshield installed HERE and refuses a run whose app differs from it).
# "per-message": Flower starts a new flwr-clientapp process for each message (slower).
client_process = "long-lived"

[node_config]                    # what the ClientApp on this node sees
# Your data: a .csv (with a "label" column), a .npz (x, y) or a folder <root>/<label>/*.png.
# Leave empty to use simulation partitions (partition-id/num-partitions) for a dry run.
data-path = ""
site-id = "site-{k}"              # your budget's owner: max-epsilon caps all federations of it
partition-id = {k - 1}
num-partitions = {num_sites}
# Your cumulative privacy ledger (kept across runs and restarts) and your own budget cap.
# Back up the whole folder (site-manifest.json too): a lost or truncated ledger is a refusal.
ledger-dir = "ledger"
max-epsilon = 8.0
# Your data, parsed once and kept here (a private copy; it reloads when the data files change).
cache-dir = "cache"
'''


def read_site(site_dir: Path) -> dict:
    """A site folder's site.toml (ConfigError if missing or not valid TOML)."""
    path = site_dir / "site.toml"
    if not path.is_file():
        raise ConfigError(f"{path} not found; create the site kit with `fedshield site init`")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


def _node_config_arg(node: dict, site_dir: Path) -> str:
    """Flower's ``--node-config`` string; relative paths are resolved against the site folder."""
    parts = []
    for key, value in node.items():
        if key == "data-path" and value == "":
            continue
        relative = not Path(str(value)).expanduser().is_absolute()
        if key in ("data-path", "ledger-dir", "cache-dir") and relative:
            value = str((site_dir / str(value)).resolve())
        if isinstance(value, str):
            parts.append(f'{key}="{value}"')
        elif isinstance(value, bool):
            parts.append(f"{key}={str(value).lower()}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def client_process(s: dict, site_dir: Path) -> str:
    """The site's ``client_process`` (site.toml; "long-lived" when absent)."""
    mode = s.get("client_process", CLIENT_PROCESSES[0])
    if mode not in CLIENT_PROCESSES:
        raise ConfigError(f"{site_dir / 'site.toml'}: client_process must be one of "
                          f"{', '.join(map(repr, CLIENT_PROCESSES))}, got {mode!r}")
    return str(mode)


def worker_command(site_dir: str | Path) -> list[str] | None:
    """The long-lived ClientApp executor's command (fedshield/site_worker.py) for a site, None
    when the site runs a process per message."""
    site_dir = Path(site_dir).resolve()
    s = read_site(site_dir)
    if client_process(s, site_dir) != "long-lived":
        return None
    interval = float(supernode_env(site_dir)[POLL_ENV])
    return [sys.executable, "-m", "fedshield.site_worker", "--runtime-api-address",
            f"127.0.0.1:{s['port']}", "--poll-interval", str(interval)]


def supernode_command(site_dir: str | Path) -> list[str]:
    """The ``flower-supernode`` command for a site, built from its (edited) ``site.toml``."""
    site_dir = Path(site_dir).resolve()
    s = read_site(site_dir)
    # long-lived: the SuperNode starts no flower-superexec; fedshield's worker serves its tasks
    isolation = (["--isolation", "process"]
                 if client_process(s, site_dir) == "long-lived" else [])
    node = dict(s.get("node_config", {}))
    if node.get("data-path", "") == "" and "partition-id" not in node:
        raise ConfigError(f"{site_dir / 'site.toml'}: set node_config.data-path to your data")
    if node.get("data-path", "") != "":
        node.pop("num-partitions", None)  # real data: no simulation partitions
    if s.get("insecure", False):
        tls = ["--insecure"]
    else:
        tls = ["--root-certificates", str(site_dir / s["root_certificates"]),
               "--auth-supernode-private-key", str(site_dir / s["private_key"])]
    return ["flower-supernode", *isolation, "--superlink", s["superlink"], *tls,
            "--node-config", _node_config_arg(node, site_dir), "--host", "127.0.0.1",
            "--port", str(s["port"]), "--max-retries", str(s.get("max_retries", 10))]


def supernode_env(site_dir: str | Path) -> dict[str, str]:
    """The environment variables the site's SuperNode runs with (on top of the caller's)."""
    s = read_site(Path(site_dir))
    interval = s.get("task_poll_interval", TASK_POLL_INTERVAL)
    if not isinstance(interval, int | float) or not 0.01 <= interval <= 60:
        raise ConfigError(f"{Path(site_dir) / 'site.toml'}: task_poll_interval must be a number "
                          f"of seconds in [0.01, 60], got {interval!r}")
    return {POLL_ENV: str(float(interval))}


def _env_prefix(site_dir: str | Path) -> str:
    """``NAME=value ...`` of :func:`supernode_env`, to put before the command in a shell."""
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in supernode_env(site_dir).items())


def _shell(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def _plain_commands(site_dir: str | Path) -> str:
    """The site's shell command lines: the SuperNode, then its long-lived worker (if any)."""
    lines = [f"{_env_prefix(site_dir)} {_shell(supernode_command(site_dir))}"]
    if (worker := worker_command(site_dir)) is not None:
        lines.append(_shell(worker) + "   # in a second shell, next to the SuperNode")
    return "\n".join(lines)


def coordinator_commands(layout: Layout, host: str, port: int, insecure: bool,
                         num_sites: int) -> str:
    """The coordinator's shell instructions: SuperLink, site registration, run."""
    c = layout.coordinator.resolve()
    env = f"export FLWR_HOME={shlex.quote(str(layout.flwr_home.resolve()))}"
    register = "\n".join(
        f"flwr supernode register {shlex.quote(str(layout.site(k).resolve() / 'node_key.pub'))} "
        f"{CONNECTION}" for k in range(1, num_sites + 1))
    run_cfg = (f"task.name='mnist5k' federation.num_clients={num_sites} "
               f"federation.min_clients={num_sites} federation.rounds=3 "
               f"federation.round_timeout=120.0 output_dir='{c / 'runs'}'")
    warn = ("\n> **WARNING: --insecure: no TLS and no SuperNode authentication. Anyone who can "
            "reach the port can join and read the model. Local testing only.**\n"
            if insecure else "")
    return f"""# Coordinator: running a fedshield federation across {num_sites} sites
{warn}
Keep `ca.key` and `server.key` private. Send each partner their `site-K/` folder
(it holds the CA certificate `ca.crt`, their key pair and `site.toml`), over a channel you trust.

The `flwr` and `flower-*` commands come from the environment where fedshield is installed; that
environment's `bin/` must be on `PATH` (the SuperLink starts `flower-superexec` by name).

## 1. Start the SuperLink (keeps running; state, including registered keys, in `state.db`)

```sh
{env}
{_shell(superlink_command(layout, host, port, insecure))}
```

## 2. Register every site's public key (once; or `fedshield site register {layout.root}`)

```sh
{env}
{register if not insecure else "# not needed with --insecure (no SuperNode authentication)"}
flwr supernode list {CONNECTION}
```

## 3. Start a run once the partners' SuperNodes are up

```sh
{env}
flwr run {shlex.quote(str(app_dir()))} {CONNECTION} --format json \\
    --run-config "{run_cfg}"
flwr ls {CONNECTION} --format json              # status of every run
flwr log RUN_ID {CONNECTION}                    # the ServerApp's log
flwr stop RUN_ID {CONNECTION}                   # stop a run
```

Add `privacy.enabled=true privacy.noise_multiplier=1.0` to train with DP-SGD. The run folder
(`metrics.jsonl`, `summary.json`, checkpoints) appears under `output_dir` on the SuperLink host.
To continue an interrupted run from its last completed round, submit it again with
`resume='<run folder>'` added to `--run-config`.
"""


def site_commands(site_dir: Path) -> str:
    """A partner site's instructions (Markdown): edit site.toml, start the SuperNode."""
    return f"""# Partner site `{site_dir.name}`

1. Edit `site.toml`: set `node_config.data-path` to your data (CSV with a `label` column, `.npz`
   with `x` and `y`, or a folder `<root>/<label>/*.png`) and your privacy cap `max-epsilon`.
2. Start your SuperNode (it reads `site.toml`; restarted when it fails, log in
   `logs/supernode.log`), and check on it:

```sh
fedshield site run {shlex.quote(str(site_dir.resolve()))}
fedshield site status {shlex.quote(str(site_dir.resolve()))}
```

`fedshield site command` prints the plain commands instead; with the defaults of `site init`
(`client_process = "long-lived"`) they are two processes, both to keep running: the SuperNode,
and fedshield's long-lived ClientApp executor that serves every message in one process:

```sh
{_plain_commands(site_dir)}
```

The executor runs the fedshield installed on this machine, never code sent by the coordinator,
and refuses (an error reply, a line in the log) a run whose app version or Python files differ
from it. `client_process = "per-message"` in `site.toml` switches to Flower's default: a new
`flwr-clientapp` process per message, running the coordinator's app bundle.

`cache-dir` keeps your data parsed (a private copy, reloaded when the files change).

Your data never leaves this machine; only model updates and aggregate metrics (examples, class
counts, epsilon) are sent. Your cumulative privacy spending is kept in `ledger-dir`; your
`max-epsilon` caps its total over every federation this `site-id` joins, whatever the coordinator
names them. See it with `fedshield privacy ledger --ledger-dir ledger`. Back up the whole
`ledger-dir` (with its `site-manifest.json`) after each run: a deleted or truncated ledger makes
this site refuse to train until it is restored, never start its count over.
Keep `node_key` secret. Exit code 1 with `[code: 2004]` means the coordinator has not registered
`node_key.pub` yet, or, right after a restart, that the coordinator still holds this site's
previous connection (it lapses within about 60 s; `fedshield site run` retries).
"""


def init_sites(out_dir: str | Path, sites: int, host: str = "127.0.0.1", port: int = 9093,
               insecure: bool = False, node_ports: list[int] | None = None) -> Layout:
    """Create the coordinator and per-site kits under ``out_dir``; returns their layout.

    Site K's SuperNode serves its local runtime API on ``node_ports[K-1]`` (default port+K)."""
    if sites < 1:
        raise ConfigError("--sites must be at least 1")
    layout = Layout(Path(out_dir))
    if layout.root.exists() and any(layout.root.iterdir()):
        raise ConfigError(f"{layout.root} is not empty; choose a new folder (keys and "
                          "certificates are never overwritten)")
    layout.flwr_home.mkdir(parents=True)
    address = f"{host}:{port}"
    if not insecure:
        write_certificates(layout.coordinator, host)
    ca = None if insecure else layout.coordinator / "ca.crt"
    (layout.flwr_home / "config.toml").write_text(flwr_config_toml(address, ca))
    node_ports = node_ports or [port + k for k in range(1, sites + 1)]
    for k in range(1, sites + 1):
        folder = layout.site(k)
        folder.mkdir()
        if not insecure:
            shutil.copy(layout.coordinator / "ca.crt", folder / "ca.crt")
        write_node_key(folder / "node_key", f"fedshield-site-{k}")
        (folder / "site.toml").write_text(
            site_toml(k, sites, address, insecure, node_ports[k - 1]))
        (folder / "COMMANDS.md").write_text(site_commands(folder))
    (layout.coordinator / "COMMANDS.md").write_text(
        coordinator_commands(layout, host, port, insecure, sites))
    return layout


def flwr_env(layout: Layout) -> dict[str, str]:
    """Environment for the coordinator's ``flwr`` CLI: its FLWR_HOME, Flower's bin on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "FLWR_HOME": str(layout.flwr_home.resolve()),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def register_sites(out_dir: str | Path, timeout: float = 60) -> dict[str, str]:
    """Register every site's public key with the running SuperLink; site name -> flwr's answer."""
    layout = Layout(Path(out_dir))
    if not (layout.flwr_home / "config.toml").is_file():
        raise ConfigError(f"{out_dir} has no coordinator/flwr-home/config.toml; "
                          "run `fedshield site init` first")
    results = {}
    for folder in layout.sites():
        proc = subprocess.run([flwr_bin("flwr"), "supernode", "register",
                               str((folder / "node_key.pub").resolve()), CONNECTION],
                              env=flwr_env(layout), capture_output=True, text=True,
                              timeout=timeout)
        answer = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0 and "already" not in answer.lower():
            raise ConfigError(f"registering {folder.name} failed (is the SuperLink running at "
                              f"the address in {layout.flwr_home / 'config.toml'}?): {answer}")
        results[folder.name] = answer
    return results


# --- a running site -------------------------------------------------------------------------
def _last_start(log: str) -> str:
    """The part of a SuperNode log written by its latest start."""
    at = log.rfind("Starting Flower SuperNode")
    return log[at:] if at >= 0 else log


def _rounds_served(log: str) -> list[tuple[int, str]]:
    """(run id, round) of every train reply the site's client handled, in order (its timing
    lines, client/timing.py); Flower's own ``[RUN r]`` lines name no round, so a log without
    timing lines gives (run, "") per reply Flower sent."""
    import re

    from fedshield.client.timing import parse_log

    timed = [(int(t["run"]), str(t["round"])) for t in parse_log(log) if "run" in t]
    if timed:
        return timed
    served, current = [], None
    for line in log.splitlines():
        if m := re.search(r"\[RUN (\d+)(?:, ROUND ([^\]]+))?\]", line):
            current = (int(m[1]), m[2] or "")
        elif "Sent successfully" in line and current is not None:
            served.append(current)
    return served


def data_fingerprint(node: dict, site_dir: Path) -> str | None:
    """SHA-256 of the site's data files (the data cache's key; None without a data-path)."""
    from fedshield.client.data_cache import content_hash, source_files

    if not node.get("data-path"):
        return None
    path = Path(str(node["data-path"])).expanduser()
    path = path if path.is_absolute() else site_dir / path
    files = source_files(path.resolve())
    return content_hash(files, path.resolve()) if files else None


def _worker_status(state: dict | None) -> str | None:
    """The long-lived ClientApp worker under ``fedshield site run``: running (pid, restarts),
    not running, or None where the supervisor runs none."""
    from fedshield.site_supervisor import alive

    if not state or not state.get("worker_command"):
        return None
    pid = state.get("worker_pid")
    restarts = state.get("worker_restarts", 0)
    return (f"running (pid {pid}, restarts: {restarts})" if alive(pid)
            else f"not running (restarts: {restarts})")


def site_status(site_dir: str | Path, log_path: str | Path | None = None) -> dict:
    """What a partner's operator checks: is the SuperNode running and connected, the last round it
    served, the site's privacy spend (its ledger) and its data's fingerprint.

    "connected" means: running, and its latest start was accepted by the SuperLink (Flower logged
    ``SuperNode ID``) and has not ended; the coordinator's ``flwr supernode list`` has the
    SuperLink's own view."""
    from fedshield.site_supervisor import LOG_FILE, alive, read_state

    site_dir = Path(site_dir).resolve()
    s = read_site(site_dir)
    node = dict(s.get("node_config", {}))
    state = read_state(site_dir)
    log_file = Path(log_path) if log_path else site_dir / LOG_FILE
    log = _last_start(log_file.read_text(errors="replace")) if log_file.is_file() else ""
    running = state is not None and alive(state.get("supernode_pid"))
    node_id = None
    for line in log.splitlines():
        if "SuperNode ID:" in line:
            node_id = line.rsplit("SuperNode ID:", 1)[1].strip()
    if "code: 2004" in log:
        # Flower gives 2004 for both: an unknown key, and a restart while the SuperLink still
        # holds the previous connection (until two missed 30 s heartbeats; `site run` retries).
        connection = ("refused (code 2004): the coordinator has not registered node_key.pub, "
                      "or still holds this site's previous connection (it lapses within ~60 s)")
    elif state is None and not log:
        connection = "never started here (`fedshield site run` starts it)"
    elif state is not None and not running:
        connection = "not running"
    elif node_id is not None and "terminated" not in log[log.rfind("SuperNode ID:"):]:
        connection = f"connected (node id {node_id})"
    else:
        connection = "connecting"
    served = _rounds_served(log_file.read_text(errors="replace")) if log_file.is_file() else []
    ledger_dir = Path(str(node.get("ledger-dir", "ledger"))).expanduser()
    ledger_dir = ledger_dir if ledger_dir.is_absolute() else site_dir / ledger_dir
    spend: dict = {"ledger_dir": str(ledger_dir), "sites": []}
    if ledger_dir.is_dir():
        from fedshield.privacy.ledger import site_report

        try:
            spend = {"ledger_dir": str(ledger_dir), **site_report(ledger_dir)}
        except Exception as exc:  # noqa: BLE001 (a damaged ledger is reported, not a crash)
            spend["problem"] = str(exc)
    return {"site": s.get("name", site_dir.name), "connection": connection,
            "supervisor": state, "restarts": (state or {}).get("restarts", 0),
            "client_process": client_process(s, site_dir),
            "worker": _worker_status(state),
            "last_round_served": ({"run": served[-1][0], "round": served[-1][1]}
                                  if served else None),
            "rounds_served": len(served), "privacy": spend,
            "max_epsilon": node.get("max-epsilon"),
            "data_path": node.get("data-path") or None,
            "data_fingerprint": data_fingerprint(node, site_dir)}


# --- CLI ------------------------------------------------------------------------------------
site_app = typer.Typer(no_args_is_help=True, help="Set up and join a federation across sites.")


@site_app.command("init", epilog="Example: fedshield site init deploy/ --sites 3")
def init_command(
    out_dir: str = typer.Argument(..., help="new folder for the coordinator and site kits"),
    sites: int = typer.Option(3, "--sites", help="number of partner sites"),
    host: str = typer.Option("127.0.0.1", "--host", help="address partners use for the SuperLink"),
    port: int = typer.Option(9093, "--port", help="SuperLink port (HTTPS)"),
    insecure: bool = typer.Option(False, "--insecure",
                                  help="no TLS, no node authentication (local tests only)"),
) -> None:
    """Create certificates, SuperNode keys, configs and the exact commands for every side."""
    if insecure:
        console.print("[bold red]WARNING: --insecure: traffic is NOT encrypted and SuperNodes are "
                      "NOT authenticated; anyone reaching the port can join. Local tests only.[/]")
    try:
        layout = init_sites(out_dir, sites, host, port, insecure)
    except ConfigError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"coordinator: {layout.coordinator / 'COMMANDS.md'}")
    for folder in layout.sites():
        console.print(f"{folder.name}: {folder / 'site.toml'} (send this folder to the partner)")


@site_app.command("register", epilog="Example: fedshield site register deploy/")
def register_command(
    out_dir: str = typer.Argument(..., help="the folder `fedshield site init` created"),
) -> None:
    """Register every site's public key with the running SuperLink."""
    try:
        for name, answer in register_sites(out_dir).items():
            console.print(f"{name}: {answer}")
    except ConfigError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from exc


@site_app.command("command", epilog="Example: fedshield site command deploy/site-1")
def command_command(
    site_dir: str = typer.Argument(..., help="a site folder with site.toml"),
) -> None:
    """Print the flower-supernode command for this site's site.toml (with its environment) and,
    with client_process = "long-lived", the ClientApp executor's command to run next to it."""
    try:
        print(_plain_commands(site_dir))
    except ConfigError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from exc


@site_app.command("run", epilog="Example: fedshield site run deploy/site-1")
def run_command(
    site_dir: str = typer.Argument(..., help="a site folder with site.toml"),
) -> None:
    """Run this site's SuperNode (and its long-lived ClientApp executor) and restart them when
    they fail (logs/supernode.log)."""
    from fedshield.site_supervisor import LOG_FILE, supervise

    try:
        cmd = supernode_command(site_dir)
        worker = worker_command(site_dir)
        env = {**os.environ, **supernode_env(site_dir)}
    except ConfigError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    bin_dir = str(Path(sys.executable).parent)  # flower-superexec is started by name
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    cmd = [flwr_bin(cmd[0]), *cmd[1:]]
    console.print(f"SuperNode log: {Path(site_dir) / LOG_FILE}; stop with Ctrl-C or SIGTERM")
    raise typer.Exit(supervise(cmd, env, Path(site_dir), worker=worker))


@site_app.command("status", epilog="Example: fedshield site status deploy/site-1 --json")
def status_command(
    site_dir: str = typer.Argument(..., help="a site folder with site.toml"),
    log: str = typer.Option("", "--log", help="the SuperNode's log (default logs/supernode.log)"),
    json_out: bool = typer.Option(False, "--json", help="print the status as JSON"),
) -> None:
    """Is the SuperNode connected, the last round it served, the privacy spend, the data."""
    import json

    try:
        st = site_status(site_dir, log or None)
    except ConfigError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    if json_out:
        print(json.dumps(st, indent=2, default=str))
        return
    last = st["last_round_served"]
    lines = [f"site {st['site']}: SuperNode {st['connection']} (restarts: {st['restarts']})",
             f"client process: {st['client_process']}"
             + (f", worker {st['worker']}" if st["worker"] else ""),
             "last round served: " + (f"run {last['run']}, round {last['round']} "
                                      f"({st['rounds_served']} in the log)"
                                      if last else "none yet")]
    for site in st["privacy"].get("sites", []):
        lines.append(f"privacy spend of {site['site']}: epsilon {site['total_epsilon']:.3f} over "
                     f"{len(site['ledgers'])} federation(s) (cap {st['max_epsilon']}); "
                     f"complete: {site['complete']}")
    if not st["privacy"].get("sites"):
        lines.append(f"privacy spend: no ledger yet in {st['privacy']['ledger_dir']}")
    if "problem" in st["privacy"]:
        lines.append(f"privacy ledger PROBLEM: {st['privacy']['problem']}")
    fp = st["data_fingerprint"]
    lines.append(f"data: {st['data_path']} sha256 {fp}" if fp else
                 f"data: {st['data_path'] or 'simulation partition (no data-path)'}")
    print("\n".join(lines))
