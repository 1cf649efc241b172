"""Certificates for the SuperLink, authentication keys for SuperNodes, the consortium's bundle-signing key.

Coordinator::

    python -m deploy.certs superlink --out certs --san 127.0.0.1 --san localhost

writes ``certs/ca.crt`` (give it to every hospital and researcher), ``certs/ca.key`` (keep it
private), ``certs/server.pem`` + ``certs/server.key`` (the SuperLink's TLS certificate, signed by the
CA, valid for every ``--san``: an IP address or DNS name the sites use to reach the SuperLink).

Hospital::

    python -m deploy.certs supernode-key --out keys/breast

writes ``keys/breast`` (private, mode 0600, stays at the hospital) and ``keys/breast.pub`` (send it to
the coordinator, who registers it with ``flwr supernode register keys/breast.pub <connection>``).
The keys are ECDSA on NIST P-384 in OpenSSH format, which is what ``flower-supernode
--auth-supernode-private-key`` and ``flwr supernode register`` read (same as
``ssh-keygen -t ecdsa -b 384``).

Consortium (once; ideally on a machine other than the coordinator)::

    python -m deploy.certs signing-key --out signing/consortium

writes ``signing/consortium`` (private, mode 0600: whoever holds it decides what code every site
runs), ``signing/consortium.pub`` and ``signing/trusted-entities.yaml`` (``key id: public key``), the
file every hospital passes to ``flower-supernode --trusted-entities`` so that its SuperNode runs
only app bundles signed with this key (``deploy.bundle`` signs them). Ed25519 in OpenSSH format, as
Flower verifies them; the key id is derived from the public key, so a new key gets a new id.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class ServerCerts:
    """Paths of the files ``make_superlink_certs`` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class KeyPair:
    """Paths of a SuperNode's authentication key pair."""

    private: Path
    public: Path


