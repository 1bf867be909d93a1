"""Credentials for a deployed federation: CA, SuperLink TLS cert, SuperNode keys.

In the spirit of Flower's own ``generate_cert.sh`` / ``generate_auth_keys.sh``
scripts, written with ``cryptography`` so no openssl/ssh-keygen is needed::

    python -m deploy.credentials ca --out creds
    python -m deploy.credentials superlink --out creds --host link.example.org
    python -m deploy.credentials supernode --out creds --name hospital-a
    python -m deploy.credentials all --out creds --nodes 3 --host link.example.org

Formats (what flwr 1.42 expects):

* CA and SuperLink certificate: PEM X.509; private keys PEM (PKCS#8), 0600.
  The SuperLink serves TLS with ``--ssl-ca-certfile ca.crt --ssl-certfile
  superlink.crt --ssl-keyfile superlink.key``; SuperNodes and ``flwr`` verify it
  with ``ca.crt`` (``--root-certificates`` / ``root-certificates``).
* SuperNode auth key pair: ECDSA on NIST P-384. The private key is written in
  OpenSSH format (``flower-supernode --auth-supernode-private-key`` reads it with
  ``load_ssh_private_key``), the public key as an OpenSSH line
  ``ecdsa-sha2-nistp384 ...`` (``flwr supernode register`` reads it with
  ``load_ssh_public_key``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

DEFAULT_HOSTS = ("localhost",)
DEFAULT_IPS = ("127.0.0.1", "::1")
CA_DAYS = 3650
CERT_DAYS = 825
NODE_CURVE = ec.SECP384R1()

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
LINK_CERT = "superlink.crt"
LINK_KEY = "superlink.key"


class CredentialError(Exception):
    """A credential could not be written or read; the message names the fix."""


@dataclass(frozen=True)
class NodeKeyPaths:
    """Where one SuperNode's key pair lives."""

    private: Path
    public: Path


def node_key_paths(out: Path, name: str) -> NodeKeyPaths:
    """The private/public key files of SuperNode ``name`` under ``out``."""
    return NodeKeyPaths(out / f"{name}.key", out / f"{name}.pub")


# --------------------------------------------------------------------- writing
def _check_writable(paths: Sequence[Path], force: bool) -> None:
    """Refuse before writing anything if one target exists and not ``force``."""
    if force:
        return
    for path in paths:
        if path.exists():
            raise CredentialError(
                f"{path} already exists; refusing to overwrite it "
                "(pass --force to replace it, or choose another --out folder)"
            )


