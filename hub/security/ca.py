"""The fleet CA (``cryptography``): one CA certificate and key, the certificates it issues, its CRL.

Files in the security directory (``[security] dir``, default ``<data_dir>/security``, mode 0700):

* ``ca.crt`` / ``ca.key``: the CA (EC P-256), created at first use, unless the operator names
  their own in ``[security] ca_cert_file`` / ``ca_key_file``;
* ``issued.json``: every certificate issued (serial, common name, kind, expiry, revocation time):
  what the CRL is built from;
* ``crl.pem``: the CRL the broker reads (``crlfile``), rebuilt at every revocation and before it
  expires (the hub's renewer; an expired CRL makes OpenSSL refuse every client);
* ``ca-bundle.crt``: what clients and the broker trust (``cafile``): the CA, and during a rotation the
  previous one too;
* ``previous/``: the previous CA (ca.crt, ca.key, issued.json) while a rotation runs
  (``begin_rotation`` / ``finish_rotation``, ``kestrel-hub ca rotate|finish``): the broker accepts
  client certificates of both, keeps presenting a certificate of the previous one (devices enrolled
  before the rotation trust only that), and new identity bundles carry both CA certificates; the CRL
  file holds one CRL per CA.

Leaf keys are EC P-256, written PEM PKCS#8 unencrypted with mode 0600 (the device's own file
system, or systemd credentials, protect them on the device). Client certificates carry
``clientAuth``, the broker's and the gRPC server's ``serverAuth`` and their SANs; the common name is the MQTT identity
(Mosquitto's ``use_identity_as_username``).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hub.errors import SecurityError
from proto import atomic

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CRL_FILE = "crl.pem"
ISSUED_FILE = "issued.json"
TRUST_FILE = "ca-bundle.crt"
PREVIOUS_DIR = "previous"
CA_DAYS = 3650
BACKDATE = datetime.timedelta(minutes=5)  # tolerate a device clock a little behind the hub's

KIND_DEVICE = "device"
KIND_HUB = "hub"
KIND_BROKER = "broker"
KIND_GRPC = "grpc"        # the hub's gRPC server certificate
SERVER_KINDS = (KIND_BROKER, KIND_GRPC)


@dataclass
class Issued:
    serial: str          # hex
    name: str            # common name
    kind: str            # device / hub / broker
    not_after_ms: int
    revoked_ms: int = 0


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _ms(t: datetime.datetime) -> int:
    return int(t.timestamp() * 1000)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_secret(path: Path, data: bytes) -> None:
    """A private key or password: atomically, mode 0600 from its creation."""
    atomic.write_bytes(path, data, mode=0o600)
    os.chmod(str(path), 0o600)


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(str(path), 0o700)
    return path


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: List[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


class FleetCA:
    """Load (or create) the CA of a security directory and issue from it."""

    def __init__(self, directory: Path, cert_file: str = "", key_file: str = "", *, previous: bool = True) -> None:
        self.dir = Path(directory)
        self.cert_path = Path(cert_file) if cert_file else self.dir / CA_CERT
        self.key_path = Path(key_file) if key_file else self.dir / CA_KEY
        self.operator_supplied = bool(cert_file)
        if not self.cert_path.exists() and not self.operator_supplied:
            self._create()
        self.cert, self.key = self._load()
        prev = self.dir / PREVIOUS_DIR
        self.previous: Optional[FleetCA] = FleetCA(prev, previous=False) \
            if previous and (prev / CA_CERT).exists() else None

    # ---- the CA itself ----
    def _create(self) -> None:
        ensure_private_dir(self.dir)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        name = _name(f"Kestrel fleet CA {now.strftime('%Y-%m-%d')} {secrets.token_hex(3)}")  # unique per CA
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        write_secret(self.key_path, key_pem(key))  # the key first: a cert without its key is useless
        atomic.write_bytes(self.cert_path, cert_pem(cert))

    def _load(self) -> Tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        try:
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise SecurityError(f"fleet CA certificate {self.cert_path}: {getattr(exc, 'strerror', None) or exc}; "
                                "check [security] ca_cert_file") from exc
        try:
            mode = os.stat(str(self.key_path)).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise SecurityError(f"fleet CA key {self.key_path} is accessible by group/others (mode "
                                    f"{stat.S_IMODE(mode):o}): run `chmod 600 {self.key_path}`")
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        except OSError as exc:
            raise SecurityError(f"fleet CA key {self.key_path}: {exc.strerror}; check [security] ca_key_file") \
                from exc
        except (ValueError, TypeError) as exc:
            raise SecurityError(f"fleet CA key {self.key_path} is not an unencrypted PEM private key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or \
                key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise SecurityError(f"fleet CA key {self.key_path} is not the EC key of {self.cert_path}")
        return cert, key

    @property
    def cert_bytes(self) -> bytes:
        return cert_pem(self.cert)

    @property
    def trust_bytes(self) -> bytes:
        """The CA certificates clients and the broker trust: this CA, and the previous one in a rotation."""
        return self.cert_bytes + (self.previous.cert_bytes if self.previous is not None else b"")

    @property
    def server_issuer(self) -> FleetCA:
        """The CA the broker's certificate comes from: the previous one while a rotation runs (the devices
        enrolled before it trust only that one)."""
        return self.previous if self.previous is not None else self

    # ---- issuing ----
    def issue(self, common_name: str, kind: str, days: int, sans: Sequence[str] = ()) -> Tuple[bytes, bytes, Issued]:
        """A new key and certificate for ``common_name``: (cert PEM, key PEM, index entry), recorded
        in issued.json before it is returned."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_after = min(now + datetime.timedelta(days=days), self.cert.not_valid_after_utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if kind in SERVER_KINDS else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - BACKDATE).not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.key.public_key()), critical=False))
        if sans:
            builder = builder.add_extension(_san(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        entry = Issued(serial=format(cert.serial_number, "x"), name=common_name, kind=kind,
                       not_after_ms=_ms(not_after))
        index = self.issued()
        index.append(entry)
        self._save(index)
        return cert_pem(cert), key_pem(key), entry

    def issued(self) -> List[Issued]:
        path = self.dir / ISSUED_FILE
        try:
            return [Issued(**e) for e in json.loads(path.read_text())]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError) as exc:
            raise SecurityError(f"{path} is unreadable ({exc}); restore it from a backup") from exc

    def _save(self, index: List[Issued]) -> None:
        ensure_private_dir(self.dir)
        atomic.write_json(self.dir / ISSUED_FILE, [asdict(e) for e in index])

    def revoke(self, name: str, kind: str = KIND_DEVICE, except_serial: str = "") -> int:
        """Revoke every unrevoked certificate of ``name`` (but ``except_serial``), of the previous CA
        too during a rotation; returns how many."""
        n = self.previous.revoke(name, kind, except_serial) if self.previous is not None else 0
        return n + self._revoke_own(name, kind, except_serial)

    def _revoke_own(self, name: str, kind: str, except_serial: str) -> int:
        index = self.issued()
        now = _ms(_now())
        n = 0
        for e in index:
            if e.name == name and e.kind == kind and not e.revoked_ms and e.serial != except_serial:
                e.revoked_ms = now
                n += 1
        if n:
            self._save(index)
        return n

    # ---- the CRL ----
    def crl(self, days: int) -> bytes:
        """A CRL of every revoked certificate that has not expired yet, valid ``days``."""
        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - BACKDATE).next_update(now + datetime.timedelta(days=days))
                   .add_extension(x509.CRLNumber(_ms(now)), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        for e in self.issued():
            if e.revoked_ms and e.not_after_ms > _ms(now):
                when = datetime.datetime.fromtimestamp(e.revoked_ms / 1000, datetime.timezone.utc)
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(int(e.serial, 16)).revocation_date(when).build())
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def write_crl(self, days: int, path: Optional[Path] = None) -> Path:
        """The CRL file the broker reads: one CRL per CA (OpenSSL wants one for every issuer it checks)."""
        out = path or self.dir / CRL_FILE
        data = self.crl(days) + (self.previous.crl(days) if self.previous is not None else b"")
        atomic.write_bytes(out, data)
        return out