@dataclass(frozen=True)
class SigningKey:
    """Paths of the consortium's bundle-signing key pair, its trusted-entities file and its key id."""

    private: Path
    public: Path
    trusted_entities: Path
    key_id: str


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write atomically through a fresh temporary file in the same folder.

    ``mkstemp`` creates it with O_EXCL and mode 0600, so nothing planted under a predictable name (a
    file, a symlink) is ever opened and a private key is never readable by others, not even briefly;
    public files are widened to 0644 before the rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not private:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_superlink_certs(out: str | os.PathLike, sans: tuple[str, ...] | list[str] = DEFAULT_SANS, *,
                         days: int = 365, common_name: str = "medformer-fl SuperLink",
                         overwrite: bool = False) -> ServerCerts:
    """Create a CA and a SuperLink server certificate signed by it.

    Args:
        out: folder for ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key``.
        sans: subject alternative names of the server certificate: every IP address or DNS name
            that SuperNodes and the ``flwr`` CLI use to reach the SuperLink (TLS checks it).
        days: validity of both certificates.
        common_name: the server certificate's CN (informational; clients check the SAN).
        overwrite: replace existing files (otherwise refuse, so a CA is never silently replaced).
    """
    out = Path(out)
    files = ServerCerts(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key")
    existing = [str(p) for p in vars(files).values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (pass overwrite=True / --force)")
    sans = list(dict.fromkeys(sans))  # a name given twice (e.g. $SUPERLINK_HOST = 127.0.0.1) once
    if not sans:
        raise ValueError("the server certificate needs at least one SAN (IP address or DNS name)")
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medformer-fl"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "medformer-fl consortium CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medformer-fl"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                     crl_sign=False, content_commitment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    _write(files.ca_key, _key_pem(ca_key), private=True)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(files.server_key, _key_pem(server_key), private=True)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return files


def make_supernode_key(out: str | os.PathLike, *, comment: str | None = None, overwrite: bool = False) -> KeyPair:
    """Create a SuperNode authentication key pair: ``out`` (private) and ``out.pub`` (public).

    ECDSA on NIST P-384 in OpenSSH format (Flower accepts NIST curves only).
    """
    private = Path(out)
    public = private.with_name(private.name + ".pub")
    existing = [str(p) for p in (private, public) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (pass overwrite=True / --force)")
    key = ec.generate_private_key(ec.SECP384R1())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, pub + (b" " + comment.encode() if comment else b"") + b"\n")
    return KeyPair(private, public)


def signing_key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """The id under which sites know a signing key: ``medfl-`` + 16 hex digits of SHA-256 of the raw key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(raw)
    return "medfl-" + digest.finalize().hex()[:16]


def load_signing_key(path: str | os.PathLike) -> tuple[ed25519.Ed25519PrivateKey, str]:
    """The consortium's private signing key (OpenSSH Ed25519) and its key id; ValueError names a bad file."""
    path = Path(path)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (OSError, ValueError) as e:
        raise ValueError(f"signing key {path}: {e}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"signing key {path} is not Ed25519 (make one with: python -m deploy.certs signing-key)")
    return key, signing_key_id(key.public_key())


def make_signing_key(out: str | os.PathLike, *, comment: str = "medformer-fl consortium",
                     overwrite: bool = False) -> SigningKey:
    """Create the consortium's bundle-signing key: ``out`` (private, 0600), ``out.pub`` and
    ``trusted-entities.yaml`` next to them (the sites' ``--trusted-entities`` file: key id -> public key)."""
    import yaml

    private = Path(out)
    files = (private, private.with_name(private.name + ".pub"), private.with_name("trusted-entities.yaml"))
    existing = [str(p) for p in files if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (pass overwrite=True / --force)")
    key = ed25519.Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    pub_line = f"{pub} {comment}" if comment else pub
    key_id = signing_key_id(key.public_key())
    _write(files[0], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()), private=True)
    _write(files[1], (pub_line + "\n").encode())
    _write(files[2], ("# Public keys allowed to sign medformer-fl app bundles: flower-supernode --trusted-entities\n"
                      + yaml.safe_dump({key_id: pub_line}, default_flow_style=False, width=1000)).encode())
    return SigningKey(*files, key_id)


def certificate_sans(path: str | os.PathLike) -> list[str]:
    """The SAN entries of a PEM certificate, as strings (IP addresses and DNS names)."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.certs", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("superlink", help="CA + SuperLink server certificate")
    s.add_argument("--out", required=True, help="folder for ca.crt, ca.key, server.pem, server.key")
    s.add_argument("--san", action="append", default=None,
                   help="IP address or DNS name the SuperLink is reached at (repeatable; "
                        f"default: {' '.join(DEFAULT_SANS)})")
    s.add_argument("--days", type=int, default=365)
    s.add_argument("--force", action="store_true", help="overwrite existing files")
    k = sub.add_parser("supernode-key", help="SuperNode authentication key pair (OpenSSH ECDSA P-384)")
    k.add_argument("--out", required=True, help="private key path; the public key is written to OUT.pub")
    k.add_argument("--comment", default=None, help="comment appended to the public key")
    k.add_argument("--force", action="store_true", help="overwrite existing files")
    g = sub.add_parser("signing-key", help="the consortium's app-bundle signing key (OpenSSH Ed25519) and the "
                                           "trusted-entities.yaml for the sites")
    g.add_argument("--out", required=True, help="private key path; writes OUT.pub and trusted-entities.yaml beside it")
    g.add_argument("--force", action="store_true", help="overwrite existing files")
    args = p.parse_args(argv)
    try:
        if args.cmd == "superlink":
            files = make_superlink_certs(args.out, tuple(args.san or DEFAULT_SANS), days=args.days,
                                         overwrite=args.force)
            print(f"CA certificate     {files.ca_cert}  (give to SuperNodes and flwr users)")
            print(f"CA key             {files.ca_key}  (keep private)")
            print(f"server certificate {files.server_cert}  SAN: {', '.join(certificate_sans(files.server_cert))}")
            print(f"server key         {files.server_key}  (keep private)")
        elif args.cmd == "signing-key":
            sk = make_signing_key(args.out, overwrite=args.force)
            print(f"signing key       {sk.private}  (keep private: it decides what code the sites run)")
            print(f"public key        {sk.public}  (key id {sk.key_id})")
            print(f"trusted entities  {sk.trusted_entities}  (give to every hospital: flower-supernode "
                  "--trusted-entities)")
        else:
            pair = make_supernode_key(args.out, comment=args.comment, overwrite=args.force)
            print(f"private key {pair.private}  (stays at the site)")
            print(f"public key  {pair.public}  (register: flwr supernode register {pair.public} <connection>)")
    except (FileExistsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