def _write(path: Path, data: bytes, secret: bool) -> None:
    """Write ``data`` atomically-ish; secrets get 0600 from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if secret else 0o644
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)  # umask may have narrowed/widened the mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (mode %o)", path, mode)


def _pem_private(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _load_pem_cert(path: Path) -> x509.Certificate:
    if not path.is_file():
        raise CredentialError(
            f"{path} not found; create the CA first with "
            "`python -m deploy.credentials ca --out <folder>`"
        )
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise CredentialError(f"{path} is not a PEM certificate ({err}); "
                              "recreate it with --force") from err


def _load_pem_key(path: Path):
    if not path.is_file():
        raise CredentialError(
            f"{path} not found; create the CA first with "
            "`python -m deploy.credentials ca --out <folder>`"
        )
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise CredentialError(f"{path} is not an unencrypted PEM private key "
                              f"({err}); recreate it with --force") from err


# ------------------------------------------------------------------ primitives
def create_ca(out: Path, *, common_name: str = "FedKD federation CA",
              days: int = CA_DAYS, force: bool = False) -> tuple[Path, Path]:
    """Create a self-signed CA (ECDSA P-384). Returns (cert, key) paths."""
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    _check_writable([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(key_path, _pem_private(key), secret=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), secret=False)
    return cert_path, key_path


def _san(hosts: Sequence[str], ips: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as err:
            raise CredentialError(
                f"--ip {ip!r} is not an IP address; pass hostnames with --host"
            ) from err
    if not names:
        raise CredentialError(
            "the SuperLink certificate needs at least one --host or --ip"
        )
    return x509.SubjectAlternativeName(names)


def create_superlink_cert(
    out: Path, *, hosts: Sequence[str] = DEFAULT_HOSTS,
    ips: Sequence[str] = DEFAULT_IPS, ca_dir: Path | None = None,
    days: int = CERT_DAYS, force: bool = False,
) -> tuple[Path, Path]:
    """Create the SuperLink's TLS server cert signed by the CA in ``ca_dir``.

    ``hosts``/``ips`` become the subjectAltName entries the SuperNodes and the
    ``flwr`` CLI check the address against. Returns (cert, key) paths.
    """
    ca_dir = ca_dir or out
    san = _san(hosts, ips)
    cert_path, key_path = out / LINK_CERT, out / LINK_KEY
    _check_writable([cert_path, key_path], force)
    ca_cert = _load_pem_cert(ca_dir / CA_CERT)
    ca_key = _load_pem_key(ca_dir / CA_KEY)
    key = ec.generate_private_key(ec.SECP384R1())
    cn = hosts[0] if hosts else ips[0]
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                       critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False,
                key_agreement=True, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(key_path, _pem_private(key), secret=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), secret=False)
    return cert_path, key_path


def create_supernode_keys(out: Path, name: str, *,
                          force: bool = False) -> NodeKeyPaths:
    """Create SuperNode ``name``'s ECDSA P-384 auth key pair (OpenSSH formats)."""
    if not name or "/" in name or name.startswith("."):
        raise CredentialError(
            f"SuperNode name {name!r} is not a plain file name; use e.g. hospital-a"
        )
    paths = node_key_paths(out, name)
    _check_writable([paths.private, paths.public], force)
    key = ec.generate_private_key(NODE_CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(paths.private, private, secret=True)
    _write(paths.public, public + f" {name}\n".encode(), secret=False)
    return paths


def create_all(out: Path, *, nodes: Sequence[str],
               hosts: Sequence[str] = DEFAULT_HOSTS,
               ips: Sequence[str] = DEFAULT_IPS,
               force: bool = False) -> dict[str, Path]:
    """CA + SuperLink cert + one key pair per name in ``nodes`` into ``out``."""
    targets = [out / CA_CERT, out / CA_KEY, out / LINK_CERT, out / LINK_KEY]
    for name in nodes:
        paths = node_key_paths(out, name)
        targets += [paths.private, paths.public]
    _check_writable(targets, force)  # all-or-nothing: check before writing
    written: dict[str, Path] = {}
    written["ca_cert"], written["ca_key"] = create_ca(out, force=force)
    written["superlink_cert"], written["superlink_key"] = create_superlink_cert(
        out, hosts=hosts, ips=ips, force=force
    )
    for name in nodes:
        paths = create_supernode_keys(out, name, force=force)
        written[f"{name}.key"], written[f"{name}.pub"] = paths.private, paths.public
    return written


# ------------------------------------------------------------------- checking
def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a SuperNode private key the way flower-supernode does."""
    key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialError(f"{path} is not an EC private key; regenerate it")
    return key


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load a SuperNode public key the way ``flwr supernode register`` does."""
    key = serialization.load_ssh_public_key(path.read_bytes())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CredentialError(f"{path} is not an EC public key; regenerate it")
    return key


# ------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.credentials",
        description="Create the CA, SuperLink TLS certificate and SuperNode "
        "authentication keys for a deployed Flower federation.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", type=Path, required=True,
                       help="output folder (created if missing)")
        p.add_argument("--force", action="store_true",
                       help="overwrite existing keys/certificates")

    def sans(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", action="append", default=None,
                       help="DNS name in the SuperLink cert SAN (repeatable; "
                       "default: localhost)")
        p.add_argument("--ip", action="append", default=None,
                       help="IP address in the SuperLink cert SAN (repeatable; "
                       "default: 127.0.0.1 and ::1)")

    p_ca = sub.add_parser("ca", help="create the federation CA")
    common(p_ca)
    p_ca.add_argument("--cn", default="FedKD federation CA", help="CA common name")

    p_link = sub.add_parser("superlink", help="create the SuperLink TLS cert")
    common(p_link)
    sans(p_link)
    p_link.add_argument("--ca-dir", type=Path, default=None,
                        help="folder holding ca.crt/ca.key (default: --out)")

    p_node = sub.add_parser("supernode", help="create SuperNode auth key pairs")
    common(p_node)
    p_node.add_argument("--name", action="append", required=True,
                        help="SuperNode name, e.g. hospital-a (repeatable)")

    p_all = sub.add_parser("all", help="CA + SuperLink cert + N SuperNode keys")
    common(p_all)
    sans(p_all)
    group = p_all.add_mutually_exclusive_group()
    group.add_argument("--nodes", type=int, default=None,
                       help="number of SuperNodes (named supernode-1..N)")
    group.add_argument("--name", action="append", default=None,
                       help="SuperNode name (repeatable)")
    return parser


def _hosts_ips(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    if args.host is None and args.ip is None:
        return list(DEFAULT_HOSTS), list(DEFAULT_IPS)
    return list(args.host or []), list(args.ip or [])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.command == "ca":
            paths = create_ca(args.out, common_name=args.cn, force=args.force)
        elif args.command == "superlink":
            hosts, ips = _hosts_ips(args)
            paths = create_superlink_cert(args.out, hosts=hosts, ips=ips,
                                          ca_dir=args.ca_dir, force=args.force)
        elif args.command == "supernode":
            paths = []
            for name in args.name:
                pair = create_supernode_keys(args.out, name, force=args.force)
                paths += [pair.private, pair.public]
        else:
            hosts, ips = _hosts_ips(args)
            if args.name:
                names = list(args.name)
            else:
                names = [f"supernode-{i}" for i in range(1, (args.nodes or 2) + 1)]
            paths = list(create_all(args.out, nodes=names, hosts=hosts, ips=ips,
                                    force=args.force).values())
    except CredentialError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err.filename or args.out}: {err.strerror}; check the "
              "folder exists and is writable", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
