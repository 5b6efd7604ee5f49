from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SampleReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLE_REASON_UNSPECIFIED: _ClassVar[SampleReason]
    LOW_CONFIDENCE: _ClassVar[SampleReason]
    LOW_MARGIN: _ClassVar[SampleReason]
    HIGH_ENTROPY: _ClassVar[SampleReason]
    TRIAL: _ClassVar[SampleReason]
SAMPLE_REASON_UNSPECIFIED: SampleReason
LOW_CONFIDENCE: SampleReason
LOW_MARGIN: SampleReason
HIGH_ENTROPY: SampleReason
TRIAL: SampleReason

class ModelRef(_message.Message):
    __slots__ = ("name", "version", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class TopScore(_message.Message):
    __slots__ = ("index", "label", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    score: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("frame_id", "device_id", "capture_time_ms", "model", "reasons", "top_k", "image", "image_format", "width", "height", "source", "sequence", "image_bytes")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    frame_id: str
    device_id: str
    capture_time_ms: int
    model: ModelRef
    reasons: _containers.RepeatedScalarFieldContainer[SampleReason]
    top_k: _containers.RepeatedCompositeFieldContainer[TopScore]
    image: bytes
    image_format: str
    width: int
    height: int
    source: str
    sequence: int
    image_bytes: int
    def __init__(self, frame_id: _Optional[str] = ..., device_id: _Optional[str] = ..., capture_time_ms: _Optional[int] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., reasons: _Optional[_Iterable[_Union[SampleReason, str]]] = ..., top_k: _Optional[_Iterable[_Union[TopScore, _Mapping]]] = ..., image: _Optional[bytes] = ..., image_format: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., source: _Optional[str] = ..., sequence: _Optional[int] = ..., image_bytes: _Optional[int] = ...) -> None: ...

class Telemetry(_message.Message):
    __slots__ = ("device_id", "time_ms", "fps", "latency_p50_ms", "latency_p95_ms", "queue_depth", "spool_bytes", "spool_frames", "spool_evictions", "model", "uptime_s", "frames_processed", "frames_sampled", "frames_dropped", "frames_corrupt", "frames_low_confidence", "score_histogram", "dead_letters", "desired_refused", "frames_receipted", "frames_resent", "oldest_unreceipted_age_s", "receipts", "frames_refused_by_hub", "frames_awaiting_receipt", "sources", "jetson")
    class DesiredRefusedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P95_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    SPOOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPOOL_FRAMES_FIELD_NUMBER: _ClassVar[int]
    SPOOL_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_CORRUPT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_LOW_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SCORE_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_REFUSED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_RECEIPTED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_RESENT_FIELD_NUMBER: _ClassVar[int]
    OLDEST_UNRECEIPTED_AGE_S_FIELD_NUMBER: _ClassVar[int]
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_REFUSED_BY_HUB_FIELD_NUMBER: _ClassVar[int]
    FRAMES_AWAITING_RECEIPT_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    JETSON_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    time_ms: int
    fps: float
    latency_p50_ms: float
    latency_p95_ms: float
    queue_depth: int
    spool_bytes: int
    spool_frames: int
    spool_evictions: int
    model: ModelRef
    uptime_s: float
    frames_processed: int
    frames_sampled: int
    frames_dropped: int
    frames_corrupt: int
    frames_low_confidence: int
    score_histogram: _containers.RepeatedScalarFieldContainer[int]
    dead_letters: int
    desired_refused: _containers.ScalarMap[str, int]
    frames_receipted: int
    frames_resent: int
    oldest_unreceipted_age_s: float
    receipts: int
    frames_refused_by_hub: int
    frames_awaiting_receipt: int
    sources: _containers.RepeatedCompositeFieldContainer[SourceStats]
    jetson: JetsonStats
    def __init__(self, device_id: _Optional[str] = ..., time_ms: _Optional[int] = ..., fps: _Optional[float] = ..., latency_p50_ms: _Optional[float] = ..., latency_p95_ms: _Optional[float] = ..., queue_depth: _Optional[int] = ..., spool_bytes: _Optional[int] = ..., spool_frames: _Optional[int] = ..., spool_evictions: _Optional[int] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., uptime_s: _Optional[float] = ..., frames_processed: _Optional[int] = ..., frames_sampled: _Optional[int] = ..., frames_dropped: _Optional[int] = ..., frames_corrupt: _Optional[int] = ..., frames_low_confidence: _Optional[int] = ..., score_histogram: _Optional[_Iterable[int]] = ..., dead_letters: _Optional[int] = ..., desired_refused: _Optional[_Mapping[str, int]] = ..., frames_receipted: _Optional[int] = ..., frames_resent: _Optional[int] = ..., oldest_unreceipted_age_s: _Optional[float] = ..., receipts: _Optional[int] = ..., frames_refused_by_hub: _Optional[int] = ..., frames_awaiting_receipt: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[SourceStats, _Mapping]]] = ..., jetson: _Optional[_Union[JetsonStats, _Mapping]] = ...) -> None: ...

