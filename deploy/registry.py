"""The consortium's app registry: a loopback stand-in for the Flower Hub endpoint the SuperLink asks.

``flwr run @publisher/name==x.y.z <connection>`` makes a Flower 1.42 SuperLink ``POST
{FLWR_SUPERGRID_API_URL}/hub/fetch-fab`` with ``{"app_id", "app_version", "flwr_version"}``, expect
``{"fab_url", "verifications": [...]}`` and ``GET`` the ``fab_url``; only bundles fetched this way
carry signatures to the SuperNodes. This server answers both from the folder ``deploy.bundle``
writes (``<root>/<publisher>/<name>/<version>/{app.fab, verifications.json}``), so the SuperLink runs
with ``FLWR_SUPERGRID_API_URL=http://127.0.0.1:<port>``.

It listens on 127.0.0.1 only (the SuperLink is its only client), serves nothing but those two
files of well-formed app ids and versions inside its root (no ``..``, no dot-names, no symlinks
out), and answers an unknown app or version with a 404 in the Hub's JSON shape (``{"detail": ...}``,
with the available versions), which the SuperLink turns into a refused ``flwr run``. An unversioned
``@publisher/name`` gets the highest version.

    python -m deploy.registry --root registry --port 9095
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST = "127.0.0.1"
FAB_FILE = "app.fab"
VERIFICATIONS_FILE = "verifications.json"
_APP_ID = re.compile(r"^@(?P<publisher>[A-Za-z0-9_-][A-Za-z0-9_.-]*)/(?P<name>[A-Za-z0-9_-][A-Za-z0-9_.-]*)$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_FAB_PATH = re.compile(r"^/fab/(?P<publisher>[A-Za-z0-9_-][A-Za-z0-9_.-]*)/(?P<name>[A-Za-z0-9_-][A-Za-z0-9_.-]*)"
                       r"/(?P<version>\d+\.\d+\.\d+)/app\.fab$")
MAX_REQUEST = 64 * 1024


class Registry:
    """Published bundles under ``root``: look-ups confined to it."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def _inside(self, *parts: str) -> Path | None:
        path = self.root.joinpath(*parts).resolve()
        return path if path.is_relative_to(self.root) else None

    def versions(self, publisher: str, name: str) -> list[str]:
        app = self._inside(publisher, name)
        if app is None or not app.is_dir():
            return []
        found = [d.name for d in app.iterdir() if _VERSION.match(d.name) and self._servable(publisher, name, d.name)]
        return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))

    def _servable(self, publisher: str, name: str, version: str) -> bool:
        fab = self._inside(publisher, name, version, FAB_FILE)  # symlinks resolved: they must stay inside
        return fab is not None and fab.is_file()

    def bundle(self, publisher: str, name: str, version: str) -> Path | None:
        """The folder of a published version, or None."""
        if not (_VERSION.match(version) and self._servable(publisher, name, version)):
            return None
        return self._inside(publisher, name, version)


class _Handler(BaseHTTPRequestHandler):
    server_version = "medfl-registry"
    registry: Registry  # set on the subclass made by make_server

    def log_message(self, fmt, *args):  # one line per request on stderr
        sys.stderr.write(f"registry: {self.address_string()} {fmt % args}\n")

    def _json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        if self.path != "/hub/fetch-fab":
            return self._json(404, {"detail": f"no such endpoint {self.path}"})
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= MAX_REQUEST:
                raise ValueError("bad Content-Length")
            body = json.loads(self.rfile.read(length))
            app_id, version = body["app_id"], body.get("app_version")
            m = _APP_ID.match(app_id) if isinstance(app_id, str) else None
            if m is None or not (version is None or (isinstance(version, str) and _VERSION.match(version))):
                raise ValueError(f"bad app_id {app_id!r} or app_version {version!r}")
        except (ValueError, KeyError, TypeError) as e:
            return self._json(400, {"detail": f"bad request: {e}"})
        publisher, name = m["publisher"], m["name"]
        versions = self.registry.versions(publisher, name)
        if not versions:
            return self._json(404, {"detail": f"{app_id} is not published in this registry"})
        version = version or versions[-1]
        folder = self.registry.bundle(publisher, name, version)
        if folder is None:
            return self._json(404, {"detail": {"message": f"{app_id}=={version} is not published",
                                               "available_app_versions": versions}})
        try:
            verifications = json.loads((folder / VERIFICATIONS_FILE).read_text())
        except (OSError, ValueError):
            verifications = []  # unsigned: the sites will refuse it
        host, port = self.server.server_address[:2]
        self._json(200, {"fab_url": f"http://{host}:{port}/fab/{publisher}/{name}/{version}/{FAB_FILE}",
                         "verifications": verifications})

    def do_GET(self):
        m = _FAB_PATH.match(self.path)
        folder = self.registry.bundle(m["publisher"], m["name"], m["version"]) if m else None
        if folder is None:
            return self._json(404, {"detail": "not found"})
        data = (folder / FAB_FILE).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def make_server(root: str | Path, port: int = 0) -> ThreadingHTTPServer:
    """A registry server bound to 127.0.0.1:``port`` (0: a free one); ``serve_forever()`` runs it."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"registry root {root} is not a folder (publish into it with python -m deploy.bundle)")
    handler = type("Handler", (_Handler,), {"registry": Registry(root)})
    server = ThreadingHTTPServer((HOST, port), handler)
    server.daemon_threads = True
    return server


def serve_in_thread(root: str | Path, port: int = 0) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Start a registry in a daemon thread (tests); stop it with ``server.shutdown()``."""
    server = make_server(root, port)
    thread = threading.Thread(target=server.serve_forever, name="medfl-registry", daemon=True)
    thread.start()
    return server, thread


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.registry", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="the registry folder (python -m deploy.bundle --registry)")
    p.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    args = p.parse_args(argv)
    try:
        server = make_server(args.root, args.port)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"registry {Path(args.root).resolve()} on http://{HOST}:{server.server_address[1]} "
          f"(FLWR_SUPERGRID_API_URL for the SuperLink)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
