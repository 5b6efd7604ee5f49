"""The hub's configuration (``hub.toml``): one typed tree, every field documented.

Unknown keys are rejected by name (proto.tomlconf). ``kestrel-hub serve --check-config`` loads and
validates it and exits. docs/hub.md describes the sections; ``describe_config()`` renders every key.
"""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path
from typing import Any, List, Union

from hub.errors import ConfigError
from hub.registry import RegistryConfig
from hub.store.sqlite import SYNCHRONOUS_MODES
from proto import atomic, tomlconf
from proto.tomlconf import field

MiB = 1024 * 1024
IMAGE_CHECK_MODES = ("structure", "decode")  # hub/ingest/imagecheck.py check_image's modes
SESSION_EXPIRY_MAX_S = 0xFFFFFFFE  # MQTT 5: 0xFFFFFFFF means "never", which [mqtt] session_expiry_s spells -1
CLIENT_ID_FILE = "mqtt-client-id"  # in data_dir: the generated default client id, kept across restarts


@dataclasses.dataclass
class HubSection:
    data_dir: str = field("./kestrel-hub-data", doc="Where the SQLite store, the embedded broker's files and "
                                                     "the registry's bundles live.")
    log_level: str = field("INFO", doc="DEBUG, INFO, WARNING or ERROR.")

    def validate(self) -> None:
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, not {self.log_level!r}")


@dataclasses.dataclass
class StoreSection:
    url: str = field("", doc="sqlite:///path/to/hub.db, a plain file path, or mongodb://user@host/db "
                             "(database name in the path, default 'kestrel'); empty = SQLite "
                             "<data_dir>/hub.db.")
    busy_timeout_ms: int = field(10000, doc="SQLite: how long a writer waits for another process's lock.")
    timeout_ms: int = field(5000, doc="MongoDB: server selection / connect timeout.")
    sqlite_synchronous: str = field("FULL", doc="SQLite: FULL (default) fsyncs the WAL at every commit, so an "
                                                "acknowledged frame survives a power loss or OS crash. "
                                                "NORMAL fsyncs the WAL only at checkpoints: a power loss "
                                                "or OS crash (not a hub crash) can lose the frames "
                                                "acknowledged in the last sqlite_checkpoint_s seconds; "
                                                "the image files are fsynced in every mode, so NORMAL "
                                                "saves little. EXTRA also fsyncs the directory.")
    sqlite_checkpoint_s: float = field(0.5, doc="SQLite: a background thread copies the WAL into the "
                                                "database this often, outside commits; only when the WAL "
                                                "passed 32 MB do commits wait for its short final pass "
                                                "(the few pages written meanwhile); 0 = SQLite's own "
                                                "checkpoints inside commits.")
    telemetry_retention_h: float = field(48.0, doc="How long the per-device, per-minute telemetry points behind "
                                                   "the dashboard's charts are kept (hours); older ones are "
                                                   "pruned every few minutes.")

    def validate(self) -> None:
        if not 1 <= self.telemetry_retention_h <= 24 * 366:
            raise ValueError("telemetry_retention_h must be between 1 and 8784 hours")
        if self.busy_timeout_ms < 0 or self.timeout_ms <= 0:
            raise ValueError("busy_timeout_ms must be >= 0 and timeout_ms > 0")
        if self.sqlite_synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(f"sqlite_synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, "
                             f"not {self.sqlite_synchronous!r}")
        if not 0 <= self.sqlite_checkpoint_s <= 60:
            raise ValueError("sqlite_checkpoint_s must be between 0 and 60")


