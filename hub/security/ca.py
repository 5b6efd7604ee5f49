"""The fleet CA (``cryptography``): one CA certificate and key, the certificates it issues, its CRL.

Files in the security directory (``[security] dir``, default ``<data_dir>/security``, mode 0700):

* ``ca.crt`` / ``ca.key``: the CA (EC P-256), created at first use, unless the operator names
  their own in ``[security] ca_cert_file`` / ``ca_key_file``;
* ``issued.json``: every certificate issued (serial, common name, kind, expiry, revocation time):
  what the CRL is built from;
* ``crl.pem``: the CRL the broker reads (``crlfile``), rebuilt at every revocation and before it
  expires (``Fleet CA`` refresh in the hub; an expired CRL makes OpenSSL refuse every client).

Leaf keys are EC P-256, written PEM PKCS#8 unencrypted with mode 0600 (the device's own file
system, or systemd credentials, protect them on the device). Client certificates carry
``clientAuth``, the broker's ``serverAuth`` and its SANs; the common name is the MQTT identity
(Mosquitto's ``use_identity_as_username``).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
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
CA_DAYS = 3650
BACKDATE = datetime.timedelta(minutes=5)  # tolerate a device clock a little behind the hub's

KIND_DEVICE = "device"
KIND_HUB = "hub"
KIND_BROKER = "broker"


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

    def __init__(self, directory: Path, cert_file: str = "", key_file: str = "") -> None:
        self.dir = Path(directory)
        self.cert_path = Path(cert_file) if cert_file else self.dir / CA_CERT
        self.key_path = Path(key_file) if key_file else self.dir / CA_KEY
        self.operator_supplied = bool(cert_file)
        if not self.cert_path.exists() and not self.operator_supplied:
            self._create()
        self.cert, self.key = self._load()

    # ---- the CA itself ----
    def _create(self) -> None:
        ensure_private_dir(self.dir)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        name = _name(f"Kestrel fleet CA {now.strftime('%Y-%m-%d')}")
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

    # ---- issuing ----
    def issue(self, common_name: str, kind: str, days: int, sans: Sequence[str] = ()) -> Tuple[bytes, bytes, Issued]:
        """A new key and certificate for ``common_name``: (cert PEM, key PEM, index entry), recorded
        in issued.json before it is returned."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_after = min(now + datetime.timedelta(days=days), self.cert.not_valid_after_utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == KIND_BROKER else ExtendedKeyUsageOID.CLIENT_AUTH
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
        """Revoke every unrevoked certificate of ``name`` (but ``except_serial``); returns how many."""
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
        out = path or self.dir / CRL_FILE
        atomic.write_bytes(out, self.crl(days))
        return out


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
