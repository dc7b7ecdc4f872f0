"""Key material and Flower settings for a real (non-simulated) federation; no Flower imports.

Coordinator:  `fedssl certs DIR [--host NAME_OR_IP ...]` writes a private CA (`ca.crt`, `ca.key`)
and the SuperLink's TLS certificate signed by it (`server.pem`, `server.key`), valid for
127.0.0.1 and localhost plus every `--host`. Hospitals receive `ca.crt` only.

Hospital:     `fedssl node-key DIR --site NAME` writes the SuperNode's authentication key pair
in the format Flower's node authentication expects: an EC P-384 private key in OpenSSH format
(`NAME.key`, given to `flower-supernode --auth-supernode-private-key`, never leaves the hospital)
and its OpenSSH public key (`NAME.key.pub`, sent to the coordinator, who registers it with
`flwr supernode register NAME.key.pub <connection> --name NAME`). Same as `ssh-keygen -t ecdsa -b 384 -N ""`.

See docs/deployment.md for the whole runbook.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
NODE_CURVE = ec.SECP384R1  # Flower accepts any NIST curve; its docs use P-384 (ssh-keygen -b 384)
# Environment for flower-superlink and flower-supernode: their SuperExec asks for new tasks (a
# ClientApp to start for a received message) every 50 ms instead of every 1 s; one short local
# request per poll. See docs/performance.md, "Round overhead".
FAST_POLLING_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05"}


@dataclass(frozen=True)
class Certificates:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    private_key: Path
    public_key: Path


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:  # created owner-only, never world-readable even for an instant
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str] | tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certificates(folder: str | Path, hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS, *,
                      days: int = 365, organisation: str = "fedssl federation",
                      overwrite: bool = False) -> Certificates:
    """Write a CA and a SuperLink server certificate for `hosts` (IPs or DNS names) to `folder`."""
    folder = Path(folder)
    out = Certificates(folder / "ca.crt", folder / "ca.key", folder / "server.pem", folder / "server.key")
    existing = [p for p in vars(out).values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(map(str, existing))} exist; refusing to overwrite "
                              "(a new CA invalidates every hospital's copy of ca.crt)")
    hosts = tuple(hosts) or DEFAULT_HOSTS
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{organisation} CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                                 x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write(out.ca_key, _pem_key(ca_key), private=True)
    _write(out.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(out.server_key, _pem_key(server_key), private=True)
    _write(out.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return out


def verify_server_certificate(server_cert: str | Path, ca_cert: str | Path, host: str = "127.0.0.1") -> None:
    """Raise if `server_cert` is not signed by `ca_cert`, not valid now, or not valid for `host`."""
    from cryptography.x509.verification import PolicyBuilder, Store

    ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    leaf = x509.load_pem_x509_certificate(Path(server_cert).read_bytes())
    try:
        subject = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.DNSName(host)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
    verifier.verify(leaf, [])


def make_node_key(folder: str | Path, site: str, *, overwrite: bool = False) -> NodeKey:
    """Write `site`'s SuperNode authentication key pair (OpenSSH EC P-384) to `folder`."""
    if not site or any(c in site for c in "/\\") or site.startswith("."):
        raise ValueError(f"invalid site name {site!r}")
    folder = Path(folder)
    out = NodeKey(folder / f"{site}.key", folder / f"{site}.key.pub")
    if out.private_key.exists() and not overwrite:
        raise FileExistsError(f"{out.private_key} exists; refusing to overwrite (its public key may "
                              "already be registered with the SuperLink)")
    key = ec.generate_private_key(NODE_CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out.private_key, private, private=True)
    _write(out.public_key, public + f" fedssl-{site}\n".encode())
    return out