@dataclasses.dataclass
class MqttSection:
    host: str = field("", doc="Broker host; empty (with port 0) = start and supervise an embedded Mosquitto "
                              "on a free loopback port.")
    port: int = field(0, doc="Broker port; 0 = 1883 (8883 with TLS) when host is set, else embedded.")
    username: str = field("", doc="Username; empty = anonymous.")
    password_file: str = field("", doc="File holding the password (keeps secrets out of the config).")
    tls: bool = field(False, doc="Connect with TLS.")
    ca_file: str = field("", doc="CA bundle for TLS; empty = system CAs.")
    cert_file: str = field("", doc="Client certificate for mutual TLS.")
    key_file: str = field("", doc="Client key for mutual TLS.")
    client_id: str = field("", doc="Fixed MQTT client id (persistent session: the broker queues frames while "
                                   "this hub is down). Empty = kestrel-hub-<random>, generated once and "
                                   f"kept in <data_dir>/{CLIENT_ID_FILE} (it survives a new hostname). "
                                   "Every hub process needs its own (its own data_dir, or set this).")
    share_group: str = field("kestrel-hub", doc="Shared-subscription group: hubs in one group split the "
                                                "frames ($share/<group>/...); empty = no sharing.")
    max_payload_bytes: int = field(4 * MiB, doc="Frame messages larger than this are rejected (too_large). "
                                               "The embedded broker refuses packets over this plus 64 KiB "
                                               "(max_packet_size) and the hub's MQTT 5 CONNECT tells any "
                                               "broker not to send it larger ones; set max_packet_size on an "
                                               "external broker (docs/hub.md).")
    receipts: bool = field(True, doc="After each committed batch, tell every device which of its frames are "
                                     "durable in the store (a Receipt on kestrel/v1/devices/{id}/receipts) and "
                                     "announce that on the retained kestrel/v1/hub/announce; devices then "
                                     "delete a frame only on its receipt. false = behave like a hub older "
                                     "than receipts (docs/adr/0019-storage-receipts.md).")
    keepalive_s: int = field(30, doc="MQTT keepalive.")
    session_expiry_s: int = field(-1, doc="How long the broker keeps this hub's session (and hands it its share of "
                                          "the frames) after its connection ended. -1 = never: a single hub, the "
                                          "broker queues frames while it restarts. Hub workers in a share group: "
                                          "0, the session ends with the connection and the other workers take the "
                                          "whole stream at once (N > 0: after N s, 1 to 2 s later with "
                                          "Mosquitto). With receipts on, the broker then publishes the worker's "
                                          "last will, a ResendRequest: devices resend what has no receipt yet "
                                          "(docs/hub.md, Scale-out).")
    allow_unknown_devices: bool = field(True, doc="Auto-register a device on its first valid message; "
                                                  "false = "
                                                  "frames from devices not in the store are rejected "
                                                  "(unknown_device).")
    receive_maximum: int = field(1000, doc="QoS 1 messages the broker may send this hub before it waits for "
                                           "the hub's acknowledgements (MQTT 5 Receive Maximum; the hub "
                                           "acknowledges after its commit, so a deep window keeps batches "
                                           "full). Bounds the frames in the hub's memory at once.")
    require_enrolled: bool = field(False, doc="Accept messages only from devices enrolled with `kestrel-hub "
                                              "devices add` and not revoked; others are rejected as "
                                              "unknown_device (the embedded TLS broker already lets no "
                                              "one else in: this guards an operator's broker too).")
    batch_max: int = field(200, doc="Most messages committed in one store transaction.")
    batch_max_bytes: int = field(8 * MiB, doc="Most payload bytes committed in one store transaction (a batch "
                                              "closes at batch_max messages or this many bytes).")
    queue_max_qos0: int = field(10000, doc="Telemetry (QoS 0) waiting in memory beyond this many messages is "
                                           "dropped and counted (dropped_qos0), e.g. while the store is "
                                           "paused; QoS 1 is bounded by the broker's in-flight window.")
    dead_letter_dir: str = field("", doc="Where frames are kept that the store refused for a reason of their "
                                         "own, or whose frame_id belongs to another device: the raw "
                                         "payload + a .json with the reason; empty = <data_dir>/dead-letter.")
    image_check: str = field("structure", doc="How a frame's image is checked: structure = a JPEG's markers, "
                                              "tables, frame and scan headers, image data up to its end marker "
                                              "(what libjpeg refuses; PNGs are decoded); decode = OpenCV "
                                              "decodes every image (about 0.3 ms per 50 KB JPEG). See "
                                              "docs/adr/0008-hub-image-check-by-structure.md.")
    validate_workers: int = field(0, doc="Threads decoding images to validate frames (decoding releases the "
                                         "GIL); 0 = min(4, CPU count), 1 = in the ingest thread.")
    retry_initial_s: float = field(0.2, doc="First wait before retrying an unreachable store.")
    retry_max_s: float = field(10.0, doc="Longest wait between store retries (exponential backoff).")
    reconnect_min_s: float = field(0.2, doc="First wait before reconnecting to the broker (exponential "
                                            "backoff, proto.backoff: it starts here again only after a "
                                            "connection stayed up 10 s).")
    reconnect_max_s: float = field(10.0, doc="Longest wait between attempts to reconnect to the broker.")
    embedded_port: int = field(0, doc="Embedded broker: port on 127.0.0.1; 0 = the port of the last run "
                                      "(from <data_dir>/broker/broker.json) when it is free, else a free "
                                      "port (written there).")
    embedded_autosave_s: int = field(5, doc="Embedded broker: Mosquitto writes its queued messages to disk "
                                            "this often; a crash of Mosquitto itself (not of the hub) loses "
                                            "the frames it accepted in that window and had not delivered.")

    def validate(self) -> None:
        if not 0 <= self.port <= 65535 or not 0 <= self.embedded_port <= 65535:
            raise ValueError("port and embedded_port must be 0..65535")
        if self.max_payload_bytes < 1024:
            raise ValueError("max_payload_bytes must be >= 1024")
        if self.image_check not in IMAGE_CHECK_MODES:
            raise ValueError(f"image_check must be one of {', '.join(IMAGE_CHECK_MODES)}, not {self.image_check!r}")
        if self.validate_workers < 0:
            raise ValueError("validate_workers must be >= 0")
        if not -1 <= self.session_expiry_s <= SESSION_EXPIRY_MAX_S:
            raise ValueError(f"session_expiry_s must be -1 (never), 0 (ends with the connection) .. "
                             f"{SESSION_EXPIRY_MAX_S}")
        if not 1 <= self.receive_maximum <= 65535:
            raise ValueError("receive_maximum must be 1..65535")
        if self.batch_max < 1 or self.batch_max_bytes < 1024:
            raise ValueError("batch_max must be >= 1 and batch_max_bytes >= 1024")
        if self.queue_max_qos0 < 1 or self.embedded_autosave_s < 1:
            raise ValueError("queue_max_qos0 and embedded_autosave_s must be >= 1")
        if self.retry_initial_s <= 0 or self.retry_max_s < self.retry_initial_s:
            raise ValueError("need 0 < retry_initial_s <= retry_max_s")
        if self.reconnect_min_s <= 0 or self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        if any(c in self.share_group for c in "/+#"):
            raise ValueError(f"share_group {self.share_group!r} must not contain '/', '+' or '#'")
        if self.port and not self.host:
            raise ValueError("port is set but host is empty (leave both empty for the embedded broker)")
        if (self.ca_file or self.cert_file or self.key_file) and not self.tls:
            raise ValueError("ca_file/cert_file/key_file are set but tls = false")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("mutual TLS needs both cert_file and key_file")
        for name in ("ca_file", "cert_file", "key_file", "password_file"):
            value = getattr(self, name)
            if value and not Path(value).expanduser().is_file():
                raise ValueError(f"{name} {value!r} does not exist or is not a file")

    @property
    def embedded(self) -> bool:
        return not self.host


