"""Unit tests for deploy.credentials: SANs, modes, no-overwrite, key formats."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from deploy import credentials as cr

REPO = Path(__file__).resolve().parents[2]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.credentials", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_ca_is_self_signed_ca_with_private_key_0600(tmp_path):
    cert_path, key_path = cr.create_ca(tmp_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.subject == cert.issuer
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _mode(key_path) == 0o600
    assert _mode(cert_path) == 0o644


def test_superlink_cert_default_sans_and_chain(tmp_path):
    cr.create_ca(tmp_path)
    cert_path, key_path = cr.create_superlink_cert(tmp_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)  # raises if the signature is wrong
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert _mode(key_path) == 0o600


def test_superlink_cert_custom_sans(tmp_path):
    cr.create_ca(tmp_path)
    cert_path, _ = cr.create_superlink_cert(
        tmp_path, hosts=["link.example.org", "fl.hospital.net"], ips=["10.0.0.5"])
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["link.example.org",
                                                     "fl.hospital.net"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5")]


def test_bad_ip_is_one_line_error(tmp_path):
    cr.create_ca(tmp_path)
    with pytest.raises(cr.CredentialError, match="not an IP address"):
        cr.create_superlink_cert(tmp_path, ips=["link.example.org"])


def test_supernode_keys_in_flower_formats(tmp_path):
    paths = cr.create_supernode_keys(tmp_path, "hospital-a")
    assert _mode(paths.private) == 0o600
    assert paths.private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY")
    assert paths.public.read_text().startswith("ecdsa-sha2-nistp384 ")
    private = cr.load_node_private_key(paths.private)
    public = cr.load_node_public_key(paths.public)
    assert isinstance(private.curve, ec.SECP384R1)
    assert private.public_key().public_numbers() == public.public_numbers()


def test_keys_load_with_flowers_own_loaders(tmp_path):
    """What `flwr supernode register` and flower-supernode actually call."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    paths = cr.create_supernode_keys(tmp_path, "hospital-a")
    assert try_load_public_key(paths.public)  # exits on a bad key
    assert uses_nist_ec_curve(cr.load_node_public_key(paths.public))


def test_no_overwrite_without_force(tmp_path):
    paths = cr.create_supernode_keys(tmp_path, "hospital-a")
    before = paths.private.read_bytes()
    with pytest.raises(cr.CredentialError, match="--force"):
        cr.create_supernode_keys(tmp_path, "hospital-a")
    assert paths.private.read_bytes() == before
    cr.create_supernode_keys(tmp_path, "hospital-a", force=True)
    assert paths.private.read_bytes() != before
    assert _mode(paths.private) == 0o600


def test_all_is_all_or_nothing(tmp_path):
    cr.create_supernode_keys(tmp_path, "supernode-2")  # a clash in the middle
    with pytest.raises(cr.CredentialError, match="supernode-2"):
        cr.create_all(tmp_path, nodes=["supernode-1", "supernode-2"])
    assert not (tmp_path / "ca.crt").exists()
    assert not (tmp_path / "supernode-1.key").exists()


def test_superlink_without_ca_names_the_fix(tmp_path):
    with pytest.raises(cr.CredentialError, match="deploy.credentials ca"):
        cr.create_superlink_cert(tmp_path)


def test_cli_all_and_refusal(tmp_path):
    out = tmp_path / "creds"
    res = _cli("all", "--out", str(out), "--nodes", "2", "--host", "link.test",
               "--ip", "192.0.2.7")
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["ca.crt", "ca.key", "superlink.crt", "superlink.key",
                     "supernode-1.key", "supernode-1.pub", "supernode-2.key",
                     "supernode-2.pub"]
    for key in out.glob("*.key"):
        assert _mode(key) == 0o600, key
    san = x509.load_pem_x509_certificate(
        (out / "superlink.crt").read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["link.test"]

    again = _cli("all", "--out", str(out), "--nodes", "2")
    assert again.returncode != 0
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "ca.crt" in lines[0] and "--force" in lines[0]
    assert _cli("all", "--out", str(out), "--nodes", "2", "--force").returncode == 0