def begin_rotation(directory: Path) -> FleetCA:
    """Move the hub's own CA to ``previous/`` and create a new one. Refused while a rotation runs."""
    directory = Path(directory)
    prev = directory / PREVIOUS_DIR
    if (prev / CA_CERT).exists():
        raise SecurityError(f"a CA rotation is running already ({prev}): finish it first "
                            "(`kestrel-hub ca finish`)")
    if not (directory / CA_CERT).exists():
        raise SecurityError(f"no CA in {directory} to rotate (an operator's CA: see docs/security.md)")
    ensure_private_dir(prev)
    for name in (CA_KEY, ISSUED_FILE, CA_CERT):  # the certificate last: its presence marks the rotation
        src = directory / name
        if src.exists():
            os.replace(str(src), str(prev / name))
    atomic.fsync_dir(prev)
    atomic.fsync_dir(directory)
    return FleetCA(directory)


def finish_rotation(directory: Path) -> Path:
    """End a rotation: the previous CA goes to ``retired-<time>/`` (kept, never trusted again)."""
    directory = Path(directory)
    prev = directory / PREVIOUS_DIR
    if not (prev / CA_CERT).exists():
        raise SecurityError("no CA rotation is running (`kestrel-hub ca rotate` starts one)")
    retired = directory / f"retired-{_now().strftime('%Y%m%dT%H%M%SZ')}"
    os.replace(str(prev), str(retired))
    atomic.fsync_dir(directory)
    return retired


def crl_next_update_ms(path: Path) -> int:
    """When the CRL at ``path`` expires (0 when it is missing or unreadable)."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError):
        return 0
    nxt = crl.next_update_utc
    return _ms(nxt) if nxt is not None else 0


def revoked_serials(path: Path) -> Dict[int, int]:
    """serial -> revocation time (ms) listed in the CRL at ``path`` (for tests and `devices list`)."""
    crl = x509.load_pem_x509_crl(path.read_bytes())
    return {r.serial_number: _ms(r.revocation_date_utc) for r in crl}
