"""Deployment at separate sites: certificates, keys, signed bundles, the registry, the exposure
filter, the launcher, the guide, and end-to-end runs.

The slow tests run Flower for real on loopback, in the guide's locked-down configuration: the
consortium's signed bundle in a registry served on 127.0.0.1, a SuperLink behind ``deploy.superlink``
(TLS, SuperNode authentication, a SQLite database, confined run-config paths); three SuperNodes
(breast, pneumonia, adrenal 3D) with ``--trusted-entities`` and a privacy policy, on the real
MedMNIST files; ``flwr run`` judged by the run's final status (``flwr list``), never by the CLI's
exit code, and by the server's summary.json. The commands are the fenced ``bash`` blocks of
docs/deployment.md, read from the file and executed (settings replaced by temporary folders and
free ports); every process started is stopped by PID in teardown, also on failure.

"Another machine" on one machine: the SuperLink trusts the TCP peers 127.0.0.1 and ::1 (the
coordinator itself). The outsider tests run the guide's commands with ``tests/outsider/`` first on
PATH: its ``flwr`` is the real Flower CLI with ``socket.create_connection`` bound to the source
address 127.0.0.2, so the SuperLink sees a peer that is not the coordinator, as it would see a
hospital or anyone else on the network holding the public ``ca.crt``.
"""
from __future__ import annotations

import contextlib
import hashlib
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

from deploy.certs import (  # noqa: E402
    certificate_sans, load_signing_key, make_signing_key, make_superlink_certs, make_supernode_key,
)
from inprocess import InProcessGrid  # noqa: E402
from deploy.launch import (  # noqa: E402
    FINAL_STATUSES, FLWR_ENV, LaunchError, LocalDeployment, Proc, free_port, launcher_run_config, run_config_keys,
)
from deploy.sites import node_config, parse_site, sites_from_scenario  # noqa: E402
from config import Site as SiteSpec  # noqa: E402  (one Site type everywhere)
from tools.processes import descendants  # noqa: E402

GUIDE = REPO_ROOT / "docs" / "deployment.md"
BIN = Path(sys.executable).parent
OUTSIDER_BIN = REPO_ROOT / "tests" / "outsider"  # its `flwr` connects from 127.0.0.2 (see the module docstring)
REFUSED = "the Control API is reachable only from the coordinator"
SITES = {"breastmnist": "breastmnist", "pneumoniamnist": "pneumoniamnist", "adrenalmnist3d": "adrenalmnist3d"}

# Every tagged block of the guide, and the test that executes it.
GUIDE_TAGS = {
    "env": "applied to every process below (_flwr_env)",
    "settings coordinator": "replaced by temporary values (guide_deployment)",
    "settings hospital": "replaced by temporary values (guide_deployment)",
    "settings researcher": "replaced by temporary values (guide_deployment)",
    "coordinator-certs": "guide_deployment",
    "coordinator-signing-key": "guide_deployment",
    "coordinator-bundle": "guide_deployment",
    "coordinator-registry": "guide_deployment",
    "coordinator-superlink": "guide_deployment",
    "hospital-key": "guide_deployment, test_unregistered_supernode_cannot_join, "
                    "test_outsider_cannot_register_a_supernode",
    "connection": "guide_deployment, test_outsider_cannot_register_a_supernode",
    "coordinator-register": "guide_deployment, test_unregistered_supernode_cannot_join",
    "coordinator-unregister": "test_unregistered_supernode_cannot_join",
    "hospital-supernode": "guide_deployment, test_unregistered_supernode_cannot_join",
    "researcher-nodes": "guide_deployment",
    "researcher-run": "test_guide_end_to_end_three_sites_two_rounds",
    "researcher-status": "test_guide_end_to_end_three_sites_two_rounds, test_run_config_paths_are_confined, "
                         "test_sites_refuse_an_unsigned_bundle",
    "outsider-register": "test_outsider_cannot_register_a_supernode",
    "outsider-run": "test_outsider_cannot_submit_a_run",
    "researcher-confined": "test_run_config_paths_are_confined",
    "coordinator-unsigned": "test_sites_refuse_an_unsigned_bundle",
    "hospital-plaintext": "test_plaintext_supernode_is_refused",
    "launcher": "test_launcher_survives_a_killed_supernode",
    "payload": "test_what_one_hospital_sends",
}
SETTINGS = {
    "coordinator": {"SUPERLINK_HOST", "SUPERLINK_PORT", "REGISTRY_PORT", "COORD", "MEDMNIST_DATA", "MEDFL_RUNS_DIR",
                    "MEDFL_DATA_DIRS", "FLWR_SUPERGRID_API_URL"},
    "hospital": {"SUPERLINK", "CA_CERT", "SITE_DIR", "DATASET", "DATA_DIR", "SUPERNODE_PORT"},
    "researcher": {"FLWR_HOME", "CA_CERT", "SUPERLINK", "APP", "RUN_OUT"},
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


def test_key_files_are_0600_even_with_planted_temp_names(tmp_path, monkeypatch):
    """Keys are written through mkstemp (O_EXCL, 0600, a random name) and renamed: a file or symlink
    planted at a name an attacker could predict is never opened, and the umask does not matter."""
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    out = tmp_path / "keys"
    out.mkdir()
    planted = []
    for name in ("breast", "consortium", "trusted-entities.yaml", "consortium.pub", "breast.pub"):
        for trap in (f".{name}.tmp", f"{name}.tmp", f"{name}.new", f"{name}~"):
            (out / trap).symlink_to(victim)
            planted.append(out / trap)
        (out / f".{name}.").write_text("planted")  # the mkstemp prefix itself
        planted.append(out / f".{name}.")
    monkeypatch.setattr(os, "umask", os.umask)  # restored by monkeypatch: a umask of 0 would leave 0666 files
    old = os.umask(0)
    try:
        pair = make_supernode_key(out / "breast")
        sk = make_signing_key(out / "consortium")
        certs = make_superlink_certs(tmp_path / "certs")
    finally:
        os.umask(old)
    for key in (pair.private, sk.private, certs.ca_key, certs.server_key):
        st = key.lstat()
        assert not key.is_symlink() and key.is_file(), key
        assert st.st_mode & 0o777 == 0o600, (key, oct(st.st_mode))
    for public in (pair.public, sk.public, sk.trusted_entities, certs.ca_cert, certs.server_cert):
        assert public.stat().st_mode & 0o777 == 0o644, public
    assert victim.read_text() == "untouched"
    assert all(p.is_symlink() or p.read_text() == "planted" for p in planted)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()], "temporary files left"


