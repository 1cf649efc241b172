"""``flower-superlink`` with only the Fleet API exposed to the network.

Flower 1.42 serves every SuperLink API on one HTTPS port: the Fleet API (``/v1/fleet/*``, what
SuperNodes talk to, each request signed with a registered node key under
``--enable-supernode-auth``), the Control API (``/v1/control/*``: ``flwr run``, ``flwr supernode
register``, ...; its authentication is a no-op without Flower's enterprise OIDC plugin), the
ServerApp runtime API (``/v1/runtime/*``, unauthenticated in the default subprocess isolation),
``/health``, ``/docs`` and ``/openapi.json``. Anyone who can reach the port could register a
SuperNode key or submit a run.

This wrapper starts the same ``flower-superlink`` with one more ASGI middleware, outermost:
a request whose TCP peer is not trusted may reach ``/health`` and ``/v1/fleet/<method>`` only;
everything else gets a 403 whose JSON ``detail`` (what ``flwr`` prints) says why. Trusted peers:
``127.0.0.1``, ``::1``, the ``--host`` the SuperLink listens on when it is one specific address
(the SuperLink's own SuperExec dials it, and by default Linux drops packets from outside that claim
a local source address), and every ``--trusted-peer``. The peer is the TCP source address; forwarded
headers are ignored (``FORWARDED_ALLOW_IPS`` is emptied), so do not put a reverse proxy on the
coordinator in front of it.

    python -m deploy.superlink [--trusted-peer ADDR ...] -- <flower-superlink arguments>

It refuses options that would open a door the filter does not watch (``--insecure``, the
deprecated gRPC ``--control-api-address`` / ``--fleet-api-*`` servers on their own ports,
``--simulation``) and requires ``--enable-supernode-auth`` (else the Fleet API registers anyone).

**Relies on a Flower 1.42 internal:** ``flwr.superlink.main._get_middleware()`` prepends
``flwr.superlink.extensions.get_middleware()`` (the SuperGrid extension hook) when it creates the
app. :func:`install` replaces that module attribute and :func:`check_installed` refuses to start
unless the hook delivers the filter; ``tests/test_deployment.py`` builds the real app and fails if
the hook moves.
"""
from __future__ import annotations

import argparse
import importlib
import ipaddress
import json
import os
import re
import sys
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALWAYS_TRUSTED = ("127.0.0.1", "::1")
#: What a non-trusted peer may reach: exactly these paths, matched against the decoded and the raw path.
PUBLIC_PATH = re.compile(r"^(?:/health|/v1/fleet/[a-z0-9-]+)$")
REFUSED_OPTIONS = {
    "--insecure": "the SuperLink must use TLS",
    "--control-api-address": "it starts a gRPC Control API on its own port, outside the filter",
    "--fleet-api-type": "it starts a legacy gRPC Fleet API on its own port, outside the filter",
    "--fleet-api-address": "it starts a legacy gRPC Fleet API on its own port, outside the filter",
    "--simulation": "this wrapper is for deployments",
}
REQUIRED_OPTIONS = {"--enable-supernode-auth": "without it the Fleet API registers any SuperNode that asks"}


def _reason(path: str) -> str:
    if path.startswith("/v1/control"):
        return "the Control API is reachable only from the coordinator (run flwr there, or through an ssh -L tunnel)"
    if path.startswith("/v1/runtime"):
        return "the ServerApp runtime API is reachable only from the coordinator"
    return "this SuperLink serves only the Fleet API (/v1/fleet/*) and /health to the network"


def _peer(scope: dict) -> IPAddress | None:
    """The TCP peer's address (IPv4-mapped IPv6 unmapped), or None when there is none or it is no IP."""
    client = scope.get("client")
    try:
        ip = ipaddress.ip_address(client[0])
    except (TypeError, ValueError, IndexError):
        return None
    return ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip


