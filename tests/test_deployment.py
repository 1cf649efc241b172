"""Deployment at separate sites: certificates, keys, the launcher, the guide, and end-to-end runs.

The slow tests run Flower for real on 127.0.0.1: a SuperLink with TLS, SuperNode authentication and
a SQLite database; three SuperNodes (breast, pneumonia, adrenal 3D) on the real MedMNIST files;
``flwr run`` judged by the run's final status (``flwr list``), never by the CLI's exit code, and by
the server's summary.json. The commands are the fenced ``bash`` blocks of docs/deployment.md, read
from the file and executed (settings replaced by temporary folders and free ports); every process
started is stopped by PID in teardown, also on failure.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `deploy` is a top-level folder of the checkout
    sys.path.insert(0, str(REPO_ROOT))

from deploy.certs import certificate_sans, make_superlink_certs, make_supernode_key  # noqa: E402
from inprocess import InProcessGrid  # noqa: E402
from deploy.launch import (  # noqa: E402
    FINAL_STATUSES, FLWR_ENV, Proc, SiteSpec, descendants, free_port, launcher_run_config, parse_site,
    run_config_keys, sites_from_scenario,
)

GUIDE = REPO_ROOT / "docs" / "deployment.md"
BIN = Path(sys.executable).parent
SITES = {"breastmnist": "breastmnist", "pneumoniamnist": "pneumoniamnist", "adrenalmnist3d": "adrenalmnist3d"}

# Every tagged block of the guide, and the test that executes it.
GUIDE_TAGS = {
    "env": "applied to every process below (_flwr_env)",
    "settings coordinator": "replaced by temporary values (guide_deployment)",
    "settings hospital": "replaced by temporary values (guide_deployment)",
    "settings researcher": "replaced by temporary values (guide_deployment)",
    "coordinator-certs": "guide_deployment",
    "coordinator-superlink": "guide_deployment",
    "hospital-key": "guide_deployment, test_unregistered_supernode_cannot_join",
    "connection": "guide_deployment",
    "coordinator-register": "guide_deployment, test_unregistered_supernode_cannot_join",
    "coordinator-unregister": "test_unregistered_supernode_cannot_join",
    "hospital-supernode": "guide_deployment, test_unregistered_supernode_cannot_join",
    "researcher-nodes": "guide_deployment",
    "researcher-run": "test_guide_end_to_end_three_sites_two_rounds",
    "researcher-status": "test_guide_end_to_end_three_sites_two_rounds",
    "hospital-plaintext": "test_plaintext_supernode_is_refused",
    "launcher": "test_launcher_survives_a_killed_supernode",
    "payload": "test_what_one_hospital_sends",
}
SETTINGS = {
    "coordinator": {"SUPERLINK_HOST", "SUPERLINK_PORT", "COORD", "MEDMNIST_DATA"},
    "hospital": {"SUPERLINK", "CA_CERT", "SITE_DIR", "DATASET", "DATA_DIR", "SUPERNODE_PORT"},
    "researcher": {"FLWR_HOME", "CA_CERT", "SUPERLINK", "RUN_OUT"},
}
INLINE_VARS = {"PUBKEY", "NODE_ID", "RUN_ID", "WORKDIR", "HOME"}  # named where they are used


# ---- the guide ----------------------------------------------------------------------------------

_TAGGED = re.compile(r"<!-- test: (?P<tag>[^>]+?) -->\n```bash\n(?P<body>.*?)```", re.S)


def guide_blocks() -> dict[str, str]:
    text = GUIDE.read_text()
    blocks: dict[str, str] = {}
    for m in _TAGGED.finditer(text):
        assert m["tag"] not in blocks, f"two guide blocks tagged {m['tag']!r}"
        blocks[m["tag"]] = m["body"]
    return blocks


def guide_output_after(tag: str) -> str:
    """The ```text block that follows a tagged command block (its expected output)."""
    text = GUIDE.read_text()
    m = re.search(rf"<!-- test: {re.escape(tag)} -->\n```bash\n.*?```\s*\n```text\n(?P<out>.*?)```", text, re.S)
    assert m, f"no ```text output after the {tag!r} block"
    return m["out"].strip()


