"""A throwaway PKI for DICOM-over-TLS tests: a CA, and certificates it signs for 127.0.0.1.

RSA keys: the TLS 1.2 cipher suites of BCP 195, which DCMTK offers by default, are RSA ones."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pki:
    """Files of a CA and of two parties it signed ("server" and "client")."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))


def _certificate(subject: str, key: rsa.RSAPrivateKey, issuer: str,
                 issuer_key: rsa.RSAPrivateKey, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path, ca_name: str = "pacscli test CA") -> Pki:
    """Write a new CA and a server and a client certificate it signs, under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_cert = _certificate(ca_name, ca_key, ca_name, ca_key, ca=True)
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths = {}
    for party in ("server", "client"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = _certificate(f"pacscli test {party}", key, ca_name, ca_key, ca=False)
        (folder / f"{party}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, folder / f"{party}.key")
        paths[party] = (folder / f"{party}.pem", folder / f"{party}.key")
    return Pki(folder / "ca.pem", *paths["server"], *paths["client"])