def parse_trusted(peers: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Addresses or networks (``10.0.0.7``, ``10.0.8.0/24``) -> networks; ValueError names a bad one."""
    out = []
    for p in [*ALWAYS_TRUSTED, *peers]:
        try:
            out.append(ipaddress.ip_network(p.strip(), strict=False))
        except ValueError:
            raise ValueError(f"--trusted-peer {p!r} is not an IP address or network") from None
    return tuple(dict.fromkeys(out))


class ExposureFilter:
    """ASGI middleware: non-trusted peers reach ``/health`` and ``/v1/fleet/<method>`` only.

    The allow-list is exact (no prefix match), checked on both the decoded ``path`` and the
    ``raw_path``, so ``//v1/control``, ``/v1/fleet/../control`` or ``/v1/fleet/%2e%2e/control`` are
    refused rather than left to the router's interpretation.
    """

    def __init__(self, app, trusted: Iterable[IPNetwork] = parse_trusted(())):
        self.app = app
        self.trusted = tuple(trusted)

    def is_trusted(self, scope: dict) -> bool:
        ip = _peer(scope)
        return ip is not None and any(ip.version == n.version and ip in n for n in self.trusted)

    @staticmethod
    def is_public(scope: dict) -> bool:
        raw = scope.get("raw_path")
        raw = raw.decode("latin-1") if isinstance(raw, bytes) else scope.get("path", "")
        return bool(PUBLIC_PATH.match(scope.get("path", ""))) and bool(PUBLIC_PATH.match(raw))

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self.is_public(scope) or self.is_trusted(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = json.dumps({"detail": f"forbidden: {_reason(scope.get('path', ''))}"}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def install(trusted: Iterable[IPNetwork]) -> None:
    """Make Flower's extension hook return the filter first (outermost), before any other middleware."""
    from starlette.middleware import Middleware

    extensions = importlib.import_module("flwr.superlink.extensions")
    previous = getattr(extensions, "_medfl_original_get_middleware", extensions.get_middleware)
    trusted = tuple(trusted)

    def get_middleware() -> tuple:
        return (Middleware(ExposureFilter, trusted=trusted), *previous())

    extensions._medfl_original_get_middleware = previous
    extensions.get_middleware = get_middleware


def check_installed() -> None:
    """RuntimeError unless the SuperLink's middleware stack starts with the filter (the hook is in place)."""
    main = importlib.import_module("flwr.superlink.main")
    stack = main._get_middleware() if hasattr(main, "_get_middleware") else []
    if not stack or stack[0].cls is not ExposureFilter:
        import flwr

        raise RuntimeError(f"Flower {flwr.__version__} no longer takes SuperLink middleware from "
                           "flwr.superlink.extensions.get_middleware (this wrapper was written for 1.42): "
                           "refusing to start an unfiltered SuperLink")


def _option(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def check_flower_args(args: list[str]) -> None:
    """ValueError naming the first flower-superlink option this lockdown does not allow, or a missing one."""
    given = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    for opt, why in REFUSED_OPTIONS.items():
        if opt in given:
            raise ValueError(f"flower-superlink {opt} is not allowed here: {why}")
    for opt, why in REQUIRED_OPTIONS.items():
        if opt not in given:
            raise ValueError(f"flower-superlink {opt} is required: {why}")


def bind_host_peer(args: list[str]) -> list[str]:
    """The ``--host`` the SuperLink listens on, when it is one specific address (its SuperExec dials it)."""
    host = _option(args, "--host")
    try:
        ip = ipaddress.ip_address(host) if host else None
    except ValueError:  # a DNS name: the coordinator adds its address with --trusted-peer if needed
        return []
    return [] if ip is None or ip.is_unspecified else [str(ip)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, flower_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    p = argparse.ArgumentParser(prog="python -m deploy.superlink",
                                usage="python -m deploy.superlink [--trusted-peer ADDR ...] -- <flower-superlink args>",
                                description="flower-superlink with the Control and runtime APIs reachable from the "
                                            "coordinator only (see the module docstring).")
    p.add_argument("--trusted-peer", action="append", default=[],
                   help="another address or network allowed to reach every API (repeatable; 127.0.0.1 and ::1 "
                        "always are)")
    args = p.parse_args(ours)
    try:
        check_flower_args(flower_args)
        trusted = parse_trusted([*args.trusted_peer, *bind_host_peer(flower_args)])
        if not os.environ.get("FLWR_SUPERGRID_API_URL"):
            print("warning: FLWR_SUPERGRID_API_URL is not set: `flwr run @publisher/app` would fetch bundles from "
                  "Flower's public Hub instead of the consortium registry", file=sys.stderr)
        os.environ["FORWARDED_ALLOW_IPS"] = ""  # uvicorn: judge the TCP peer, never an X-Forwarded-For header
        install(trusted)
        check_installed()
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("deploy.superlink: Control and runtime APIs reachable only from "
          + ", ".join(str(n) for n in trusted), file=sys.stderr, flush=True)
    sys.argv = ["flower-superlink", *flower_args]
    importlib.import_module("flwr.superlink.cli.flower_superlink").flower_superlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
