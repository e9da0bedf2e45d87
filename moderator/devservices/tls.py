"""A throwaway certificate authority for the secured Kafka and Redis the tests start.

``TestPki(directory)`` writes, as PEM files:

- ``ca.pem``: a self-signed CA certificate (what clients are told to trust);
- ``server.pem`` / ``server.key``: a server certificate for ``127.0.0.1`` and
  ``localhost`` (subject alternative names, so hostname checks pass) and its key;
- ``server-keystore.pem``: key and certificate in one file, the PEM keystore Kafka reads;
- ``client.pem`` / ``client.key``: a client certificate for mutual TLS.

``other_ca()`` makes an unrelated CA, for "untrusted certificate" tests. Keys are
P-256 (fast to make), unencrypted PKCS#8, readable by the owner only. Needs the
``cryptography`` package (the ``dev`` extra); nothing here runs in production.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from moderator.errors import MissingDependency

_VALID = dt.timedelta(days=2)


def _crypto():
    try:
        from cryptography import x509  # noqa: PLC0415
        from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - the dev extra has it
        raise MissingDependency("test certificates need the cryptography package "
                                "(pip install 'moderator[dev]')") from e
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TestPki:
    """A CA with one server and one client certificate, written under ``directory``."""

    __test__ = False  # not a pytest class, whatever its name

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    server_keystore: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def create(cls, directory: Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
               client_name: str = "moderator") -> TestPki:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ca_key, ca = _make_ca("moderator test CA")
        files = {
            "ca_cert": _write(directory / "ca.pem", _cert_pem(ca)),
        }
        server_key, server = _make_leaf(ca_key, ca, hosts[0], hosts, server=True)
        files["server_cert"] = _write(directory / "server.pem", _cert_pem(server) + _cert_pem(ca))
        files["server_key"] = _write(directory / "server.key", _key_pem(server_key), private=True)
        files["server_keystore"] = _write(directory / "server-keystore.pem",
                                          _key_pem(server_key) + _cert_pem(server) + _cert_pem(ca), private=True)
        client_key, client = _make_leaf(ca_key, ca, client_name, (), server=False)
        files["client_cert"] = _write(directory / "client.pem", _cert_pem(client))
        files["client_key"] = _write(directory / "client.key", _key_pem(client_key), private=True)
        return cls(directory=directory, **files)

    def other_ca(self) -> Path:
        """The certificate of an unrelated CA (it signed nothing here): trusting only it must fail."""
        _, ca = _make_ca("some other CA")
        return _write(self.directory / "other-ca.pem", _cert_pem(ca))

    def stranger(self) -> tuple[Path, Path]:
        """A client certificate and key signed by an unrelated CA: mutual TLS must refuse it."""
        other_key, other = _make_ca("stranger CA")
        key, cert = _make_leaf(other_key, other, "stranger", (), server=False)
        return (_write(self.directory / "stranger.pem", _cert_pem(cert)),
                _write(self.directory / "stranger.key", _key_pem(key), private=True))


def _make_ca(name: str):
    x509, hashes, _, ec, _, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + _VALID)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _make_leaf(ca_key, ca, name: str, hosts: tuple[str, ...], *, server: bool):
    x509, hashes, _, ec, ExtendedKeyUsageOID, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + _VALID)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(
                   # a server certificate also authenticates the broker to itself (inter-broker mTLS)
                   [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server
                   else [ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if hosts:
        names = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _cert_pem(cert) -> bytes:
    _, _, serialization, _, _, _ = _crypto()
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    _, _, serialization, _, _, _ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, *, private: bool = False) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path