@dataclasses.dataclass
class GrpcSection:
    bind: str = field("127.0.0.1", doc="Address the gRPC registry and fleet services listen on (TLS; 0.0.0.0 lets "
                                       "devices and trainers on the network in: put the hub's names in tls_names).")
    port: int = field(50051, doc="gRPC port (TLS with a certificate of the fleet CA; every call needs a token); "
                                 "0 = a free port (logged and written to <data_dir>/hub.json).")
    advertise: str = field("", doc="host:port devices should fetch models from, sent in every DesiredState "
                                   "(grpc_target); empty = each device's own configured hub address.")
    tls_names: List[str] = field(doc="Host names and IP addresses in the gRPC server's certificate (what clients "
                                     "dial, advertise's host among them); empty = [security] broker_names.",
                                 factory=list)
    plain_port: int = field(0, doc="Also a plain-text gRPC port on 127.0.0.1 (local tools that cannot do TLS; "
                                   "tokens are still required); 0 = none.")
    max_workers: int = field(8, doc="gRPC worker threads.")

    def validate(self) -> None:
        if not 0 <= self.port <= 65535 or self.max_workers < 1:
            raise ValueError("port must be 0..65535 and max_workers >= 1")
        if not 0 <= self.plain_port <= 65535:
            raise ValueError("plain_port must be 0..65535 (0 = none)")
        if self.plain_port and self.plain_port == self.port:
            raise ValueError("plain_port must differ from port")


