"""A local multi-site launcher: one coordinator and N hospital SuperNodes on loopback, locked down.

It does what the coordinator, each hospital and the researcher do in ``docs/deployment.md``, with
the same commands, on one machine:

1. a CA + server certificate (SAN 127.0.0.1, localhost), the consortium's bundle-signing key and
   its ``trusted-entities.yaml``, and one authentication key pair per site;
2. the app bundle built from the checkout, signed and published into ``<workdir>/registry``
   (``deploy.bundle``), served on 127.0.0.1 by ``deploy.registry``;
3. the SuperLink through ``deploy.superlink`` (only the Fleet API reachable from other addresses)
   with TLS, ``--enable-supernode-auth`` and a SQLite ``--database``, and in its environment
   ``FLWR_SUPERGRID_API_URL`` (the registry), ``MEDFL_RUNS_DIR`` (``<workdir>/out``: the only
   folder a run may write) and ``MEDFL_DATA_DIRS`` (the data folder: the only one it may read);
4. the ``flwr`` connection in ``$FLWR_HOME/config.toml`` (absolute ``root-certificates`` path) and
   ``flwr supernode register`` for each site's public key (from 127.0.0.1, the coordinator);
5. one ``flower-supernode`` per site with ``--root-certificates``, its private key,
   ``--trusted-entities`` (its copy of the consortium's file: it runs signed bundles only) and
   ``--node-config 'name="..." dataset="..." size=28 data-dir="..."'`` (own port, own FLWR_HOME);
6. optionally ``flwr run @medformer-fl/medformer-fl==<version> <connection>`` (the signed bundle),
   then polls ``flwr list --run-id`` until the run's final status (the CLI's exit code says nothing);
7. tears every process down by PID (process group and recorded descendants), also on failure,
   Ctrl-C or SIGTERM.

Sites come from a scenario file (its hospitals) or from ``dataset@size`` items::

    python -m deploy.launch --workdir /tmp/medfl-sites --data-dir ../shared/data/medmnist \\
        --scenario deploy/loopback.yaml --run --run-config "num-server-rounds=2"
    python -m deploy.launch --workdir /tmp/medfl-sites --data-dir ../shared/data/medmnist \\
        --site breastmnist@28 --site adrenalmnist3d@28            # stays up until Ctrl-C

A workdir can be reused; its registry keeps each published version, so after changing the code
either bump ``version`` in pyproject.toml or start from a fresh ``--workdir``.

Exit codes: 0 the run ended ``finished:completed`` (or, without ``--run``, a clean shutdown);
1 the run failed, stopped or timed out, or a process died; 2 bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from config import Site
from deploy.sites import check_unique, node_config, parse_site, sites_from_scenario
from tools.processes import descendants, start_time, stop_tree

log = logging.getLogger("medfl.deploy")

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Set for every Flower process: no `uv sync` of the app's dependencies, no update check, no telemetry.
FLWR_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
}
FINAL_STATUSES = ("finished:completed", "finished:failed", "finished:stopped")


class LaunchError(RuntimeError):
    """A deployment step failed (the message names the step and the log file to read)."""


# ---- processes -----------------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    """A process we started: its Popen, log file and the descendants seen so far (pid -> start time)."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    known: dict[int, int | None] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def refresh(self) -> None:
        for p in descendants(self.pid):
            self.known.setdefault(p, start_time(p))

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the process, its group and its recorded descendants; SIGKILL what outlives ``timeout``."""
        if self.running():
            self.refresh()
        stop_tree(self.pid, known=self.known, timeout=timeout, sig=sig)
        self.popen.wait(timeout=10)
        return self.popen.returncode


# ---- the deployment ------------------------------------------------------------------------------

class LocalDeployment:
    """A locked-down coordinator and SuperNodes on one machine, each site with its own folder, port
    and FLWR_HOME.

    Folders under ``workdir``: ``certs/`` (CA, server cert), ``signing/`` (the consortium's signing
    key, ``trusted-entities.yaml``), ``registry/`` (signed bundles), ``keys/<site>`` (+ ``.pub``),
    ``superlink/`` (its cwd, ``state.db``, ``flwr-home``, log), ``out/`` (``MEDFL_RUNS_DIR``),
    ``sites/<site>/`` (flwr-home, its ``trusted-entities.yaml``, log),
    ``researcher/flwr-home/config.toml`` (the ``flwr`` connection).

    Use as a context manager: leaving it stops every process it started.
    """

    def __init__(self, workdir: str | os.PathLike, data_dir: str | os.PathLike, *, host: str = "127.0.0.1",
                 port: int | None = None, connection: str = "medfl-loopback", bin_dir: str | os.PathLike | None = None,
                 app_dir: str | os.PathLike = REPO_ROOT, scenario_dirs: list[str | os.PathLike] = ()):
        self.workdir = Path(workdir).resolve()
        self.data_dir = Path(data_dir).resolve()
        self.host, self.port = host, port or free_port(host)
        self.registry_port = free_port("127.0.0.1")
        self.connection = connection
        self.bin_dir = Path(bin_dir) if bin_dir else Path(sys.executable).parent
        self.app_dir = Path(app_dir).resolve()
        self.scenario_dirs = [Path(d).resolve() for d in scenario_dirs]
        self.certs = self.workdir / "certs"
        self.signing = self.workdir / "signing"
        self.registry_dir = self.workdir / "registry"
        self.runs_dir = self.workdir / "out"
        self.keys = self.workdir / "keys"
        self.superlink_dir = self.workdir / "superlink"
        self.researcher_home = self.workdir / "researcher" / "flwr-home"
        self.published = None  # deploy.bundle.Published, once the bundle is in the registry
        self.registry: Proc | None = None
        self.superlink: Proc | None = None
        self.supernodes: dict[str, Proc] = {}
        self.node_ids: dict[str, int] = {}
        self.sites: dict[str, Site] = {}

    # -- helpers --
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def env(self, flwr_home: Path, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(FLWR_ENV)
        env["FLWR_HOME"] = str(flwr_home)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"  # flower-superexec must be on PATH
        env.update(extra)
        return env

    def _bin(self, name: str) -> str:
        path = self.bin_dir / name
        return str(path) if path.exists() else name

    def _spawn(self, name: str, argv: list[str], *, cwd: Path, env: dict[str, str], log_path: Path) -> Proc:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cwd.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            out.write(f"$ {shlex.join(argv)}\n".encode())
            out.flush()
            popen = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("started %s (pid %d): %s", name, popen.pid, shlex.join(argv))
        return Proc(name, popen, log_path)

    def flwr(self, *args: str, timeout: float = 120.0, check: bool = False) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI as the researcher (their FLWR_HOME holds the connection)."""
        argv = [self._bin("flwr"), *args]
        res = subprocess.run(argv, cwd=self.app_dir, env=self.env(self.researcher_home), capture_output=True,
                             text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise LaunchError(f"{shlex.join(argv)} exited {res.returncode}: {res.stderr.strip() or res.stdout.strip()}")
        return res

    def flwr_json(self, *args: str, timeout: float = 120.0) -> dict:
        """A ``flwr ... --format json`` answer; its ``success`` field (not the exit code) says if it worked."""
        res = self.flwr(*args, "--format", "json", timeout=timeout)
        text = res.stdout.strip()
        try:
            return json.loads(text[text.index("{"):])
        except ValueError:
            raise LaunchError(f"flwr {' '.join(args)}: no JSON answer (exit {res.returncode}): "
                              f"{(res.stdout + res.stderr).strip()[-500:]}") from None

    # -- coordinator --
    def superlink_argv(self) -> list[str]:
        """``deploy.superlink`` (run as a script: it needs only Flower) wrapping flower-superlink's arguments."""
        return [sys.executable, str(REPO_ROOT / "deploy" / "superlink.py"), "--",
                "--ssl-ca-certfile", str(self.certs / "ca.crt"),
                "--ssl-certfile", str(self.certs / "server.pem"),
                "--ssl-keyfile", str(self.certs / "server.key"),
                "--enable-supernode-auth",
                "--database", str(self.superlink_dir / "state.db"),
                "--host", self.host, "--port", str(self.port)]

    def make_certs(self) -> None:
        from deploy.certs import make_superlink_certs

        if not (self.certs / "server.pem").exists():
            make_superlink_certs(self.certs, ("127.0.0.1", "localhost"))

    def make_signing_key(self) -> Path:
        """The consortium's signing key and ``trusted-entities.yaml`` (if missing); returns the YAML's path."""
        from deploy.certs import make_signing_key

        if not (self.signing / "consortium").exists():
            make_signing_key(self.signing / "consortium")
        return self.signing / "trusted-entities.yaml"

    def publish_bundle(self):
        """Build the app's FAB, sign it and publish it into the registry folder (``deploy.bundle``)."""
        from deploy.bundle import BundleError, build_and_publish

        self.make_signing_key()
        try:
            self.published = build_and_publish(self.app_dir, self.signing / "consortium", self.registry_dir)
        except (BundleError, ValueError) as e:
            raise LaunchError(f"publishing the signed bundle failed: {e}") from None
        return self.published

    @property
    def registry_url(self) -> str:
        return f"http://127.0.0.1:{self.registry_port}"

    def start_registry(self, timeout: float = 30.0) -> Proc:
        """``deploy.registry`` on 127.0.0.1 serving ``registry/`` (what FLWR_SUPERGRID_API_URL points at)."""
        self.registry_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, str(REPO_ROOT / "deploy" / "registry.py"), "--root", str(self.registry_dir),
                "--port", str(self.registry_port)]
        self.registry = self._spawn("registry", argv, cwd=self.registry_dir, env=self.env(self.workdir / "flwr-home"),
                                    log_path=self.workdir / "registry.log")
        self._wait_listening(self.registry, "127.0.0.1", self.registry_port, timeout)
        return self.registry

    def _wait_listening(self, proc: Proc, host: str, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not proc.running():
                raise LaunchError(f"{proc.name} exited {proc.popen.returncode}; see {proc.log_path}:\n"
                                  f"{proc.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
                return
            if time.monotonic() > deadline:
                raise LaunchError(f"{proc.name} did not listen on {host}:{port} in {timeout:.0f} s")
            time.sleep(0.3)

    def superlink_env(self) -> dict[str, str]:
        """The SuperLink's environment (its ServerApp inherits it): the registry it fetches signed
        bundles from, the only folders a run may write and read, the central evaluation's data."""
        extra = {"FLWR_SUPERGRID_API_URL": self.registry_url, "MEDFL_RUNS_DIR": str(self.runs_dir),
                 "MEDFL_DATA_DIRS": str(self.data_dir), "MEDMNIST_DATA": str(self.data_dir)}
        if self.scenario_dirs:
            extra["MEDFL_SCENARIO_DIRS"] = os.pathsep.join(map(str, self.scenario_dirs))
        return self.env(self.superlink_dir / "flwr-home", **extra)

    def start_superlink(self, timeout: float = 60.0) -> Proc:
        """Certificates if missing, then the filtered SuperLink; returns once it accepts TLS connections."""
        self.make_certs()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.superlink = self._spawn("superlink", self.superlink_argv(), cwd=self.superlink_dir,
                                     env=self.superlink_env(), log_path=self.superlink_dir / "superlink.log")
        self.write_connection()
        self._wait_listening(self.superlink, self.host, self.port, timeout)
        ans = self.flwr_json("supernode", "list", self.connection)
        if not ans.get("success"):
            raise LaunchError(f"flwr cannot reach the SuperLink over TLS: {ans.get('error-message')}")
        self.superlink.refresh()
        return self.superlink

    def connection_toml(self) -> str:
        """The researcher's ``$FLWR_HOME/config.toml``: the connection, root-certificates as an absolute path."""
        return (f'[superlink]\ndefault = "{self.connection}"\n\n'
                f'[superlink.{self.connection}]\naddress = "{self.address}"\n'
                f'root-certificates = "{(self.certs / "ca.crt").resolve()}"\n')

    def write_connection(self) -> Path:
        from deploy.certs import _write

        path = self.researcher_home / "config.toml"
        _write(path, self.connection_toml().encode())
        return path

    def register(self, site: Site) -> int:
        """Key pair for the site (if missing) and ``flwr supernode register KEY.pub <connection>``."""
        from deploy.certs import make_supernode_key

        key = self.keys / site.name
        if not key.exists():
            make_supernode_key(key, comment=f"medfl-{site.name}")
        ans = self.flwr_json("supernode", "register", str(key) + ".pub", self.connection)
        if not ans.get("success"):
            raise LaunchError(f"registering {site.name}'s key failed: {ans.get('error-message')}")
        self.node_ids[site.name] = int(ans["node-id"])
        return self.node_ids[site.name]

    # -- hospitals --
    def site_trusted_entities(self, label: str) -> Path:
        """The site's own copy of the consortium's ``trusted-entities.yaml`` (as a hospital holds it)."""
        from deploy.certs import _write

        path = self.workdir / "sites" / label / "trusted-entities.yaml"
        if not path.exists():
            _write(path, self.make_signing_key().read_bytes())
        return path

    def supernode_argv(self, site: Site, *, port: int, insecure: bool = False, key: Path | bool | None = None,
                       max_retries: int | None = None, max_wait_time: float | None = None,
                       trusted_entities: Path | None = None) -> list[str]:
        argv = [self._bin("flower-supernode"), "--superlink", self.address]
        argv += ["--insecure"] if insecure else ["--root-certificates", str(self.certs / "ca.crt")]
        if key is not False:  # key=False: no authentication key at all
            argv += ["--auth-supernode-private-key", str(key or self.keys / site.name)]
        if trusted_entities is not None:
            argv += ["--trusted-entities", str(trusted_entities)]
        argv += ["--node-config", node_config(site, self.data_dir), "--port", str(port)]
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries)]
        if max_wait_time is not None:
            argv += ["--max-wait-time", str(max_wait_time)]
        return argv

    def start_supernode(self, site: Site, *, register: bool = True, label: str | None = None,
                        signed_only: bool = True, **kw) -> Proc:
        """Start a site's ``flower-supernode`` (registering its key first unless ``register=False``);
        ``signed_only``: with ``--trusted-entities`` (it runs consortium-signed bundles only)."""
        label = label or site.name
        if signed_only:
            kw.setdefault("trusted_entities", self.site_trusted_entities(label))
        if register and site.name not in self.node_ids:
            self.register(site)
        elif kw.get("key") is None and not (self.keys / site.name).exists():
            from deploy.certs import make_supernode_key

            make_supernode_key(self.keys / site.name)
        home = self.workdir / "sites" / label
        proc = self._spawn(f"supernode:{label}", self.supernode_argv(site, port=free_port(self.host), **kw),
                           cwd=home, env=self.env(home / "flwr-home"), log_path=home / "supernode.log")
        self.supernodes[label] = proc
        self.sites[label] = site
        return proc

    def nodes(self) -> dict[int, str]:
        """Node id -> status (``registered``, ``online``, ``offline``, ...) as the SuperLink sees them."""
        ans = self.flwr_json("supernode", "list", self.connection)
        if not ans.get("success"):
            raise LaunchError(f"flwr supernode list failed: {ans.get('error-message')}")
        return {int(n["node-id"]): n["status"] for n in ans["nodes"]}

    def wait_online(self, names: list[str] | None = None, timeout: float = 90.0) -> None:
        """Wait until the sites' SuperNodes are online (connected and authenticated)."""
        names = list(self.node_ids) if names is None else names
        deadline = time.monotonic() + timeout
        while True:
            for n in names:
                proc = self.supernodes.get(n)
                if proc is not None and not proc.running():
                    raise LaunchError(f"SuperNode {n} exited {proc.popen.returncode}; see {proc.log_path}:\n"
                                      f"{proc.log_tail()}")
            status = self.nodes()
            if all(status.get(self.node_ids[n]) == "online" for n in names):
                for n in names:
                    self.supernodes[n].refresh()
                return
            if time.monotonic() > deadline:
                raise LaunchError(f"SuperNodes not online after {timeout:.0f} s: "
                                  f"{ {n: status.get(self.node_ids[n]) for n in names} }")
            time.sleep(1.0)

    def up(self, sites: list[Site], *, timeout: float = 120.0) -> None:
        """Signed bundle and registry, SuperLink, then every site (register + start), then wait until
        all are online."""
        check_unique(sites)
        self.publish_bundle()
        self.start_registry()
        self.start_superlink()
        for site in sites:
            self.register(site)
        for site in sites:
            self.start_supernode(site)
        self.wait_online([s.name for s in sites], timeout=timeout)

    # -- researcher --
    def run(self, run_config: dict | str | None = None, *, app: str | None = None) -> int:
        """``flwr run <app> <connection> --run-config ...``; returns the run id. ``app``: by default
        the signed bundle (``@publisher/name==version``, fetched by the SuperLink from the registry);
        an app folder submits an unsigned bundle, which SuperNodes with trusted entities refuse."""
        if app is None:
            if self.published is None:
                raise LaunchError("no signed bundle published yet (publish_bundle)")
            app = self.published.app_spec
        args = ["run", app, self.connection]
        if run_config:
            args += ["--run-config", run_config if isinstance(run_config, str) else format_run_config(run_config)]
        ans = self.flwr_json(*args, timeout=300)
        if not ans.get("success") or not ans.get("run-id"):
            raise LaunchError(f"flwr run was refused: {ans.get('error-message')}")
        return int(ans["run-id"])

    def run_status(self, run_id: int) -> dict:
        ans = self.flwr_json("list", self.connection, "--run-id", str(run_id))
        if not ans.get("success") or not ans.get("runs"):
            raise LaunchError(f"flwr list --run-id {run_id} failed: {ans.get('error-message')}")
        return ans["runs"][0]

    def wait_run(self, run_id: int, timeout: float = 900.0, poll: float = 20.0,
                 done_hint: Path | None = None) -> dict:
        """Poll ``flwr list --run-id`` until the run reaches a final status; returns its entry.

        Every ``poll`` seconds (each ``flwr`` call costs about a CPU second); every 2 s once
        ``done_hint`` (e.g. the run's summary.json) exists.
        """
        deadline = time.monotonic() + timeout
        last = -math.inf
        while True:
            soon = done_hint is not None and done_hint.exists()
            if time.monotonic() - last >= (2.0 if soon else poll):
                last = time.monotonic()
                run = self.run_status(run_id)
                if run["status"] in FINAL_STATUSES:
                    return run
            if self.superlink is not None and not self.superlink.running():
                raise LaunchError(f"the SuperLink died during run {run_id}; see {self.superlink.log_path}")
            if time.monotonic() > deadline:
                raise LaunchError(f"run {run_id} still {run['status']!r} after {timeout:.0f} s")
            for proc in [self.superlink, *self.supernodes.values()]:
                if proc is not None and proc.running():
                    proc.refresh()
            time.sleep(1.0)

    # -- teardown --
    def stop_supernode(self, label: str, sig: int = signal.SIGTERM) -> int | None:
        return self.supernodes[label].stop(sig)

    def pids(self) -> dict[str, list[list[int | None]]]:
        """Every process this deployment started or saw below what it started, by name: ``[pid, start
        time]`` pairs, the leader first (the start time tells a live process from a recycled PID)."""
        return {p.name: [[p.pid, start_time(p.pid)], *([pid, t] for pid, t in p.known.items())]
                for p in [self.superlink, self.registry, *self.supernodes.values()] if p is not None}

    def close(self) -> None:
        """Stop SuperNodes, the SuperLink, the registry; every process by PID, SIGKILL for what does not stop."""
        errors = []
        for proc in [*self.supernodes.values(), self.superlink, self.registry]:
            if proc is None:
                continue
            try:
                proc.stop()
            except Exception as e:  # keep stopping the others
                errors.append(f"{proc.name}: {e}")
        if errors:
            raise LaunchError("teardown: " + "; ".join(errors))

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_config_keys(text: str | None) -> set[str]:
    """Keys set by a ``--run-config "k=v k2='v2'"`` string."""
    return set(re.findall(r"(?:^|\s)([A-Za-z0-9_.-]+)\s*=", text or ""))