def test_signed_bundle_verifies_as_a_supernode_checks_it(tmp_path):
    """The bundle deploy.bundle signs passes the very checks flower-supernode --trusted-entities runs
    (the SuperLink's formatting of the Hub's verifications, then the SuperNode's verification); a
    changed byte, another key, or no signature at all do not."""
    import yaml
    from flwr.supercore.fab import Fab
    from flwr.superlink.servicer.control.control_handlers import _format_verification
    from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities, _validate_public_keys_ed25519
    from flwr.supernode.start_client_internal import _verify_fab

    from deploy.bundle import build, sign

    sk = make_signing_key(tmp_path / "signing" / "consortium")
    key, key_id = load_signing_key(sk.private)
    assert key_id == sk.key_id and sk.private.stat().st_mode & 0o077 == 0
    trusted = _try_obtain_trusted_entities(sk.trusted_entities)  # what the SuperNode reads
    _validate_public_keys_ed25519(trusted)
    assert list(trusted) == [sk.key_id] == list(yaml.safe_load(sk.trusted_entities.read_text()))
    fab, publisher, name, version = build(REPO_ROOT)
    assert (publisher, name) == ("medformer-fl", "medformer-fl") and re.fullmatch(r"\d+\.\d+\.\d+", version)
    record = sign(fab, sk.private)
    assert set(record) == {"public_key_id", "signature", "signed_at"} and "=" not in record["signature"]

    def verified(content: bytes, records: list[dict]) -> bool:
        verifications = _format_verification(records)  # what the SuperLink stores for a Hub app
        assert verifications["valid_license"]
        return _verify_fab(Fab(hashlib.sha256(content).hexdigest(), content, verifications), trusted)

    assert verified(fab, [record])
    assert not verified(fab[:-1] + bytes([fab[-1] ^ 1]), [record])  # one bit of the bundle changed
    other = make_signing_key(tmp_path / "rogue" / "consortium")
    forged = sign(fab, other.private)
    assert not verified(fab, [forged])  # signed by a key the site does not trust
    assert not verified(fab, [{**forged, "public_key_id": sk.key_id}])  # ... even under the trusted key's id
    assert not verified(fab, [{**record, "signed_at": record["signed_at"] + 1}])  # the time is signed too


