"""Build the app bundle (FAB), sign it with the consortium key and publish it into the registry folder.

SuperNodes started with ``--trusted-entities`` run a bundle only if it carries a valid signature by
one of those keys. Flower 1.42 attaches signatures to a bundle only when the SuperLink fetches it
"from Flower Hub" (``flwr run @publisher/name==version``); ``deploy.registry`` serves that endpoint
on the coordinator from the folder this module writes::

    <registry>/<publisher>/<name>/<version>/app.fab              the FAB, as flwr builds it
    <registry>/<publisher>/<name>/<version>/verifications.json   [{"public_key_id", "signature", "signed_at"}]

The signature is Flower's: Ed25519 over ``signed_at`` (8 bytes, big-endian) + SHA-256 of the FAB,
base64url without padding (``flwr.supercore.primitives.asymmetric_ed25519``). A version is
published once: the folder appears complete or not at all (written aside, then renamed), and a
version already published with different bytes is refused: bump ``version`` in pyproject.toml.

    python -m deploy.bundle --app . --key signing/consortium --registry registry
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FAB_FILE = "app.fab"
VERIFICATIONS_FILE = "verifications.json"
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")  # a Hub id part that is also a safe folder name
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")                # what `flwr run @app==x.y.z` accepts


class BundleError(RuntimeError):
    """The bundle cannot be built, signed or published (the message names what and why)."""


@dataclass(frozen=True)
class Published:
    """Where a signed bundle lies in the registry, and what ``flwr run`` calls it."""

    publisher: str
    name: str
    version: str
    folder: Path
    sha256: str
    key_id: str

    @property
    def app_spec(self) -> str:
        return f"@{self.publisher}/{self.name}=={self.version}"


def build(app_dir: str | os.PathLike) -> tuple[bytes, str, str, str]:
    """The FAB of ``app_dir`` as ``flwr run .`` would build it, and its publisher, name and version."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import get_fab_config, get_metadata_from_config

    try:
        fab = build_fab_from_disk(Path(app_dir))
    except Exception as e:  # flwr raises ValueError / click exceptions with the reason
        raise BundleError(f"cannot build the app bundle of {app_dir}: {' '.join(str(e).split())}") from None
    fab_id, version = get_metadata_from_config(get_fab_config(fab))
    publisher, _, name = fab_id.partition("/")
    for what, value in (("publisher", publisher), ("name", name)):
        if not _NAME.match(value):
            raise BundleError(f"app {what} {value!r} (pyproject.toml) is not a valid registry name")
    if not _VERSION.match(version):
        raise BundleError(f"app version {version!r} (pyproject.toml) must be x.y.z (digits), as flwr run @app==x.y.z "
                          "requires")
    return fab, publisher, name, version


def sign(fab: bytes, key_path: str | os.PathLike, *, signed_at: int | None = None) -> dict:
    """A verification record for ``fab``: ``{"public_key_id", "signature", "signed_at"}``."""
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign, sign_message

    from deploy.certs import load_signing_key

    key, key_id = load_signing_key(key_path)
    signed_at = int(time.time()) if signed_at is None else int(signed_at)
    signature = sign_message(key, create_message_to_sign(hashlib.sha256(fab).digest(), signed_at))
    return {"public_key_id": key_id, "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode(),
            "signed_at": signed_at}


def _fsynced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def publish(fab: bytes, verification: dict, registry: str | os.PathLike, publisher: str, name: str,
            version: str) -> Published:
    """Write ``<registry>/<publisher>/<name>/<version>/`` at once (a folder written aside, then renamed).

    Publishing the same bytes again keeps the existing version (and its signature); different
    bytes under a published version are refused.
    """
    parent = Path(registry) / publisher / name
    folder = parent / version
    digest = hashlib.sha256(fab).hexdigest()

    def existing() -> Published:
        try:
            old = (folder / FAB_FILE).read_bytes()
            key_id = json.loads((folder / VERIFICATIONS_FILE).read_text())[0]["public_key_id"]
        except (OSError, ValueError, LookupError) as e:
            raise BundleError(f"{folder} exists but is not a complete published bundle ({e}); remove it") from None
        if old != fab:
            raise BundleError(f"@{publisher}/{name}=={version} is already published in {folder} with different bytes "
                              f"(sha256 {hashlib.sha256(old).hexdigest()[:12]}, new {digest[:12]}); bump the version "
                              "in pyproject.toml")
        return Published(publisher, name, version, folder, digest, key_id)

    if folder.exists():
        return existing()
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=parent))
    try:
        _fsynced(staging / FAB_FILE, fab)
        _fsynced(staging / VERIFICATIONS_FILE, json.dumps([verification], indent=1).encode())
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, folder)  # fails if another publisher got there first: then compare
        except OSError:
            if not folder.exists():
                raise
            return existing()
        with contextlib.suppress(OSError):  # make the rename durable
            fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Published(publisher, name, version, folder, digest, verification["public_key_id"])


def build_and_publish(app_dir: str | os.PathLike, key_path: str | os.PathLike,
                      registry: str | os.PathLike) -> Published:
    """Build ``app_dir``'s FAB, sign it with ``key_path`` and publish it into ``registry``."""
    fab, publisher, name, version = build(app_dir)
    return publish(fab, sign(fab, key_path), registry, publisher, name, version)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("--app", default=".", help="the app folder (its pyproject.toml names publisher, name, version)")
    p.add_argument("--key", required=True, help="the consortium's private signing key (python -m deploy.certs "
                                                "signing-key)")
    p.add_argument("--registry", required=True, help="the registry folder deploy.registry serves")
    args = p.parse_args(argv)
    try:
        pub = build_and_publish(args.app, args.key, args.registry)
    except (BundleError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"published {pub.app_spec} in {pub.folder} (sha256 {pub.sha256[:12]}, signed by {pub.key_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
