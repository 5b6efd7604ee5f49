"""The sections of edge.toml about the hub: ``[mqtt]`` (the broker link) and ``[update]`` (signed updates,
the hub's gRPC registry, desired state). Part of the one typed tree of edge.config, which re-exports
them; split out only to keep each module small."""

from __future__ import annotations

import dataclasses
from typing import List

from proto.hubcreds import is_loopback
from proto.modelname import MODEL_NAME_RULE, valid_model_name
from proto.tomlconf import check_not_negative as _not_negative
from proto.tomlconf import check_positive as _positive
from proto.tomlconf import field

MiB = 1024 * 1024


@dataclasses.dataclass
class MqttConfig:
    host: str = field("127.0.0.1", doc="Broker host; empty disables MQTT (frames stay in the spool).")
    port: int = field(1883, doc="Broker port (8883 is usual with TLS).")
    username: str = field("", doc="Username; empty = anonymous.")
    password_file: str = field("", doc="File holding the password (keeps secrets out of the config); must "
                                       "not be readable by everyone. A relative name is looked up in "
                                       "$CREDENTIALS_DIRECTORY first (systemd LoadCredential=), as are "
                                       "ca_file, cert_file and key_file.")
    tls: bool = field(False, doc="Use TLS (the identity bundle of `kestrel-hub devices add` sets it).")
    ca_file: str = field("", doc="CA bundle for TLS (the fleet CA's ca.crt); empty = system CAs.")
    cert_file: str = field("", doc="Client certificate for mutual TLS (the device's device.crt).")
    key_file: str = field("", doc="Client key for mutual TLS (device.key); must not be readable by everyone.")
    keepalive_s: int = field(30, doc="MQTT keepalive; the broker sends the last will after 1.5x this.")
    ack_timeout_s: float = field(10.0, doc="How long to wait for a PUBACK before treating the link as down.")
    max_inflight: int = field(20, doc="Frames published and not yet acknowledged at once.")
    reconnect_min_s: float = field(0.5, doc="First reconnect delay.")
    reconnect_max_s: float = field(30.0, doc="Longest reconnect delay (exponential backoff).")
    auth_retry_s: float = field(300.0, doc="Wait after the broker refused our credentials before trying again.")
    max_payload_bytes: int = field(4 * MiB, doc="A frame whose encoded message is larger is re-encoded "
                                                "smaller (lower JPEG quality, then half the size, a few "
                                                "times) and refused (counted) if still too large; never "
                                                "sent oversize.")
    max_send_attempts: int = field(5, doc="A frame in flight each time the broker closes the connection "
                                          "(e.g. over the broker's max_packet_size) is set aside in "
                                          "{data_dir}/spool/dead after this many connections, so it "
                                          "cannot block the frames behind it. The same count applies to a "
                                          "frame that keeps coming due without a receipt while the hub "
                                          "receipts this device's other frames.")
    delete_on: str = field("auto", doc="When a sent frame leaves the spool. receipt: only when the hub's "
                                       "storage receipt names it (it is durable in the hub's store); "
                                       "puback: on the broker's PUBACK (hubs older than receipts); auto: "
                                       "receipt while the hubs announce receipts on the broker (retained "
                                       "kestrel/v1/hub/announce, checked on every connection), else "
                                       "puback. See docs/edge-transport.md.")
    receipt_timeout_s: float = field(60.0, doc="A frame the broker acknowledged is published again when no "
                                               "receipt named it within this many seconds (the hub stores "
                                               "it once); the wait doubles with every resend of the frame.")
    receipt_timeout_max_s: float = field(900.0, doc="Longest wait between two resends of one unreceipted "
                                                    "frame (bounds the copies a long hub outage costs).")

    def validate(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be 1..65535, not {self.port}")
        if self.reconnect_min_s <= 0 or self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        if self.max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        if not 5 <= self.keepalive_s <= 65535:
            raise ValueError(f"keepalive_s must be 5..65535, not {self.keepalive_s}")
        _positive(self, "ack_timeout_s", "auth_retry_s", "max_send_attempts", "receipt_timeout_s")
        if self.delete_on not in ("auto", "receipt", "puback"):
            raise ValueError(f"delete_on must be auto, receipt or puback, not {self.delete_on!r}")
        if not self.receipt_timeout_max_s >= self.receipt_timeout_s:
            raise ValueError("receipt_timeout_max_s must be >= receipt_timeout_s")
        if self.max_payload_bytes < 1024:
            raise ValueError("max_payload_bytes must be at least 1024")
        if (self.cert_file or self.key_file) and not (self.cert_file and self.key_file):
            raise ValueError("mutual TLS needs both cert_file and key_file")


@dataclasses.dataclass
class UpdateConfig:
    enabled: bool = field(True, doc="Follow the hub's desired-state messages.")
    trust_dir: str = field("", doc="Directory of trusted Ed25519 public keys (*.pub); empty = "
                                   "{data_dir}/trust. Installed slots are re-verified against it at "
                                   "every start and before a rollback.")
    model_name: str = field("", doc="The model this device runs. Empty = the installed model's name (the "
                                    "very first install may name any model). A bundle or desired state for "
                                    "another model is refused (wrong_model); `kestrel-edge install "
                                    "--new-model` switches models on purpose.")
    hub_grpc: str = field("", doc="host:port of the hub's gRPC registry for fetching bundles.")
    tls: bool = field(True, doc="Fetch over TLS, verifying the hub's certificate with ca_file. false = plain "
                                "text, for a hub's [grpc] plain_port on this machine only (a token is never "
                                "sent in plain text to another host).")
    ca_file: str = field("", doc="The fleet CA that signed the hub's gRPC certificate (the identity bundle's "
                                 "ca.crt); empty = [mqtt] ca_file when [mqtt] tls is on, else the system's CAs. "
                                 "A relative name is looked up in $CREDENTIALS_DIRECTORY first.")
    token_file: str = field("", doc="File holding the device's hub token (role device: fetch only; the "
                                    "identity bundle's grpc-token), read at every download; must not be "
                                    "readable by everyone. A relative name is looked up in "
                                    "$CREDENTIALS_DIRECTORY first. Empty = no token: the hub refuses the fetch.")
    grpc_targets: List[str] = field(doc="Other registry addresses (host:port) a desired-state message may "
                                        "name in grpc_target; any other address is ignored and hub_grpc is "
                                        "used.",
                                    factory=list)
    fleet_keys: List[str] = field(doc="The hub's fleet public keys (fleet.pub files, or directories of *.pub) "
                                      "desired-state messages must be signed by; kept apart from trust_dir "
                                      "(model-signing keys). A relative name is looked up in "
                                      "$CREDENTIALS_DIRECTORY first. Two files during a fleet key rotation.",
                                  factory=list)
    require_signed_desired: bool = field(True, doc="Refuse every desired-state message that is not signed by a "
                                                   "fleet key, expired, or not newer than the last one accepted "
                                                   "on its topic (counted by reason in telemetry). With no "
                                                   "fleet_keys every message is refused. false (a quick try "
                                                   "on a broker you trust entirely): unsigned messages are "
                                                   "followed too; signed ones are still checked when "
                                                   "fleet_keys is set.")
    max_bundle_bytes: int = field(200 * MiB, doc="Bundles larger than this are refused: before download "
                                                 "when the size is announced, and on every chunk received.")
    clock_slack_s: float = field(86400.0, doc="Clock tolerance for expiry and not-yet-valid checks. A clock "
                                              "below the device's time floor (newest signed creation time "
                                              "installed) counts as unset: the floor is used instead.")
    allow_unsigned_factory: bool = field(True, doc="Run model.path's bare .tflite (unsigned: the factory "
                                                   "model) when no slot is active; false = run signed models "
                                                   "only. See docs/threat-model.md.")
    self_test_latency_ms: float = field(2000.0, doc="Self-test latency budget per case; a bundle may ask for "
                                                    "less, never more.")
    self_test_min_cases: int = field(1, doc="Self-test: a bundle with fewer cases is refused before the "
                                            "switch.")
    self_test_max_tolerance: float = field(0.1, doc="Self-test: the bundle's score tolerance is capped at "
                                                    "this.")
    trial_frames: int = field(200, doc="Trial after a switch: frames watched before committing (0 = none).")
    trial_seconds: float = field(60.0, doc="Trial: seconds watched before committing (both must pass).")
    trial_max_latency_ratio: float = field(3.0, doc="Trial fails when p95 latency exceeds this x the "
                                                    "previous model's.")
    trial_latency_floor_ms: float = field(2.0, doc="Trial: a previous p95 below this counts as this in the "
                                                   "latency ratio (sub-millisecond timings are noise).")
    trial_max_latency_ms: float = field(1000.0, doc="Trial fails when p95 latency exceeds this, with or "
                                                    "without a baseline (0 = no absolute limit).")
    trial_max_low_conf_rate: float = field(0.5, doc="Trial fails when the low-confidence rate rises "
                                                    "above the previous model's by more than this.")
    trial_max_low_conf_abs: float = field(0.9, doc="Without a baseline of the previous model (offline "
                                                   "install, first model): trial fails when the "
                                                   "low-confidence rate exceeds this.")
    trial_max_errors: int = field(3, doc="Trial fails after this many invoke errors (non-finite scores "
                                         "count as errors).")
    trial_stall_s: float = field(30.0, doc="Trial fails when frames keep arriving but none is inferred "
                                           "for this long (a hung model); the daemon then restarts on the "
                                           "previous model.")
    max_boot_attempts: int = field(1, doc="Starts on a trial model that end in a crash before rolling back "
                                          "at boot (1: the first crash during a trial rolls back).")

    def validate(self) -> None:
        if not self.tls and self.token_file:
            for target in [self.hub_grpc, *self.grpc_targets]:
                if target and not is_loopback(target):
                    raise ValueError(f"tls = false would send the token in plain text to {target}: plain text is "
                                     "only for a hub on this machine; set tls = true")
        if self.model_name and not valid_model_name(self.model_name):
            raise ValueError(f"model_name must be {MODEL_NAME_RULE} (the name bundles carry)")
        if not self.max_bundle_bytes >= 1024:
            raise ValueError(f"max_bundle_bytes must be at least 1024, not {self.max_bundle_bytes!r}")
        _positive(self, "self_test_latency_ms", "trial_max_errors", "trial_stall_s", "max_boot_attempts")
        _not_negative(self, "clock_slack_s", "self_test_min_cases", "trial_frames", "trial_seconds",
                      "trial_latency_floor_ms", "trial_max_latency_ms")
        for n in ("self_test_max_tolerance", "trial_max_low_conf_rate", "trial_max_low_conf_abs"):
            if not 0.0 <= getattr(self, n) <= 1.0:
                raise ValueError(f"{n} must be within 0..1, not {getattr(self, n)!r}")
        if not self.trial_max_latency_ratio > 1.0:
            raise ValueError(f"trial_max_latency_ratio must be > 1, not {self.trial_max_latency_ratio!r}")