class SourceStats(_message.Message):
    __slots__ = ("name", "fps", "frames_captured", "frames_processed", "frames_sampled", "frames_dropped", "frames_corrupt", "errors", "queue_depth", "up", "reconnects")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_CAPTURED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_CORRUPT_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    RECONNECTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    fps: float
    frames_captured: int
    frames_processed: int
    frames_sampled: int
    frames_dropped: int
    frames_corrupt: int
    errors: int
    queue_depth: int
    up: bool
    reconnects: int
    def __init__(self, name: _Optional[str] = ..., fps: _Optional[float] = ..., frames_captured: _Optional[int] = ..., frames_processed: _Optional[int] = ..., frames_sampled: _Optional[int] = ..., frames_dropped: _Optional[int] = ..., frames_corrupt: _Optional[int] = ..., errors: _Optional[int] = ..., queue_depth: _Optional[int] = ..., up: bool = ..., reconnects: _Optional[int] = ...) -> None: ...

class JetsonStats(_message.Message):
    __slots__ = ("time_ms", "cpu_load_pct", "cpu_core_load_pct", "gpu_load_pct", "gpu_freq_mhz", "emc_load_pct", "emc_freq_mhz", "ram_used_mb", "ram_total_mb", "temperature_c", "power_mw")
    class TemperatureCEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class PowerMwEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    CPU_LOAD_PCT_FIELD_NUMBER: _ClassVar[int]
    CPU_CORE_LOAD_PCT_FIELD_NUMBER: _ClassVar[int]
    GPU_LOAD_PCT_FIELD_NUMBER: _ClassVar[int]
    GPU_FREQ_MHZ_FIELD_NUMBER: _ClassVar[int]
    EMC_LOAD_PCT_FIELD_NUMBER: _ClassVar[int]
    EMC_FREQ_MHZ_FIELD_NUMBER: _ClassVar[int]
    RAM_USED_MB_FIELD_NUMBER: _ClassVar[int]
    RAM_TOTAL_MB_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    POWER_MW_FIELD_NUMBER: _ClassVar[int]
    time_ms: int
    cpu_load_pct: float
    cpu_core_load_pct: _containers.RepeatedScalarFieldContainer[float]
    gpu_load_pct: float
    gpu_freq_mhz: int
    emc_load_pct: float
    emc_freq_mhz: int
    ram_used_mb: int
    ram_total_mb: int
    temperature_c: _containers.ScalarMap[str, float]
    power_mw: _containers.ScalarMap[str, int]
    def __init__(self, time_ms: _Optional[int] = ..., cpu_load_pct: _Optional[float] = ..., cpu_core_load_pct: _Optional[_Iterable[float]] = ..., gpu_load_pct: _Optional[float] = ..., gpu_freq_mhz: _Optional[int] = ..., emc_load_pct: _Optional[float] = ..., emc_freq_mhz: _Optional[int] = ..., ram_used_mb: _Optional[int] = ..., ram_total_mb: _Optional[int] = ..., temperature_c: _Optional[_Mapping[str, float]] = ..., power_mw: _Optional[_Mapping[str, int]] = ...) -> None: ...