def test_publishing_is_atomic_and_refuses_other_bytes_under_a_version(tmp_path):
    from deploy.bundle import BundleError, publish, sign

    sk = make_signing_key(tmp_path / "consortium")
    registry = tmp_path / "registry"
    fab = b"PK fake bundle bytes"
    first = publish(fab, sign(fab, sk.private), registry, "medformer-fl", "medformer-fl", "1.2.3")
    folder = registry / "medformer-fl" / "medformer-fl" / "1.2.3"
    assert first.folder == folder and first.app_spec == "@medformer-fl/medformer-fl==1.2.3"
    assert (folder / "app.fab").read_bytes() == fab
    [record] = json.loads((folder / "verifications.json").read_text())
    assert record["public_key_id"] == sk.key_id
    again = publish(fab, sign(fab, sk.private, signed_at=1), registry, "medformer-fl", "medformer-fl", "1.2.3")
    assert again.sha256 == first.sha256 and json.loads((folder / "verifications.json").read_text()) == [record]
    with pytest.raises(BundleError, match=r"already published .* different bytes.*bump the version"):
        publish(b"other bytes", sign(b"other bytes", sk.private), registry, "medformer-fl", "medformer-fl", "1.2.3")
    assert (folder / "app.fab").read_bytes() == fab
    assert sorted(p.name for p in folder.parent.iterdir()) == ["1.2.3"], "no staging folder left behind"
    # a failure half-way leaves nothing a registry would serve
    with pytest.raises(TypeError):
        publish(b"x", {"not": {"json", "serialisable"}}, registry, "medformer-fl", "medformer-fl", "1.2.4")
    assert sorted(p.name for p in folder.parent.iterdir()) == ["1.2.3"]


def test_registry_serves_only_published_bundles(tmp_path):
    """The loopback registry answers the SuperLink's Hub request (checked with Flower's own client
    function), serves nothing outside its root, and 404s unknown apps and versions in the Hub's shape."""
    import urllib.error
    import urllib.request

    from flwr.supercore.utils import request_download_link

    from deploy.bundle import publish, sign
    from deploy.registry import serve_in_thread

    sk = make_signing_key(tmp_path / "consortium")
    root = tmp_path / "registry"
    for version, fab in (("0.1.0", b"bundle 0.1.0"), ("0.10.0", b"bundle 0.10.0"), ("0.9.0", b"bundle 0.9.0")):
        publish(fab, sign(fab, sk.private), root, "medformer-fl", "medformer-fl", version)
    (tmp_path / "secret").write_text("outside the registry")
    (root / "medformer-fl" / "medformer-fl" / "9.9.9").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "app.fab").write_text("outside the registry")

    server, thread = serve_in_thread(root)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        base = f"http://127.0.0.1:{port}"
        url, verifications, _ = request_download_link("@medformer-fl/medformer-fl", "0.1.0",
                                                      f"{base}/hub/fetch-fab", "fab_url")
        assert [v["public_key_id"] for v in verifications] == [sk.key_id]
        with urllib.request.urlopen(url) as r:
            assert r.read() == b"bundle 0.1.0"
        url, _, _ = request_download_link("@medformer-fl/medformer-fl", None, f"{base}/hub/fetch-fab", "fab_url")
        assert url.endswith("/0.10.0/app.fab")  # unversioned: the highest version, numerically
        with pytest.raises(ValueError, match=r"Available app versions for @medformer-fl/medformer-fl: "
                                             r"0\.1\.0, 0\.9\.0, 0\.10\.0"):
            request_download_link("@medformer-fl/medformer-fl", "2.0.0", f"{base}/hub/fetch-fab", "fab_url")
        with pytest.raises(ValueError, match="not found"):
            request_download_link("@someone/else", "0.1.0", f"{base}/hub/fetch-fab", "fab_url")
        with pytest.raises(ValueError, match="not found"):  # the symlinked version leads outside the root
            request_download_link("@medformer-fl/medformer-fl", "9.9.9", f"{base}/hub/fetch-fab", "fab_url")

        def status(method: str, path: str, body: dict | None = None) -> int:
            req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                assert json.loads(e.read())["detail"]
                return e.code

        for path in ("/fab/../secret", "/fab/medformer-fl/medformer-fl/0.1.0/../../../../secret",
                     "/fab/medformer-fl/medformer-fl/0.1.0/verifications.json", "/fab/%2e%2e/%2e%2e/secret",
                     "/fab/medformer-fl/medformer-fl/9.9.9/app.fab", "/", "/registry"):
            assert status("GET", path) == 404, path
        for app_id in ("@../..", "@./medformer-fl", "@medformer-fl/..", "medformer-fl/medformer-fl", 7):
            assert status("POST", "/hub/fetch-fab", {"app_id": app_id, "app_version": "0.1.0"}) in (400, 404), app_id
        assert status("POST", "/hub/fetch-fab", {"app_id": "@medformer-fl/medformer-fl",
                                                 "app_version": "../0.1.0"}) == 400
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# ---- the exposure filter (fast) -----------------------------------------------------------------