@dataclasses.dataclass
class HttpSection:
    bind: str = field("127.0.0.1", doc="Address of the HTTP server (/healthz, /metrics, dashboard).")
    port: int = field(8080, doc="HTTP port; 0 = a free port (logged and written to <data_dir>/hub.json).")
    auth_reads: bool = field(True, doc="Pages and API reads need a token or a login too (every write always "
                                       "does). false = anyone who reaches the port sees the fleet, the "
                                       "frames and the models. /healthz and /metrics never need one.")
    session_hours: float = field(12.0, doc="How long a browser login lasts.")
    page_size: int = field(48, doc="Frames per page of the label queue (the API's default limit).")
    thumb_side: int = field(192, doc="Longest side of the label queue's thumbnails, pixels.")
    thumb_cache_mb: int = field(32, doc="Memory for cached thumbnails (least recently used go first); "
                                        "browsers cache them too (a frame's image never changes).")
    refresh_s: float = field(3.0, doc="How often the fleet page refreshes its table (seconds).")

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be 0..65535")
        if not 0.05 <= self.session_hours <= 24 * 30:
            raise ValueError("session_hours must be between 0.05 and 720")
        if not 1 <= self.page_size <= 500:
            raise ValueError("page_size must be between 1 and 500")
        if not 32 <= self.thumb_side <= 1024:
            raise ValueError("thumb_side must be between 32 and 1024")
        if not 0 <= self.thumb_cache_mb <= 4096:
            raise ValueError("thumb_cache_mb must be between 0 and 4096")
        if not 0.5 <= self.refresh_s <= 3600:
            raise ValueError("refresh_s must be between 0.5 and 3600")


@dataclasses.dataclass
class SecuritySection:
    tls: bool = field(True, doc="Embedded broker: a TLS listener for the fleet's identities (mqtt_auth), an ACL "
                                "per device, the hub connecting with its own identity. false = a plain, "
                                "anonymous broker on 127.0.0.1 for a quick local try (any local process may "
                                "then publish as any device; desired state is still signed).")
    mqtt_auth: str = field("certificate", doc="How the broker authenticates clients: certificate (a client "
                                              "certificate of the fleet CA, its common name is the MQTT "
                                              "identity), password (username + password over TLS) or both.")
    dir: str = field("", doc="The fleet CA, the fleet key, the broker's and the hub's certificates, the CRL, "
                             "the ACL and the password file; empty = <data_dir>/security (mode 0700). Hub "
                             "workers of one fleet share it.")
    ca_cert_file: str = field("", doc="The operator's CA certificate (PEM) to issue from; empty = the hub's own "
                                      "CA, created at first use in dir.")
    ca_key_file: str = field("", doc="The operator CA's private key (PEM, unencrypted, mode 0600).")
    fleet_key_file: str = field("", doc="The Ed25519 key (PEM, 0600) that signs desired state; empty = "
                                        "<dir>/fleet.key, created at first use. Never the model-signing key.")
    hub_identity: str = field("kestrel-hub", doc="The hub's MQTT identity (its certificate's common name and "
                                                 "username); no device may have this name.")
    broker_names: List[str] = field(doc="Host names and IP addresses in the broker's server certificate (what "
                                        "devices connect to).", factory=lambda: ["127.0.0.1", "localhost"])
    embedded_bind: str = field("127.0.0.1", doc="Embedded broker: address of the TLS listener (0.0.0.0 lets "
                                                "devices on the network in; add the hub's name to "
                                                "broker_names).")
    plain_port: int = field(0, doc="Embedded broker: also a plain (non-TLS) listener on 127.0.0.1 at this port "
                                   "for password logins (local tools); 0 = none.")
    advertise_mqtt: str = field("", doc="host:port devices connect to, written into identity bundles; empty = "
                                        "the embedded broker's 127.0.0.1:port, or [mqtt] host:port.")
    cert_days: int = field(825, doc="Validity of the certificates the CA issues (devices, hub, broker).")
    crl_days: int = field(30, doc="Validity of each CRL; the hub writes a new one when half of it is left "
                                  "(an expired CRL makes the broker refuse every client).")
    desired_ttl_s: float = field(7 * 86400.0, doc="Signed desired state expires this long after it is signed; "
                                                 "the hub re-signs retained messages when half of it is left.")
    refresh_interval_s: float = field(3600.0, doc="How often the hub checks its retained desired state and its "
                                                  "CRL for renewal.")

    def validate(self) -> None:
        if self.mqtt_auth not in ("certificate", "password", "both"):
            raise ValueError(f"mqtt_auth must be certificate, password or both, not {self.mqtt_auth!r}")
        if bool(self.ca_cert_file) != bool(self.ca_key_file):
            raise ValueError("ca_cert_file and ca_key_file go together")
        for name in ("ca_cert_file", "ca_key_file", "fleet_key_file"):
            value = getattr(self, name)
            if value and not Path(value).expanduser().is_file():
                raise ValueError(f"{name} {value!r} does not exist or is not a file")
        if not 0 <= self.plain_port <= 65535:
            raise ValueError("plain_port must be 0..65535")
        if not self.broker_names:
            raise ValueError("broker_names must name at least one host or address")
        if self.cert_days < 1 or self.crl_days < 1:
            raise ValueError("cert_days and crl_days must be >= 1")
        if self.desired_ttl_s < 60 or self.refresh_interval_s <= 0:
            raise ValueError("desired_ttl_s must be >= 60 and refresh_interval_s > 0")
        if self.refresh_interval_s * 2 > self.desired_ttl_s:
            raise ValueError("refresh_interval_s must be at most half of desired_ttl_s (messages are re-signed "
                             "when half of their time is left)")