class VersionManifest(_message.Message):
    __slots__ = ("installed", "previous", "update_state", "reason", "target_version", "updated_ms", "version_floor")
    INSTALLED_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_MS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FLOOR_FIELD_NUMBER: _ClassVar[int]
    installed: ModelRef
    previous: ModelRef
    update_state: str
    reason: str
    target_version: int
    updated_ms: int
    version_floor: int
    def __init__(self, installed: _Optional[_Union[ModelRef, _Mapping]] = ..., previous: _Optional[_Union[ModelRef, _Mapping]] = ..., update_state: _Optional[str] = ..., reason: _Optional[str] = ..., target_version: _Optional[int] = ..., updated_ms: _Optional[int] = ..., version_floor: _Optional[int] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("device_id", "state", "time_ms", "model", "versions", "group", "software_version", "confidence_threshold")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    state: str
    time_ms: int
    model: ModelRef
    versions: VersionManifest
    group: str
    software_version: str
    confidence_threshold: float
    def __init__(self, device_id: _Optional[str] = ..., state: _Optional[str] = ..., time_ms: _Optional[int] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., versions: _Optional[_Union[VersionManifest, _Mapping]] = ..., group: _Optional[str] = ..., software_version: _Optional[str] = ..., confidence_threshold: _Optional[float] = ...) -> None: ...

class DesiredState(_message.Message):
    __slots__ = ("model_name", "version", "sha256", "size", "issued_ms", "rollback", "grpc_target", "rollback_from_version", "sequence", "expires_ms", "key_id", "signature")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ISSUED_MS_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    GRPC_TARGET_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_MS_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    sha256: str
    size: int
    issued_ms: int
    rollback: bool
    grpc_target: str
    rollback_from_version: int
    sequence: int
    expires_ms: int
    key_id: str
    signature: bytes
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., issued_ms: _Optional[int] = ..., rollback: bool = ..., grpc_target: _Optional[str] = ..., rollback_from_version: _Optional[int] = ..., sequence: _Optional[int] = ..., expires_ms: _Optional[int] = ..., key_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class RefusedFrame(_message.Message):
    __slots__ = ("frame_id", "reason")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    frame_id: str
    reason: str
    def __init__(self, frame_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("device_id", "frame_ids", "refused", "committed_ms", "hub_id")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_IDS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_MS_FIELD_NUMBER: _ClassVar[int]
    HUB_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    frame_ids: _containers.RepeatedScalarFieldContainer[str]
    refused: _containers.RepeatedCompositeFieldContainer[RefusedFrame]
    committed_ms: int
    hub_id: str
    def __init__(self, device_id: _Optional[str] = ..., frame_ids: _Optional[_Iterable[str]] = ..., refused: _Optional[_Iterable[_Union[RefusedFrame, _Mapping]]] = ..., committed_ms: _Optional[int] = ..., hub_id: _Optional[str] = ...) -> None: ...

class HubAnnouncement(_message.Message):
    __slots__ = ("receipts", "time_ms", "hub_id")
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    HUB_ID_FIELD_NUMBER: _ClassVar[int]
    receipts: bool
    time_ms: int
    hub_id: str
    def __init__(self, receipts: bool = ..., time_ms: _Optional[int] = ..., hub_id: _Optional[str] = ...) -> None: ...

class ResendRequest(_message.Message):
    __slots__ = ("time_ms", "reason", "hub_id")
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HUB_ID_FIELD_NUMBER: _ClassVar[int]
    time_ms: int
    reason: str
    hub_id: str
    def __init__(self, time_ms: _Optional[int] = ..., reason: _Optional[str] = ..., hub_id: _Optional[str] = ...) -> None: ...

class PushChunk(_message.Message):
    __slots__ = ("data", "total_size", "sha256")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_size: int
    sha256: str
    def __init__(self, data: _Optional[bytes] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class PushResult(_message.Message):
    __slots__ = ("model", "bundle_sha256", "size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    bundle_sha256: str
    size: int
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., bundle_sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("model", "bundle_sha256", "size", "created_ms", "metrics_json", "key_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    bundle_sha256: str
    size: int
    created_ms: int
    metrics_json: str
    key_id: str
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., bundle_sha256: _Optional[str] = ..., size: _Optional[int] = ..., created_ms: _Optional[int] = ..., metrics_json: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("model_name", "version", "offset", "chunk_size")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    offset: int
    chunk_size: int
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., offset: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class FetchChunk(_message.Message):
    __slots__ = ("data", "offset", "total_size", "sha256")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_size: int
    sha256: str
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("device_id", "group", "state", "last_seen_ms", "reported", "versions", "desired_version", "desired_model", "threshold", "desired_scope", "overrides_group", "enrolled_group", "enrolled_ms", "revoked_ms")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_MS_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_VERSION_FIELD_NUMBER: _ClassVar[int]
    DESIRED_MODEL_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DESIRED_SCOPE_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_GROUP_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_GROUP_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_MS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_MS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    group: str
    state: str
    last_seen_ms: int
    reported: ModelRef
    versions: VersionManifest
    desired_version: int
    desired_model: str
    threshold: float
    desired_scope: str
    overrides_group: bool
    enrolled_group: str
    enrolled_ms: int
    revoked_ms: int
    def __init__(self, device_id: _Optional[str] = ..., group: _Optional[str] = ..., state: _Optional[str] = ..., last_seen_ms: _Optional[int] = ..., reported: _Optional[_Union[ModelRef, _Mapping]] = ..., versions: _Optional[_Union[VersionManifest, _Mapping]] = ..., desired_version: _Optional[int] = ..., desired_model: _Optional[str] = ..., threshold: _Optional[float] = ..., desired_scope: _Optional[str] = ..., overrides_group: bool = ..., enrolled_group: _Optional[str] = ..., enrolled_ms: _Optional[int] = ..., revoked_ms: _Optional[int] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: str
    def __init__(self, group: _Optional[str] = ...) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    def __init__(self, devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ...) -> None: ...

class DeployRequest(_message.Message):
    __slots__ = ("model_name", "version", "device_id", "group")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    device_id: str
    group: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., device_id: _Optional[str] = ..., group: _Optional[str] = ...) -> None: ...

class DeployResponse(_message.Message):
    __slots__ = ("desired", "topic")
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    desired: DesiredState
    topic: str
    def __init__(self, desired: _Optional[_Union[DesiredState, _Mapping]] = ..., topic: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("device_id", "group")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    group: str
    def __init__(self, device_id: _Optional[str] = ..., group: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("desired", "topic")
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    desired: DesiredState
    topic: str
    def __init__(self, desired: _Optional[_Union[DesiredState, _Mapping]] = ..., topic: _Optional[str] = ...) -> None: ...