def exported(body: str) -> dict[str, str]:
    """Variables a settings block assigns (``export A=1 B=2  # comment``)."""
    out = {}
    for line in body.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("export "):
            for word in shlex.split(line[len("export "):]):
                k, _, v = word.partition("=")
                out[k] = v
    return out


def _flwr_env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(exported(guide_blocks()["env"]))
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_block(tag: str, env: dict[str, str], *, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    body = guide_blocks()[tag]
    res = subprocess.run(["bash", "-c", "set -euo pipefail\n" + body], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check:
        assert res.returncode == 0, f"guide block {tag!r} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
    return res


def start_block(tag: str, env: dict[str, str], log_path: Path) -> Proc:
    """Start a long-running guide command (one command) in its own session; stop it with Proc.stop()."""
    body = guide_blocks()[tag]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        popen = subprocess.Popen(["bash", "-c", "exec " + body.strip()], cwd=REPO_ROOT, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return Proc(tag, popen, log_path)


def wait_exit(proc: Proc, timeout: float) -> int | None:
    """Wait for a started block to exit on its own, recording its descendants meanwhile (Flower's
    detached SuperExec); reaping it lets the SuperExec see its parent gone. None on timeout."""
    deadline = time.monotonic() + timeout
    while proc.popen.poll() is None:
        proc.refresh()
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)
    return proc.popen.returncode


def _json_out(res: subprocess.CompletedProcess) -> dict:
    text = res.stdout
    return json.loads(text[text.index("{"):])


def test_every_guide_command_is_tagged_and_exercised():
    text = GUIDE.read_text()
    blocks = guide_blocks()
    assert text.count("```bash") == len(blocks), "every bash block of the guide must carry a <!-- test: ... --> tag"
    assert set(blocks) == set(GUIDE_TAGS), f"guide tags {sorted(blocks)} vs tests {sorted(GUIDE_TAGS)}"
    assert exported(blocks["env"]) == FLWR_ENV
    for role, names in SETTINGS.items():
        assert set(exported(blocks[f"settings {role}"])) == names, role
    defined = set().union(*SETTINGS.values(), INLINE_VARS, FLWR_ENV)
    for tag, body in blocks.items():
        used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", body))
        assert used <= defined, f"block {tag!r} uses undefined {sorted(used - defined)}"
    # only bash blocks hold commands; the rest is expected output
    assert set(re.findall(r"^```(\w+)", text, re.M)) <= {"bash", "text"}


# ---- certificates and keys (fast) -------------------------------------------------------------

def test_server_certificate_has_the_san_and_chains_to_the_ca(tmp_path):
    files = make_superlink_certs(tmp_path / "certs", ("127.0.0.1", "localhost", "coordinator.example.org"))
    assert sorted(certificate_sans(files.server_cert)) == ["127.0.0.1", "coordinator.example.org", "localhost"]
    for key in (files.ca_key, files.server_key):
        assert key.stat().st_mode & 0o077 == 0, f"{key} must not be readable by others"
    with pytest.raises(FileExistsError):
        make_superlink_certs(tmp_path / "certs")

    # a real TLS handshake: a client that trusts only ca.crt accepts 127.0.0.1 and localhost
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(n):
        for _ in range(n):
            conn, _ = listener.accept()
            with contextlib.suppress(ssl.SSLError, OSError):
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)

    t = threading.Thread(target=serve, args=(3,), daemon=True)
    t.start()
    client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    for name in ("127.0.0.1", "localhost"):
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=name) as tls:
            assert tls.version() is not None
            tls.send(b"x")
    with pytest.raises(ssl.SSLCertVerificationError), socket.create_connection(("127.0.0.1", port)) as raw:
        client_ctx.wrap_socket(raw, server_hostname="elsewhere.example.org")
    t.join(timeout=10)
    listener.close()