@dataclasses.dataclass
class HubConfig:
    hub: HubSection = field(doc="Process-wide settings.", factory=HubSection)
    store: StoreSection = field(doc="Frame, device and model-record storage.", factory=StoreSection)
    mqtt: MqttSection = field(doc="Broker connection and the frame ingest.", factory=MqttSection)
    grpc: GrpcSection = field(doc="Model registry and fleet gRPC services.", factory=GrpcSection)
    http: HttpSection = field(doc="Health, metrics and dashboard.", factory=HttpSection)
    registry: RegistryConfig = field(doc="Model registry (see hub.registry).", factory=RegistryConfig)
    security: SecuritySection = field(doc="Fleet security: the CA, device identities, the broker's TLS and ACL, "
                                         "the fleet key (docs/security.md).", factory=SecuritySection)

    @property
    def data_dir(self) -> Path:
        return Path(self.hub.data_dir).expanduser().resolve()

    @property
    def dead_letter_dir(self) -> Path:
        """[mqtt] dead_letter_dir, or <data_dir>/dead-letter."""
        return Path(self.mqtt.dead_letter_dir).expanduser() if self.mqtt.dead_letter_dir \
            else self.data_dir / "dead-letter"

    @property
    def security_dir(self) -> Path:
        """[security] dir, or <data_dir>/security."""
        return Path(self.security.dir).expanduser().resolve() if self.security.dir else self.data_dir / "security"

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{self.data_dir / 'hub.db'}"

    def resolve_client_id(self) -> str:
        """[mqtt] client_id, or the one generated at the first start and kept in data_dir.

        Generated once (not derived from the hostname): a renamed machine keeps its MQTT session, so
        no orphaned session of the share group goes on taking frames for a hub that never returns."""
        if self.mqtt.client_id:
            return self.mqtt.client_id
        path = self.data_dir / CLIENT_ID_FILE
        try:
            if path.exists():
                cid = path.read_text(encoding="utf-8").strip()
                if cid:
                    return cid
            cid = f"kestrel-hub-{secrets.token_hex(6)}"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(path, cid + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot read or write the hub's client id file {path}: {exc.strerror}; "
                              "make data_dir writable or set [mqtt] client_id") from exc
        return cid


def load(path: Union[str, Path, None]) -> HubConfig:
    """Load and validate ``hub.toml`` (embedded defaults when None); ConfigError on any problem."""
    return tomlconf.load(HubConfig, path)


def from_dict(data: Any) -> HubConfig:
    return tomlconf.from_dict(HubConfig, data)


def describe_config() -> List[str]:
    return tomlconf.describe(HubConfig)