def _asgi_call(app, path: str, peer: str | None, *, method: str = "POST", raw_path: bytes | None = None,
               headers: list | None = None) -> tuple[int, bytes]:
    """Drive an ASGI app with one HTTP request (the scope uvicorn builds) and return status and body."""
    import asyncio

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "https", "path": path, "raw_path": raw_path if raw_path is not None else path.encode(),
             "query_string": b"", "root_path": "", "headers": headers or [(b"content-type", b"application/protobuf")],
             "client": (peer, 51234) if peer else None, "server": ("127.0.0.1", 9093)}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_exposure_filter_allows_fleet_and_health_only_to_other_peers():
    from deploy.superlink import ExposureFilter, parse_trusted

    async def inner(scope, receive, send):  # stands for the SuperLink: 200 for whatever reaches it
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"reached"})

    app = ExposureFilter(inner, parse_trusted(["10.0.8.0/24"]))
    public = ["/health", "/v1/fleet/get-run", "/v1/fleet/pull-messages", "/v1/fleet/activate-node"]
    refused = {
        "/v1/control/register-node": REFUSED, "/v1/control/start-run": REFUSED, "/v1/control/list-runs": REFUSED,
        "/v1/runtime/acquire-task": "runtime API is reachable only from the coordinator",
        "/v1/runtime/push-messages": "runtime API", "/docs": "only the Fleet API",
        "/openapi.json": "only the Fleet API",
        "/docs/oauth2-redirect": "Fleet API", "/": "Fleet API", "//v1/control/start-run": "Fleet API",
        "/v1/fleet/../control/start-run": "Fleet API", "/v1/fleet/./get-run": "Fleet API", "/v1/fleet": "Fleet API",
        "/v1/fleet/": "Fleet API", "/V1/CONTROL/start-run": "Fleet API", "/health/../v1/control/list-runs": "Fleet API",
        "/v1/fleet/get-run/../../control/start-run": "Fleet API", "/healthz": "Fleet API", "/v1/responses": "Fleet API",
    }
    for peer in ("127.0.0.2", "10.0.0.5", "192.168.1.7", "::ffff:10.0.0.5", "2001:db8::1", "::2", None):
        for path in public:
            assert _asgi_call(app, path, peer) == (200, b"reached"), (peer, path)
        for path, why in refused.items():
            status, body = _asgi_call(app, path, peer)
            assert status == 403 and why in json.loads(body)["detail"], (peer, path, body)
        # the router sees the decoded path; the raw one must pass too (percent-encoded dot segments, slashes)
        for raw in (b"/v1/fleet/%2e%2e/control/start-run", b"/v1/fleet/get-run%2f..%2f..%2fcontrol%2fstart-run",
                    b"/v1/fleet/get%2drun"):
            assert _asgi_call(app, "/v1/fleet/get-run", peer, raw_path=raw)[0] == 403, (peer, raw)
        # a forwarded-for header claiming loopback changes nothing: the TCP peer is judged
        assert _asgi_call(app, "/v1/control/start-run", peer, headers=[(b"x-forwarded-for", b"127.0.0.1")])[0] == 403
    for peer in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "10.0.8.7"):  # the coordinator and a --trusted-peer net
        for path in [*public, *refused]:
            assert _asgi_call(app, path, peer) == (200, b"reached"), (peer, path)
    with pytest.raises(ValueError, match="--trusted-peer 'coordinator' is not an IP address"):
        parse_trusted(["coordinator"])


def test_filter_is_installed_through_flowers_1_42_hook(monkeypatch):
    """deploy.superlink relies on flwr.superlink.main._get_middleware() calling
    flwr.superlink.extensions.get_middleware() when the SuperLink's app is created. This test builds
    the real app and fails if that hook moves (then deploy.superlink must be adapted)."""
    import flwr
    import flwr.superlink.extensions as extensions
    from flwr.superlink.main import create_app

    from deploy import superlink

    monkeypatch.setattr(extensions, "get_middleware", extensions.get_middleware)  # undone after the test
    with pytest.raises(RuntimeError, match="refusing to start an unfiltered SuperLink"):
        superlink.check_installed()  # not installed yet
    superlink.install(superlink.parse_trusted([]))
    superlink.check_installed()
    app = create_app()
    assert app.user_middleware[0].cls is superlink.ExposureFilter, (flwr.__version__, app.user_middleware)
    status, body = _asgi_call(app, "/v1/control/list-runs", "127.0.0.2")
    assert status == 403 and REFUSED in json.loads(body)["detail"]
    assert _asgi_call(app, "/v1/runtime/acquire-task", "127.0.0.2")[0] == 403
    assert _asgi_call(app, "/openapi.json", "127.0.0.2", method="GET")[0] == 403
    assert _asgi_call(app, "/openapi.json", "127.0.0.1", method="GET")[0] == 200  # the coordinator's own
    # the filter names every API this Flower serves: anything new outside /v1/fleet is refused by default
    paths = set(app.openapi()["paths"])
    assert {p for p in paths if superlink.PUBLIC_PATH.match(p)} == {p for p in paths if p.startswith("/v1/fleet/")} | {
        "/health"}