def launcher_run_config(text: str | None, *, scenario: str | None, n_sites: int, out_dir: Path,
                        app_dir: Path = REPO_ROOT) -> str:
    """The user's run config plus the launcher's defaults for what it knows: ``scenario`` (the
    scenario file it started the sites from), ``expected-nodes`` (the number of sites: no waiting
    for stragglers) and ``out-dir`` (``<workdir>/out``)."""
    given = run_config_keys(text)
    extra: dict = {}
    if scenario and "scenario" not in given:
        path = Path(scenario).resolve()
        try:  # inside the app: relative, read from the app bundle; else the coordinator's absolute path
            extra["scenario"] = str(path.relative_to(app_dir.resolve()))
        except ValueError:
            extra["scenario"] = str(path)
    if "expected-nodes" not in given:
        extra["expected-nodes"] = n_sites
    if "out-dir" not in given:
        extra["out-dir"] = str(out_dir)
    return " ".join(x for x in ((text or "").strip(), format_run_config(extra)) if x)


def format_run_config(values: dict) -> str:
    """``{"k": v}`` -> ``k=v ...`` with TOML values (strings quoted)."""
    def toml(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(str(v))
    return " ".join(f"{k}={toml(v)}" for k, v in values.items())


# ---- CLI -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.launch",
                                description="Start a locked-down SuperLink (TLS, node auth, SQLite, Control API from "
                                            "loopback only, signed bundles from a local registry) and one SuperNode "
                                            "per site on loopback; optionally run the app; tear down by PID.")
    p.add_argument("--workdir", required=True, help="folder for certs, keys, logs, state (created)")
    p.add_argument("--data-dir", default=os.environ.get("MEDMNIST_DATA"),
                   help="MedMNIST folder every site reads (default: $MEDMNIST_DATA)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scenario", help="scenario YAML: one site per hospital")
    src.add_argument("--site", action="append", help="dataset@size or name=dataset@size (repeatable)")
    p.add_argument("--port", type=int, default=None, help="SuperLink port (default: a free one)")
    p.add_argument("--connection", default="medfl-loopback", help="name of the flwr connection")
    p.add_argument("--run", action="store_true", help="flwr run the app, wait for its final status, tear down")
    p.add_argument("--run-config", default=None, help='e.g. "num-server-rounds=2 model-preset=\'tiny\'"')
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the run")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    try:
        if not args.data_dir or not Path(args.data_dir).is_dir():
            raise ValueError(f"--data-dir {args.data_dir!r} is not a folder (or set $MEDMNIST_DATA)")
        sites = sites_from_scenario(args.scenario) if args.scenario else [parse_site(s) for s in args.site]
        check_unique(sites)
    except Exception as e:  # bad input: one line
        print(f"error: {e}", file=sys.stderr)
        return 2

    def on_signal(signum, _frame):  # SIGTERM / SIGHUP: tear down like Ctrl-C
        raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    scenario_dirs = []
    if args.scenario and not Path(args.scenario).resolve().is_relative_to(REPO_ROOT):
        scenario_dirs.append(Path(args.scenario).resolve().parent)  # a scenario outside the app bundle
    dep = LocalDeployment(args.workdir, args.data_dir, port=args.port, connection=args.connection,
                          scenario_dirs=scenario_dirs)
    code = 1
    try:
        dep.up(sites)
        print(f"app {dep.published.app_spec} signed by {dep.published.key_id}, served by {dep.registry_url}",
              flush=True)
        print(f"SuperLink {dep.address} (TLS, node auth, Control API from loopback only, "
              f"{dep.superlink_dir / 'state.db'}); sites: "
              + ", ".join(f"{s.name}={s.dataset}@{s.size} (node {dep.node_ids[s.name]})" for s in sites), flush=True)
        print(f"flwr connection {dep.connection!r} in {dep.researcher_home / 'config.toml'}; e.g. "
              f"FLWR_HOME={dep.researcher_home} flwr supernode list {dep.connection}", flush=True)
        from deploy.certs import _write

        _write(dep.workdir / "pids.json", json.dumps(dep.pids(), indent=1).encode())  # read while we run
        if args.run:
            run_config = launcher_run_config(args.run_config, scenario=args.scenario, n_sites=len(sites),
                                             out_dir=dep.workdir / "out")
            run_id = dep.run(run_config)
            print(f"run {run_id} started (--run-config {run_config}); polling flwr list --run-id {run_id}", flush=True)
            out_dir = dep.workdir / "out" if "out-dir" not in run_config_keys(args.run_config) else None
            run = dep.wait_run(run_id, timeout=args.timeout,
                               done_hint=out_dir / "summary.json" if out_dir else None)
            details = run.get("status-details")
            print(f"run {run_id}: {run['status']}" + (f" ({details})" if details and details != "N/A" else ""),
                  flush=True)
            summary = dep.workdir / "out" / "summary.json"
            if "out-dir" not in run_config_keys(args.run_config) and summary.exists():
                print(f"summary: {summary}", flush=True)
            code = 0 if run["status"] == "finished:completed" else 1
        else:
            print("running; Ctrl-C (or SIGTERM to this process) stops every process", flush=True)
            while all(proc.running() for proc in [dep.superlink, *dep.supernodes.values()]):
                time.sleep(1.0)
            dead = [proc.name for proc in [dep.superlink, *dep.supernodes.values()] if not proc.running()]
            print(f"error: {', '.join(dead)} exited", file=sys.stderr)
    except KeyboardInterrupt:
        code = 0 if not args.run else 1
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
    finally:
        try:
            dep.close()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    return code


if __name__ == "__main__":
    sys.exit(main())