def test_supernode_keys_are_what_flower_reads(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
    from flwr.cli.supernode.register import try_load_public_key

    pair = make_supernode_key(tmp_path / "keys" / "breast", comment="medfl-breast")
    private = load_ssh_private_key(pair.private.read_bytes(), None)
    public = load_ssh_public_key(pair.public.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert pair.private.stat().st_mode & 0o077 == 0
    assert try_load_public_key(pair.public)  # flwr supernode register accepts it
    with pytest.raises(FileExistsError):
        make_supernode_key(pair.private)


# ---- launcher pieces (fast) -------------------------------------------------------------------

def test_sites_and_node_config():
    from flwr.common.config import parse_config_args

    from client.site import site_from_node_config as identity_from_node_config

    assert parse_site("breastmnist") == SiteSpec("breastmnist", "breastmnist", 28)
    assert parse_site("adrenalmnist3d@64") == SiteSpec("adrenalmnist3d-64", "adrenalmnist3d", 64)
    assert parse_site("ct=adrenalmnist3d@64") == SiteSpec("ct", "adrenalmnist3d", 64)
    for bad in ("breastmnist@27", "nosuchmnist", "breast mnist", "a=b=c"):
        with pytest.raises(ValueError):
            parse_site(bad)
    assert [s.dataset for s in sites_from_scenario(REPO_ROOT / "deploy" / "loopback.yaml")] == list(SITES)
    # the node config survives Flower's own parser and names the site
    site = SiteSpec("ct", "adrenalmnist3d", 64)
    parsed = parse_config_args([site.node_config(REPO_ROOT)])
    assert parsed == {"name": "ct", "dataset": "adrenalmnist3d", "size": 64, "data-dir": str(REPO_ROOT)}
    ident = identity_from_node_config(parsed)
    assert (ident.name, ident.dataset, ident.size) == ("ct", "adrenalmnist3d", 64)


def test_launcher_run_config_defaults(tmp_path):
    rc = launcher_run_config("num-server-rounds=2 min-train-nodes=2", scenario="deploy/loopback.yaml", n_sites=3,
                             out_dir=tmp_path / "out")
    assert run_config_keys(rc) == {"num-server-rounds", "min-train-nodes", "scenario", "expected-nodes", "out-dir"}
    assert 'scenario="deploy/loopback.yaml"' in rc and "expected-nodes=3" in rc
    mine = launcher_run_config("out-dir='/x' expected-nodes=-1", scenario=None, n_sites=3, out_dir=tmp_path)
    assert mine == "out-dir='/x' expected-nodes=-1"


def test_run_config_keys_are_declared_and_empty_means_unset():
    """The SuperLink refuses run-config keys missing from [tool.flwr.app.config]; "" there = not set."""
    import tomllib

    from server.settings import RUN_CONFIG_FIELDS, settings_from_run_config

    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    wanted = set(RUN_CONFIG_FIELDS) | {"scenario", "num-server-rounds", "data-dir", "out-dir", "expected-nodes",
                                       "discovery-wait"}
    assert wanted <= set(declared), f"undeclared run-config keys: {sorted(wanted - set(declared))}"
    sim = settings_from_run_config(dict(declared))
    assert sim.expected_nodes == 3 and sim.scenario.model.preset == "default"  # quickstart's own values
    dep = settings_from_run_config({**declared, "model-preset": "tiny", "local-steps": 3}, deployment=True)
    assert dep.expected_nodes is None and dep.scenario.model.preset == "tiny"
    assert dep.scenario.training.local_steps == 3
    assert settings_from_run_config({**declared, "expected-nodes": 2}, deployment=True).expected_nodes == 2


# ---- the ServerApp's deployment path, in process (fast) -----------------------------------------

@pytest.fixture
def task_identity():
    from deploy.payload import task_identity as _posing

    with _posing():
        yield


def test_deployment_builds_the_model_for_the_discovered_sites(real_data_dir, tmp_path, task_identity):
    """The scenario lists 2D hospitals only; the connected sites are breast + a 3D site: the model,
    the messages and the evaluation follow the connected sites."""
    from medformer.model import make_config
    from medformer.pretext import PretextObjective, build_pretext_model
    from server.app import is_simulation
    from config import load_scenario
    from server.checkpoint import load_latest
    from server.federation import Federation, RunSettings

    scenario = load_scenario(REPO_ROOT / "simulations" / "configs" / "quickstart.yaml",
                             ["model.preset=tiny", "training.rounds=1", "training.local_steps=1",
                              "training.batch_size=16", "evaluation.linear_probe=false"])
    grid = InProcessGrid({7: {"dataset": "breastmnist", "data-dir": str(real_data_dir)},
                           9: {"dataset": "adrenalmnist3d", "data-dir": str(real_data_dir), "name": "ct"},
                           11: {"dataset": "breastmnst", "data-dir": str(real_data_dir)}})  # a typo
    assert not is_simulation(grid)
    settings = RunSettings(scenario=scenario, out_dir=tmp_path / "out", data_dir=str(real_data_dir),
                           expected_nodes=3, progress=False)
    summary = Federation(settings).run(grid)

    # the misconfigured node answers discovery with an error naming the key; the others go on
    assert set(summary["clients"]) == {"breastmnist", "ct"}
    [bad] = summary["dropouts"]
    assert bad["round"] == 0 and bad["site"] == "node-11" and "node-config dataset" in bad["reason"], bad
    assert summary["rounds_completed"] == 1
    obj = PretextObjective(scenario.pretext, mask_ratio=scenario.mask_ratio)
    cfg = make_config("tiny")
    expected = set(build_pretext_model(cfg, [("breastmnist", 28), ("adrenalmnist3d", 28)], obj).state_dict())
    arrays = load_latest(tmp_path / "out" / "checkpoints")["arrays"]
    assert set(arrays) == expected
    assert any(k.startswith("inputs.3d-1ch.") for k in arrays) and not any("retinamnist" in k for k in arrays)
    trains = {m.metadata.dst_node_id: set(m.content["arrays"].keys()) for m in grid.sent
              if m.metadata.message_type == "train"}
    assert trains[9] == set(build_pretext_model(cfg, [("adrenalmnist3d", 28)], obj).state_dict())
    assert not any(k.startswith("inputs.3d-1ch.") for k in trains[7])
    assert set(summary["downstream"]) <= {"breastmnist", "adrenalmnist3d"}


# ---- what one hospital sends (real data, in process) ----------------------------------------------

def test_what_one_hospital_sends(real_data_dir, capsys):
    """The guide's payload command, run in process: its table is the one in the guide; and each
    reply holds only the site's model tensors (exactly its keys, to the byte) and scalar metrics."""
    from deploy import payload

    argv = shlex.split(guide_blocks()["payload"].replace("\\\n", " ")
                       .replace("$MEDMNIST_DATA", str(real_data_dir.resolve())))
    assert argv[:3] == ["python", "-m", "deploy.payload"]
    assert payload.main(argv[3:]) == 0
    assert capsys.readouterr().out.strip() == guide_output_after("payload")

    reports = payload.inspect_sites([parse_site(s) for s in SITES], data_dir=real_data_dir, preset="tiny")
    by_site = {r.site: r for r in reports}
    for r in reports:
        assert r.records == {"arrays": "ArrayRecord", "metrics": "MetricRecord"}, r.records
        assert set(r.arrays) == set(r.keys_expected)
        assert r.reply_bytes == r.bytes_expected == r.bytes_sent_by_server < r.global_bytes
        assert all(dtype == "float32" for _, dtype, _ in r.arrays.values())
        n = int(r.metrics["num-examples"])
        image = tuple(r.train_images_shape[1:])
        for key, (shape, _, _) in r.arrays.items():
            assert n not in shape, f"{r.site}: {key}{shape} has a per-example axis"
            assert tuple(shape[-len(image):]) != image and tuple(shape[-len(image) + 1:]) != image[1:], key
        assert set(r.metrics) <= {"num-examples", "loss", "images-per-second", "seconds", "steps", "loss-mae",
                                  "loss-rotation"}
        assert all(isinstance(v, (int, float)) for v in r.metrics.values())
    # tiny preset: the numbers the end-to-end test finds in metrics.jsonl
    assert by_site["breastmnist"].reply_bytes == by_site["pneumoniamnist"].reply_bytes == 61_812
    assert by_site["adrenalmnist3d"].reply_bytes == 129_444 and reports[0].global_bytes == 145_752


# ---- end to end on loopback (slow) ---------------------------------------------------------------

class GuideDeployment:
    """The guide's deployment, brought up by its own commands: one coordinator, three hospitals."""

    def __init__(self, root: Path, data_dir: Path):
        self.root, self.data_dir = root, data_dir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.coord = {"SUPERLINK_HOST": "127.0.0.1", "SUPERLINK_PORT": str(self.port), "COORD": str(root / "coord"),
                      "MEDMNIST_DATA": str(data_dir), "FLWR_HOME": str(root / "coord" / "flwr-home")}
        self.researcher = {"FLWR_HOME": str(root / "researcher" / "flwr-home"),
                           "CA_CERT": str(root / "researcher" / "ca.crt"), "SUPERLINK": self.address,
                           "RUN_OUT": str(root / "coord" / "runs" / "e2e")}
        self.procs: list[Proc] = []
        self.node_ids: dict[str, int] = {}

    def hospital(self, name: str, dataset: str, site_dir: Path | None = None) -> dict[str, str]:
        site_dir = site_dir or self.root / "sites" / name
        return {"SUPERLINK": self.address, "CA_CERT": str(site_dir / "ca.crt"), "SITE_DIR": str(site_dir),
                "DATASET": dataset, "DATA_DIR": str(self.data_dir), "SUPERNODE_PORT": str(free_port()),
                "FLWR_HOME": str(site_dir / "flwr-home")}

    def env(self, role: dict, **extra) -> dict[str, str]:
        return _flwr_env(**role, **extra)

    def node_status(self) -> dict[int, str]:
        ans = _json_out(run_block("researcher-nodes", self.env(self.researcher)))
        assert ans["success"], ans
        return {int(n["node-id"]): n["status"] for n in ans["nodes"]}

    def up(self) -> None:
        run_block("coordinator-certs", self.env(self.coord))
        ca = Path(self.coord["COORD"]) / "certs" / "ca.crt"
        sl = start_block("coordinator-superlink", self.env(self.coord), self.root / "coord" / "superlink.log")
        self.procs.append(sl)
        deadline = time.monotonic() + 60
        while True:
            assert sl.running(), f"flower-superlink exited:\n{sl.log_tail()}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                break
            assert time.monotonic() < deadline, "flower-superlink does not listen"
            time.sleep(0.3)
        Path(self.researcher["CA_CERT"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ca, self.researcher["CA_CERT"])  # the coordinator hands out ca.crt
        run_block("connection", self.env(self.researcher))  # writes config.toml, lists the (no) SuperNodes
        for name in SITES:
            h = self.hospital(name, SITES[name])
            Path(h["SITE_DIR"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(ca, h["CA_CERT"])
            run_block("hospital-key", self.env(h))
            out = run_block("coordinator-register",
                            self.env(self.researcher, PUBKEY=Path(h["SITE_DIR"]) / "supernode-key.pub")).stdout
            m = re.search(r"SuperNode (\d+) registered", out)
            assert m, out
            self.node_ids[name] = int(m[1])
            self.procs.append(start_block("hospital-supernode", self.env(h), Path(h["SITE_DIR"]) / "supernode.log"))
        deadline = time.monotonic() + 120
        while True:
            status = self.node_status()
            if all(status.get(n) == "online" for n in self.node_ids.values()):
                break
            for p in self.procs:
                assert p.running(), f"{p.name} exited:\n{p.log_tail()}"
            assert time.monotonic() < deadline, f"SuperNodes not online: {status}"
            time.sleep(1.0)
        for p in self.procs:
            p.refresh()
        assert (Path(self.coord["COORD"]) / "state.db").stat().st_size > 0  # --database: state in SQLite
        log = sl.log_path.read_text()
        for api in ("Runtime", "Control", "Fleet"):  # one HTTPS port for all three
            assert f"Starting the SuperLink {api} HTTP API on 127.0.0.1:{self.port}" in log, log

    def close(self) -> None:
        for p in reversed(self.procs):  # SuperNodes first, then the SuperLink
            p.stop()


@pytest.fixture(scope="module")
def guide_deployment(tmp_path_factory, real_data_dir):
    # absolute: CI's $MEDMNIST_DATA is relative, and Flower's processes do not run in our folder
    dep = GuideDeployment(tmp_path_factory.mktemp("guide"), real_data_dir.resolve())
    try:
        dep.up()
        yield dep
    finally:
        dep.close()
        for p in dep.procs:
            for pid, start in [(p.pid, None), *p.known.items()]:
                assert not _alive(pid, start), f"{p.name}: pid {pid} survived teardown"


def _alive(pid: int, start) -> bool:
    from deploy.launch import _alive as alive

    return alive(pid, start)


def _site_key_bytes(preset: str, dataset: str) -> int:
    from medformer.model import make_config
    from medformer.pretext import PretextObjective, build_pretext_model

    model = build_pretext_model(make_config(preset), [(dataset, 28)], PretextObjective({"mae": 1.0, "rotation": 0.5}))
    return sum(v.numel() * v.element_size() for v in model.state_dict().values())


@pytest.mark.slow
def test_guide_end_to_end_three_sites_two_rounds(guide_deployment):
    dep = guide_deployment
    t0 = time.monotonic()
    ans = _json_out(run_block("researcher-run", dep.env(dep.researcher), timeout=300))
    assert ans.get("success") and ans.get("run-id"), ans
    run_id = ans["run-id"]
    out = Path(dep.researcher["RUN_OUT"])
    deadline = time.monotonic() + 480
    last_poll = 0.0
    while True:
        # poll the run's status: often once the summary is written, every 30 s before (each flwr call
        # costs a second of CPU on these 2 cores)
        if time.monotonic() - last_poll > (3 if (out / "summary.json").exists() else 30):
            last_poll = time.monotonic()
            listed = _json_out(run_block("researcher-status", dep.env(dep.researcher, RUN_ID=run_id)))
            assert listed["success"], listed
            run = listed["runs"][0]
            if run["status"] in FINAL_STATUSES:
                break
        assert time.monotonic() < deadline, f"run {run_id} still {run['status']}"
        for p in dep.procs:
            assert p.running(), f"{p.name} died during the run:\n{p.log_tail()}"
            p.refresh()
        time.sleep(1)
    print(f"\nrun {run_id}: {run['status']} after {time.monotonic() - t0:.0f} s")
    assert run["status"] == "finished:completed", run

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["dropouts"] == []
    assert summary["model"]["preset"] == "tiny"
    assert set(summary["clients"]) == set(SITES)  # discovered names (the node configs), not the scenario's
    for name, c in summary["clients"].items():
        assert c["dataset"] == SITES[name] and c["rounds_trained"] == 2
    assert set(summary["downstream"]) == set(SITES)

    from server.checkpoint import load_latest

    arrays = load_latest(out / "checkpoints")["arrays"]
    assert any(k.startswith("inputs.3d-1ch.") for k in arrays) and any(k.startswith("inputs.2d-1ch.") for k in arrays)
    assert {k.split(".")[1] for k in arrays if k.startswith("latents.")} == set(SITES)

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [x["round"] for x in lines] == [1, 2]
    global_bytes = summary["model"]["global_bytes"]
    report = {}
    for line in lines:
        for name, dataset in SITES.items():
            expected = _site_key_bytes("tiny", dataset)
            assert line["bytes_received"][name] == line["bytes_sent"][name] == expected, (line["round"], name)
            assert set(line["trained"][name]) <= {"num-examples", "loss", "images-per-second", "seconds", "steps",
                                                  "loss-mae", "loss-rotation"}
            report[name] = expected
    assert report["adrenalmnist3d"] > report["breastmnist"] == report["pneumoniamnist"]
    assert max(report.values()) < global_bytes
    print("bytes sent back per round: " + ", ".join(f"{n} {b:,}" for n, b in report.items())
          + f"; global model {global_bytes:,}")


@pytest.mark.slow
def test_unregistered_supernode_cannot_join(guide_deployment, tmp_path):
    """Two valid key pairs: one never registered, one registered and then unregistered (step 5).
    Neither SuperNode gets in."""
    dep = guide_deployment
    ca = Path(dep.coord["COORD"]) / "certs" / "ca.crt"
    intruders = {name: dep.hospital(name, "breastmnist", tmp_path / name) for name in ("never", "removed")}
    for h in intruders.values():
        Path(h["SITE_DIR"]).mkdir(parents=True)
        shutil.copy(ca, h["CA_CERT"])
        run_block("hospital-key", dep.env(h))
    out = run_block("coordinator-register", dep.env(dep.researcher, PUBKEY=Path(intruders["removed"]["SITE_DIR"])
                                                    / "supernode-key.pub")).stdout
    node_id = re.search(r"SuperNode (\d+) registered", out)[1]
    run_block("coordinator-unregister", dep.env(dep.researcher, NODE_ID=node_id))
    before = {n: s for n, s in dep.node_status().items() if n != int(node_id)}
    procs = {name: start_block("hospital-supernode", dep.env(h), tmp_path / f"{name}.log")
             for name, h in intruders.items()}
    try:
        codes = {name: wait_exit(proc, 90) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.stop()
    for name, proc in procs.items():
        log = proc.log_path.read_text()
        assert codes[name] == 1, (name, log)
        assert "Failed to activate SuperNode" in log, (name, log)
    after = dep.node_status()
    assert {n: s for n, s in after.items() if n != int(node_id)} == before
    assert after.get(int(node_id)) in (None, "unregistered"), after


@pytest.mark.slow
def test_plaintext_supernode_is_refused(guide_deployment, tmp_path):
    dep = guide_deployment
    h = dep.hospital("plaintext", "breastmnist", tmp_path / "plaintext")
    before = dep.node_status()
    proc = start_block("hospital-plaintext", dep.env(h), tmp_path / "plaintext.log")
    try:
        rc = wait_exit(proc, 120)
    finally:
        proc.stop()
    out = proc.log_path.read_text()
    assert rc is not None and rc != 0, out
    assert "could not establish a connection to the SuperLink" in out, out
    assert dep.node_status() == before


@pytest.mark.slow
def test_launcher_survives_a_killed_supernode(real_data_dir, tmp_path):
    """The guide's launcher command (3 sites, min-train-nodes=2); one SuperNode is SIGKILLed while it
    trains round 1: the run completes with the other two and the summary names the dropped site."""
    workdir = tmp_path / "launch"
    env = _flwr_env(WORKDIR=workdir, MEDMNIST_DATA=real_data_dir.resolve())
    body = guide_blocks()["launcher"]
    log_path = tmp_path / "launcher.log"
    victim = "pneumonia"
    with open(log_path, "wb") as out:
        launcher = subprocess.Popen(["bash", "-c", "exec " + body.strip()], cwd=REPO_ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    pids: dict[str, list[list[int]]] = {}  # name -> [[pid, start time], ...] (deploy.launch pids.json)
    try:
        site_log = workdir / "sites" / victim / "supernode.log"
        deadline = time.monotonic() + 300
        while not (site_log.exists() and "Receiving: train message" in site_log.read_text(errors="replace")):
            assert launcher.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the victim never received a train message"
            time.sleep(0.5)
        pids = json.loads((workdir / "pids.json").read_text())
        leader = pids[f"supernode:{victim}"][0][0]
        for pid in [leader, *descendants(leader)]:  # the SuperNode, its SuperExec and its ClientApp
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        rc = launcher.wait(timeout=420)
        output = log_path.read_text()
        assert rc == 0, output
        assert "finished:completed" in output, output
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGTERM)  # the launcher tears its processes down
            try:
                launcher.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait(timeout=30)
        if not pids and (workdir / "pids.json").exists():
            pids = json.loads((workdir / "pids.json").read_text())
        for ps in pids.values():
            for pid, start in ps:
                if _alive(pid, start):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
    time.sleep(1.0)
    survivors = [pid for ps in pids.values() for pid, start in ps if _alive(pid, start)]
    assert not survivors, f"processes survived the launcher's teardown: {survivors}"

    summary = json.loads((workdir / "out" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    dropped = [(d["round"], d["site"]) for d in summary["dropouts"]]
    assert (1, victim) in dropped, summary["dropouts"]
    assert {site for _, site in dropped} == {victim}
    for name in ("breast", "adrenal"):
        assert summary["clients"][name]["rounds_trained"] == 2
    assert summary["clients"][victim].get("rounds_trained", 0) == 0
    lines = [json.loads(x) for x in (workdir / "out" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert victim in lines[0]["dropped"] and set(lines[0]["trained"]) == {"breast", "adrenal"}
    assert set(lines[1]["trained"]) == {"breast", "adrenal"}