def test_superlink_wrapper_refuses_what_the_filter_cannot_watch(capsys):
    from deploy.superlink import bind_host_peer, check_flower_args, main

    base = ["--ssl-ca-certfile", "ca.crt", "--ssl-certfile", "s.pem", "--ssl-keyfile", "s.key",
            "--enable-supernode-auth"]
    check_flower_args(base)
    for extra, why in ((["--insecure"], "TLS"), (["--control-api-address", "0.0.0.0:9093"], "own port"),
                       (["--fleet-api-type=grpc-rere"], "own port"), (["--simulation"], "deployments")):
        with pytest.raises(ValueError, match=why):
            check_flower_args(base + extra)
    with pytest.raises(ValueError, match="--enable-supernode-auth is required"):
        check_flower_args(base[:-1])
    assert main(["--", *base[:-1]]) == 2
    assert capsys.readouterr().err.strip() == ("error: flower-superlink --enable-supernode-auth is required: "
                                               "without it the Fleet API registers any SuperNode that asks")
    assert main(["--trusted-peer", "nope", "--", *base]) == 2
    assert bind_host_peer(["--host", "10.0.0.5"]) == ["10.0.0.5"]
    assert bind_host_peer(["--host=0.0.0.0"]) == [] and bind_host_peer([]) == []


