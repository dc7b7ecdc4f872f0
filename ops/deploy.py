"""Key material and Flower settings for a real (non-simulated) federation; no Flower imports.

Coordinator:  `fedssl certs DIR [--host NAME_OR_IP ...]` writes a private CA (`ca.crt`, `ca.key`)
and the SuperLink's TLS certificate signed by it (`server.pem`, `server.key`), valid for
127.0.0.1 and localhost plus every `--host`. Hospitals receive `ca.crt` only.

Hospital:     `fedssl node-key DIR --site NAME` writes the SuperNode's authentication key pair
in the format Flower's node authentication expects: an EC P-384 private key in OpenSSH format
(`NAME.key`, the site file's `node_key`, given to `flower-supernode --auth-supernode-private-key`
by `fedssl node`; it never leaves the hospital) and its OpenSSH public key (`NAME.key.pub`, sent to
the coordinator, who registers it with `fedssl register NAME.key.pub --site NAME`). Same as
`ssh-keygen -t ecdsa -b 384 -N ""`; both sides compare its fingerprint (`ssh_fingerprint`, as
`ssh-keygen -l` prints it) over a second channel.

The checks `fedssl node` and `fedssl coordinator` run before they start Flower are here too: a
usable node key, a CA certificate, a SuperLink whose certificate verifies. See docs/deployment.md
for the whole runbook.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
import socket
import ssl
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
NODE_CURVE = ec.SECP384R1  # Flower accepts any NIST curve; its docs use P-384 (ssh-keygen -b 384)
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what flwr supernode register accepts
HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
# Environment for flower-superlink and flower-supernode: their SuperExec asks for new tasks (a
# ClientApp to start for a received message) every 50 ms instead of every 1 s; one short local
# request per poll. See docs/performance.md, "Round overhead".
FAST_POLLING_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05"}
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}  # no calls home
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr of this installation


def flower_environment(environ: dict[str, str], flwr_home: Path) -> dict[str, str]:
    """`environ` for the Flower commands `fedssl node` and the coordinator's commands run: offline,
    fast polling, their own Flower home, and this installation's Flower first on PATH (a SuperLink
    or SuperNode starts flower-superexec from it)."""
    return {**environ, **OFFLINE_ENV, **FAST_POLLING_ENV, "FLWR_HOME": str(flwr_home),
            "PATH": f"{BIN}{os.pathsep}{environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}


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


class KeyMaterialError(ValueError):
    """A key or certificate a node or the coordinator cannot use; the message says which and why."""


def ssh_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """`SHA256:...` as `ssh-keygen -l` prints it: what the coordinator and the hospital compare
    over a second channel (phone) before the key is registered."""
    blob = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def check_node_key(path: str | Path) -> str:
    """The fingerprint of the SuperNode key at `path`; KeyMaterialError unless it is what
    `flower-supernode --auth-supernode-private-key` loads (an unencrypted OpenSSH EC private key
    on a NIST curve) and readable by its owner only."""
    path = Path(path)
    try:
        mode, data = path.stat().st_mode & 0o777, path.read_bytes()
    except OSError as err:
        raise KeyMaterialError(f"node key {path}: {err.strerror}") from None
    if mode & 0o077:
        raise KeyMaterialError(f"node key {path} can be read by others (mode {mode:o}): chmod 600 {path}")
    try:
        key = serialization.load_ssh_private_key(data, None)
    except TypeError:
        raise KeyMaterialError(f"node key {path} is protected by a passphrase: the SuperNode cannot use it; "
                               "make one with `fedssl node-key`") from None
    except ValueError:
        raise KeyMaterialError(f"node key {path} is not an OpenSSH private key; make one with "
                               "`fedssl node-key`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in NIST_CURVES:
        raise KeyMaterialError(f"node key {path}: Flower needs an EC key on a NIST curve (P-256/384/521); "
                               "make one with `fedssl node-key`")
    return ssh_fingerprint(key.public_key())


def public_key_fingerprint(path: str | Path) -> str:
    """The fingerprint of the OpenSSH public key file `path` (a hospital's `<site>.key.pub`);
    KeyMaterialError unless `flwr supernode register` would accept it."""
    path = Path(path)
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except OSError as err:
        raise KeyMaterialError(f"public key {path}: {err.strerror}") from None
    except (ValueError, IndexError):
        raise KeyMaterialError(f"public key {path} is not an OpenSSH public key (a `<site>.key.pub` line "
                               "`ecdsa-sha2-nistp384 ...`)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise KeyMaterialError(f"public key {path}: Flower needs an EC key on a NIST curve (P-256/384/521)")
    return ssh_fingerprint(key)


def check_host(host: str) -> str:
    """`host` if it is an IP address or a DNS name a certificate can be valid for."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return host
    except ValueError:
        if len(host) <= 253 and HOSTNAME.fullmatch(host):
            return host
    raise KeyMaterialError(f"{host!r} is neither an IP address nor a host name")


def check_ca_certificate(path: str | Path) -> str:
    """A description of the CA certificate at `path` (subject, expiry); KeyMaterialError unless it
    is a PEM CA certificate valid now (the coordinator's `ca.crt`, not its `server.pem`)."""
    path = Path(path)
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as err:
        raise KeyMaterialError(f"CA certificate {path}: {err.strerror}") from None
    except ValueError:
        raise KeyMaterialError(f"CA certificate {path} is not a PEM certificate (the coordinator's ca.crt)") from None
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise KeyMaterialError(f"{path} is not a CA certificate: give the coordinator's ca.crt, not the "
                               "SuperLink's server.pem")
    now = dt.datetime.now(dt.timezone.utc)
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise KeyMaterialError(f"CA certificate {path} is valid only from {certificate.not_valid_before_utc:%Y-%m-%d} "
                               f"to {certificate.not_valid_after_utc:%Y-%m-%d}: ask the coordinator for its current ca.crt")
    subject = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = subject[0].value if subject else certificate.subject.rfc4514_string()
    return f"{name}, valid until {certificate.not_valid_after_utc:%Y-%m-%d}"


def check_superlink_tls(address: str, ca_cert: str | Path, timeout: float = 5.0) -> str:
    """Whether the SuperLink at `address` (host:port) answers, in words; KeyMaterialError if it
    answers with a certificate that `ca_cert` does not verify for that host (a wrong ca.crt, or a
    host that is not in the SuperLink's certificate), which the SuperNode would only retry."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host.strip("[]")):
            return f"the SuperLink at {address} answers and its certificate verifies with {ca_cert}"
    except ssl.SSLCertVerificationError as err:
        raise KeyMaterialError(f"the SuperLink at {address} presents a certificate that {ca_cert} does not verify "
                               f"for {host}: {err.verify_message}") from None
    except OSError as err:  # not up yet, unreachable, or no TLS there: the SuperNode keeps trying
        return f"the SuperLink at {address} does not answer yet ({err.strerror or err}); the SuperNode keeps trying"


def superlink_unavailable(address: str, ca_cert: str | Path, timeout: float = 5.0) -> str | None:
    """None if the SuperLink at `address` (host:port) answers its health check over TLS verified
    with `ca_cert`; else why not, in a few words. (Flower's CLI retries an absent SuperLink for a
    minute or more before it says so.)"""
    context = ssl.create_default_context(cafile=str(ca_cert))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(f"https://{address}/health", timeout=timeout) as response:
            return None if response.status == 200 else f"its health check answered {response.status}"
    except urllib.error.URLError as err:
        return str(getattr(err.reason, "strerror", None) or err.reason)
    except OSError as err:
        return str(err.strerror or err)