def test_launcher_is_locked_down_by_default(tmp_path):
    """What the launcher starts, without starting it: the filtered SuperLink with TLS, node auth and
    a database, confined run-config folders and the registry in its environment; SuperNodes with
    --trusted-entities; runs of the signed bundle."""
    dep = LocalDeployment(tmp_path / "w", tmp_path / "data")
    argv = dep.superlink_argv()
    assert argv[:3] == [sys.executable, str(REPO_ROOT / "deploy" / "superlink.py"), "--"]
    for opt in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth", "--database"):
        assert opt in argv, opt
    from deploy.superlink import check_flower_args

    check_flower_args(argv[3:])
    env = dep.superlink_env()
    assert env["FLWR_SUPERGRID_API_URL"] == dep.registry_url and dep.registry_url.startswith("http://127.0.0.1:")
    assert env["MEDFL_RUNS_DIR"] == str(dep.runs_dir) and env["MEDFL_DATA_DIRS"] == str(dep.data_dir)
    site = SiteSpec("breast", "breastmnist", 28)
    sn = dep.supernode_argv(site, port=9, trusted_entities=dep.site_trusted_entities("breast"))
    assert sn[sn.index("--trusted-entities") + 1] == str(tmp_path / "w" / "sites" / "breast" / "trusted-entities.yaml")
    assert (dep.signing / "consortium").stat().st_mode & 0o077 == 0
    with pytest.raises(LaunchError, match="no signed bundle published yet"):
        dep.run("num-server-rounds=1")


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
    parsed = parse_config_args([node_config(site, REPO_ROOT)])
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
    """The guide's deployment, brought up by its own commands: one locked-down coordinator (signing
    key, signed bundle, registry, filtered SuperLink), three hospitals with trusted entities and a
    privacy policy."""

    def __init__(self, root: Path, data_dir: Path):
        self.root, self.data_dir = root, data_dir
        self.port = free_port()
        self.registry_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        coord = root / "coord"
        self.runs_dir = coord / "runs"
        self.coord = {"SUPERLINK_HOST": "127.0.0.1", "SUPERLINK_PORT": str(self.port),
                      "REGISTRY_PORT": str(self.registry_port), "COORD": str(coord), "MEDMNIST_DATA": str(data_dir),
                      "MEDFL_RUNS_DIR": str(self.runs_dir), "MEDFL_DATA_DIRS": str(data_dir),
                      "FLWR_SUPERGRID_API_URL": f"http://127.0.0.1:{self.registry_port}",
                      "FLWR_HOME": str(coord / "flwr-home")}
        self.researcher = {"FLWR_HOME": str(root / "researcher" / "flwr-home"),
                           "CA_CERT": str(root / "researcher" / "ca.crt"), "SUPERLINK": self.address,
                           "APP": "", "RUN_OUT": str(self.runs_dir / "e2e")}
        self.procs: list[Proc] = []
        self.node_ids: dict[str, int] = {}
        self.site_logs: dict[str, Path] = {}

    @property
    def ca(self) -> Path:
        return Path(self.coord["COORD"]) / "certs" / "ca.crt"

    @property
    def trusted_entities(self) -> Path:
        return Path(self.coord["COORD"]) / "signing" / "trusted-entities.yaml"

    @property
    def superlink_log(self) -> Path:
        return self.root / "coord" / "superlink.log"

    @property
    def registry_log(self) -> Path:
        return self.root / "coord" / "registry.log"

    def hospital(self, name: str, dataset: str, site_dir: Path | None = None) -> dict[str, str]:
        site_dir = site_dir or self.root / "sites" / name
        return {"SUPERLINK": self.address, "CA_CERT": str(site_dir / "ca.crt"), "SITE_DIR": str(site_dir),
                "DATASET": dataset, "DATA_DIR": str(self.data_dir), "SUPERNODE_PORT": str(free_port()),
                "FLWR_HOME": str(site_dir / "flwr-home")}

    def hand_out(self, site_dir: Path) -> None:
        """What the coordinator gives a hospital: ca.crt and trusted-entities.yaml (both public)."""
        site_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.ca, site_dir / "ca.crt")
        shutil.copy(self.trusted_entities, site_dir / "trusted-entities.yaml")

    def outsider(self, root: Path) -> dict[str, str]:
        """Someone on another machine holding only the public ca.crt: its flwr connects from 127.0.0.2."""
        root.mkdir(parents=True)
        shutil.copy(self.ca, root / "ca.crt")
        return {"FLWR_HOME": str(root / "flwr-home"), "CA_CERT": str(root / "ca.crt"), "SUPERLINK": self.address,
                "SITE_DIR": str(root), "PATH": f"{OUTSIDER_BIN}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"}

    def env(self, role: dict, **extra) -> dict[str, str]:
        return _flwr_env(**role, **extra)

    def node_status(self) -> dict[int, str]:
        ans = _json_out(run_block("researcher-nodes", self.env(self.researcher)))
        assert ans["success"], ans
        return {int(n["node-id"]): n["status"] for n in ans["nodes"]}

    def runs(self) -> list[dict]:
        res = subprocess.run([str(BIN / "flwr"), "list", "medfl", "--format", "json"], env=self.env(self.researcher),
                             capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        ans = _json_out(res)
        assert ans["success"], ans
        return ans["runs"]

    def wait_run(self, run_id: str, timeout: float = 480, summary: Path | None = None) -> dict:
        """Poll the run's status (the guide's researcher-status): often once ``summary`` exists, every
        ``poll`` s before (each flwr call costs a second of CPU on these 2 cores)."""
        deadline = time.monotonic() + timeout
        last_poll, run = 0.0, {"status": "unknown"}
        while True:
            soon = summary is None or summary.exists()
            if time.monotonic() - last_poll > (3 if soon else 30):
                last_poll = time.monotonic()
                listed = _json_out(run_block("researcher-status", self.env(self.researcher, RUN_ID=run_id)))
                assert listed["success"], listed
                run = listed["runs"][0]
                if run["status"] in FINAL_STATUSES:
                    return run
            assert time.monotonic() < deadline, f"run {run_id} still {run['status']}"
            for p in self.procs:
                assert p.running(), f"{p.name} died during the run:\n{p.log_tail()}"
                p.refresh()
            time.sleep(1)

    def _wait_listening(self, proc: Proc, port: int) -> None:
        deadline = time.monotonic() + 60
        while True:
            assert proc.running(), f"{proc.name} exited:\n{proc.log_tail()}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            assert time.monotonic() < deadline, f"{proc.name} does not listen on {port}"
            time.sleep(0.3)

    def up(self) -> None:
        env = self.env(self.coord)
        run_block("coordinator-certs", env)
        run_block("coordinator-signing-key", env)
        published = run_block("coordinator-bundle", env).stdout
        m = re.search(r"^published (@\S+) in ", published, re.M)
        assert m, published
        self.researcher["APP"] = m[1]  # what the coordinator tells the researchers
        registry = start_block("coordinator-registry", env, self.registry_log)
        self.procs.append(registry)
        self._wait_listening(registry, self.registry_port)
        sl = start_block("coordinator-superlink", env, self.superlink_log)
        self.procs.append(sl)
        self._wait_listening(sl, self.port)
        Path(self.researcher["CA_CERT"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.ca, self.researcher["CA_CERT"])  # the coordinator hands out ca.crt
        run_block("connection", self.env(self.researcher))  # writes config.toml, lists the (no) SuperNodes
        for name in SITES:
            h = self.hospital(name, SITES[name])
            self.hand_out(Path(h["SITE_DIR"]))
            run_block("hospital-key", self.env(h))
            out = run_block("coordinator-register",
                            self.env(self.researcher, PUBKEY=Path(h["SITE_DIR"]) / "supernode-key.pub")).stdout
            m = re.search(r"SuperNode (\d+) registered", out)
            assert m, out
            self.node_ids[name] = int(m[1])
            self.site_logs[name] = Path(h["SITE_DIR"]) / "supernode.log"
            self.procs.append(start_block("hospital-supernode", self.env(h), self.site_logs[name]))
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
        assert "deploy.superlink: Control and runtime APIs reachable only from 127.0.0.1/32, ::1/128" in log, log

    def close(self) -> None:
        for p in reversed(self.procs):  # SuperNodes first, then the SuperLink, then the registry
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
    from tools.processes import alive

    return alive(pid, start)


def _site_key_bytes(preset: str, dataset: str) -> int:
    from medformer.model import make_config
    from medformer.pretext import PretextObjective, build_pretext_model

    model = build_pretext_model(make_config(preset), [(dataset, 28)], PretextObjective({"mae": 1.0, "rotation": 0.5}))
    return sum(v.numel() * v.element_size() for v in model.state_dict().values())


@pytest.mark.slow
def test_guide_end_to_end_three_sites_two_rounds(guide_deployment):
    """The happy path of the locked-down deployment: the researcher on the coordinator runs the
    consortium-signed bundle (fetched by the SuperLink from the registry) over TLS against three
    authenticated SuperNodes that accept signed bundles only and enforce their own privacy policy;
    two rounds complete."""
    dep = guide_deployment
    t0 = time.monotonic()
    assert re.fullmatch(r"@medformer-fl/medformer-fl==\d+\.\d+\.\d+", dep.researcher["APP"]), dep.researcher["APP"]
    ans = _json_out(run_block("researcher-run", dep.env(dep.researcher), timeout=300))
    assert ans.get("success") and ans.get("run-id"), ans
    run_id = ans["run-id"]
    out = Path(dep.researcher["RUN_OUT"])
    run = dep.wait_run(run_id, summary=out / "summary.json")
    print(f"\nrun {run_id}: {run['status']} after {time.monotonic() - t0:.0f} s")
    assert run["status"] == "finished:completed", run
    version = dep.researcher["APP"].rsplit("==", 1)[1]
    assert run["fab-id"] == "medformer-fl/medformer-fl" and run["fab-version"] == version, run
    # the SuperLink fetched the signed bundle from the registry; every site verified and ran it
    assert f'"GET /fab/medformer-fl/medformer-fl/{version}/app.fab HTTP/1.1" 200' in dep.registry_log.read_text()
    for name, log in dep.site_logs.items():
        text = log.read_text(errors="replace")
        assert "could not be verified" not in text and "Start `flwr-clientapp` process" in text, (name, text[-2000:])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["dropouts"] == []
    assert summary["model"]["preset"] == "tiny"
    assert set(summary["clients"]) == set(SITES)  # discovered names (the node configs), not the scenario's
    for name, c in summary["clients"].items():
        assert c["dataset"] == SITES[name] and c["rounds_trained"] == 2
        # the site's own policy (require-dp, max-epsilon 8, delta 1e-5): DP-SGD although the scenario asks none
        assert c["delta"] == 1e-5 and 0 < c["epsilon"] <= 8.0 * (1 + 1e-9), c
        ledger = json.loads((dep.root / "sites" / name / "privacy" / f"privacy-ledger-{name}.json").read_text())
        assert list(ledger["runs"]) == [str(run_id)] and ledger["runs"][str(run_id)]["history"], ledger
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
    intruders = {name: dep.hospital(name, "breastmnist", tmp_path / name) for name in ("never", "removed")}
    for h in intruders.values():
        dep.hand_out(Path(h["SITE_DIR"]))
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
def test_outsider_cannot_register_a_supernode(guide_deployment, tmp_path):
    """(a) Someone on another machine (flwr from 127.0.0.2) holding only the public ca.crt and a key
    pair of their own: the guide's connection check and `flwr supernode register` are refused with
    one line saying why; the SuperLink knows no new node. The raw APIs say the same: the runtime API
    (where an outsider could claim the ServerApp's task token), /docs and /openapi.json are refused,
    /health and the Fleet API answer (the Fleet API still demands a registered key)."""
    import httpx

    dep = guide_deployment
    outsider = dep.outsider(tmp_path / "outsider")
    before = dep.node_status()
    res = run_block("connection", dep.env(outsider), check=False)  # writes config.toml; `flwr supernode list` fails
    assert res.returncode != 0 and REFUSED in res.stdout + res.stderr, (res.stdout, res.stderr)
    run_block("hospital-key", dep.env(outsider))
    res = run_block("outsider-register", dep.env(outsider, PUBKEY=tmp_path / "outsider" / "supernode-key.pub"),
                    check=False)
    output = " ".join((res.stdout + res.stderr).replace("│", " ").split())  # unwrap the CLI's error box
    assert res.returncode == 1, output
    assert ("forbidden: the Control API is reachable only from the coordinator (run flwr there, or through an ssh -L "
            "tunnel)") in output, output
    assert dep.node_status() == before
    log = dep.superlink_log.read_text()
    assert re.search(r'127\.0\.0\.2:\d+ - "POST /v1/control/register-node HTTP/1\.1" 403', log), log[-3000:]

    transport = httpx.HTTPTransport(local_address="127.0.0.2", verify=str(dep.ca))
    with httpx.Client(transport=transport, base_url=f"https://{dep.address}", timeout=30) as c:
        proto = {"content-type": "application/protobuf"}
        for path in ("/v1/runtime/acquire-task", "/v1/runtime/pull-messages", "/v1/control/list-runs",
                     "//v1/control/list-runs", "/v1/fleet/%2e%2e/control/list-runs"):
            r = c.post(path, content=b"", headers=proto)
            assert r.status_code == 403 and r.json()["detail"].startswith("forbidden: "), (path, r.status_code, r.text)
        assert "runtime API is reachable only from the coordinator" in c.post("/v1/runtime/acquire-task", content=b"",
                                                                              headers=proto).json()["detail"]
        for path in ("/docs", "/openapi.json"):
            assert c.get(path).status_code == 403, path
        assert c.get("/health").status_code == 200
        assert c.post("/v1/fleet/get-run", content=b"", headers=proto).status_code == 401  # reached: no node key


@pytest.mark.slow
def test_outsider_cannot_submit_a_run(guide_deployment, tmp_path):
    """(b) The outsider submits the app folder as a run: refused, and the SuperLink has no new run."""
    dep = guide_deployment
    outsider = dep.outsider(tmp_path / "outsider")
    run_block("connection", dep.env(outsider), check=False)
    before = {r["run-id"] for r in dep.runs()}
    ans = _json_out(run_block("outsider-run", dep.env(outsider), timeout=300))
    assert ans["success"] is False and REFUSED in ans["error-message"], ans
    assert {r["run-id"] for r in dep.runs()} == before
    assert re.search(r'127\.0\.0\.2:\d+ - "POST /v1/control/start-run HTTP/1\.1" 403', dep.superlink_log.read_text())


@pytest.mark.slow
def test_run_config_paths_are_confined(guide_deployment, tmp_path):
    """(c) On the coordinator, a run config naming a path outside the coordinator's folders: the run
    fails before anything is read or written, and its status details name the key and the allowed
    folder (out-dir: the guide's command; scenario='/etc/passwd': the same command, another key)."""
    dep = guide_deployment
    elsewhere_existed = Path("/tmp/elsewhere").exists()
    cases = {"out-dir": ("out-dir='/tmp/elsewhere'", str(dep.runs_dir.resolve()), "$MEDFL_RUNS_DIR"),
             "scenario": ("scenario='/etc/passwd'", "/apps/medformer-fl.medformer-fl.", "$MEDFL_SCENARIO_DIRS")}
    command = guide_blocks()["researcher-confined"]
    assert "out-dir='/tmp/elsewhere'" in command
    for key, (setting, allowed, env_name) in cases.items():
        body = command.replace("out-dir='/tmp/elsewhere'", setting)
        res = subprocess.run(["bash", "-c", "set -euo pipefail\n" + body], cwd=REPO_ROOT, env=dep.env(dep.researcher),
                             capture_output=True, text=True, timeout=300, check=True, stdin=subprocess.DEVNULL)
        ans = _json_out(res)
        assert ans.get("success") and ans.get("run-id"), ans
        run = dep.wait_run(ans["run-id"], timeout=240)
        details = run["status-details"]
        assert run["status"] == "finished:failed", run
        assert f"run-config {setting}" in details and allowed in details and env_name in details, details
        print(f"\n{key}: {details}")
    assert Path("/tmp/elsewhere").exists() == elsewhere_existed, "the refused out-dir was created"


@pytest.mark.slow
def test_sites_refuse_an_unsigned_bundle(guide_deployment):
    """(d) On the coordinator (the Control API is open there), the app folder itself is submitted:
    an unsigned bundle. Every SuperNode (--trusted-entities) answers "The FAB could not be verified."
    without starting the ClientApp; no site joins, so no site trains and the run fails."""
    dep = guide_deployment
    before = {name: log.read_text(errors="replace") for name, log in dep.site_logs.items()}
    ledgers = {p: p.read_text() for p in (dep.root / "sites").glob("*/privacy/*.json")}
    ans = _json_out(run_block("coordinator-unsigned", dep.env(dep.researcher), timeout=300))
    assert ans.get("success") and ans.get("run-id"), ans
    run = dep.wait_run(ans["run-id"], timeout=240)
    assert run["status"] == "finished:failed" and "no site could join the federation" in run["status-details"], run
    for name, log in dep.site_logs.items():
        new = log.read_text(errors="replace")[len(before[name]):]
        assert "The FAB could not be verified." in new, (name, new)
        assert "Start `flwr-clientapp` process" not in new, (name, new)
    assert {p: p.read_text() for p in ledgers} == ledgers  # no site spent any privacy budget


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
