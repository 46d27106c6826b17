from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_TRAIN: _ClassVar[TaskKind]
    TASK_KIND_EVALUATE: _ClassVar[TaskKind]
    TASK_KIND_WAIT: _ClassVar[TaskKind]
    TASK_KIND_STOP: _ClassVar[TaskKind]
    TASK_KIND_SECAGG_ADVERTISE: _ClassVar[TaskKind]
    TASK_KIND_SECAGG_SHARE_KEYS: _ClassVar[TaskKind]
    TASK_KIND_SECAGG_MASKED_INPUT: _ClassVar[TaskKind]
    TASK_KIND_SECAGG_UNMASK: _ClassVar[TaskKind]
    TASK_KIND_SECAGG_CONSISTENCY: _ClassVar[TaskKind]
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_TRAIN: TaskKind
TASK_KIND_EVALUATE: TaskKind
TASK_KIND_WAIT: TaskKind
TASK_KIND_STOP: TaskKind
TASK_KIND_SECAGG_ADVERTISE: TaskKind
TASK_KIND_SECAGG_SHARE_KEYS: TaskKind
TASK_KIND_SECAGG_MASKED_INPUT: TaskKind
TASK_KIND_SECAGG_UNMASK: TaskKind
TASK_KIND_SECAGG_CONSISTENCY: TaskKind

class PayloadInfo(_message.Message):
    __slots__ = ("size", "encoding", "blake3")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    BLAKE3_FIELD_NUMBER: _ClassVar[int]
    size: int
    encoding: str
    blake3: bytes
    def __init__(self, size: _Optional[int] = ..., encoding: _Optional[str] = ..., blake3: _Optional[bytes] = ...) -> None: ...

class PayloadTrailer(_message.Message):
    __slots__ = ("blake3",)
    BLAKE3_FIELD_NUMBER: _ClassVar[int]
    blake3: bytes
    def __init__(self, blake3: _Optional[bytes] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("client_version",)
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    client_version: str
    def __init__(self, client_version: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("federation_id", "identity", "task", "task_config", "chunk_size", "heartbeat_interval_seconds", "num_rounds", "model_manifest_sha256", "model_manifest", "finished", "exchanged_tensors", "local_tensors", "frozen_sha256")
    class TaskConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TASK_CONFIG_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NUM_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_MANIFEST_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    EXCHANGED_TENSORS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_TENSORS_FIELD_NUMBER: _ClassVar[int]
    FROZEN_SHA256_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    identity: str
    task: str
    task_config: _containers.ScalarMap[str, str]
    chunk_size: int
    heartbeat_interval_seconds: float
    num_rounds: int
    model_manifest_sha256: bytes
    model_manifest: _containers.RepeatedCompositeFieldContainer[TensorManifestEntry]
    finished: bool
    exchanged_tensors: _containers.RepeatedScalarFieldContainer[str]
    local_tensors: _containers.RepeatedScalarFieldContainer[str]
    frozen_sha256: bytes
    def __init__(self, federation_id: _Optional[str] = ..., identity: _Optional[str] = ..., task: _Optional[str] = ..., task_config: _Optional[_Mapping[str, str]] = ..., chunk_size: _Optional[int] = ..., heartbeat_interval_seconds: _Optional[float] = ..., num_rounds: _Optional[int] = ..., model_manifest_sha256: _Optional[bytes] = ..., model_manifest: _Optional[_Iterable[_Union[TensorManifestEntry, _Mapping]]] = ..., finished: _Optional[bool] = ..., exchanged_tensors: _Optional[_Iterable[str]] = ..., local_tensors: _Optional[_Iterable[str]] = ..., frozen_sha256: _Optional[bytes] = ...) -> None: ...

class TensorManifestEntry(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PullTaskRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("task_id", "round", "kind", "payload", "retry_after_seconds", "seed", "secagg", "task_config", "update_codec")
    class TaskConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SettingValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SettingValue, _Mapping]] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    TASK_CONFIG_FIELD_NUMBER: _ClassVar[int]
    UPDATE_CODEC_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    round: int
    kind: TaskKind
    payload: PayloadInfo
    retry_after_seconds: float
    seed: int
    secagg: SecAggSetup
    task_config: _containers.MessageMap[str, SettingValue]
    update_codec: UpdateCodec
    def __init__(self, task_id: _Optional[str] = ..., round: _Optional[int] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., payload: _Optional[_Union[PayloadInfo, _Mapping]] = ..., retry_after_seconds: _Optional[float] = ..., seed: _Optional[int] = ..., secagg: _Optional[_Union[SecAggSetup, _Mapping]] = ..., task_config: _Optional[_Mapping[str, SettingValue]] = ..., update_codec: _Optional[_Union[UpdateCodec, _Mapping]] = ...) -> None: ...

class UpdateCodec(_message.Message):
    __slots__ = ("name", "block_size", "topk")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    name: str
    block_size: int
    topk: float
    def __init__(self, name: _Optional[str] = ..., block_size: _Optional[int] = ..., topk: _Optional[float] = ...) -> None: ...

class SettingValue(_message.Message):
    __slots__ = ("text", "integer", "number", "flag")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    text: str
    integer: int
    number: float
    flag: bool
    def __init__(self, text: _Optional[str] = ..., integer: _Optional[int] = ..., number: _Optional[float] = ..., flag: _Optional[bool] = ...) -> None: ...

class SecAggSetup(_message.Message):
    __slots__ = ("session", "threshold", "ring_bits", "vector_length", "frac_bits", "value_bound", "max_weight", "noise_std", "clip_norm", "neighbours", "neighbour_threshold")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    RING_BITS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_LENGTH_FIELD_NUMBER: _ClassVar[int]
    FRAC_BITS_FIELD_NUMBER: _ClassVar[int]
    VALUE_BOUND_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NOISE_STD_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOUR_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    session: str
    threshold: int
    ring_bits: int
    vector_length: int
    frac_bits: int
    value_bound: float
    max_weight: float
    noise_std: float
    clip_norm: float
    neighbours: int
    neighbour_threshold: int
    def __init__(self, session: _Optional[str] = ..., threshold: _Optional[int] = ..., ring_bits: _Optional[int] = ..., vector_length: _Optional[int] = ..., frac_bits: _Optional[int] = ..., value_bound: _Optional[float] = ..., max_weight: _Optional[float] = ..., noise_std: _Optional[float] = ..., clip_norm: _Optional[float] = ..., neighbours: _Optional[int] = ..., neighbour_threshold: _Optional[int] = ...) -> None: ...

class SecAggKeys(_message.Message):
    __slots__ = ("cipher_key", "mask_key", "certificate", "signature")
    CIPHER_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    cipher_key: bytes
    mask_key: bytes
    certificate: bytes
    signature: bytes
    def __init__(self, cipher_key: _Optional[bytes] = ..., mask_key: _Optional[bytes] = ..., certificate: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SecAggRoster(_message.Message):
    __slots__ = ("keys",)
    class KeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SecAggKeys
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SecAggKeys, _Mapping]] = ...) -> None: ...
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.MessageMap[str, SecAggKeys]
    def __init__(self, keys: _Optional[_Mapping[str, SecAggKeys]] = ...) -> None: ...

class SecAggShares(_message.Message):
    __slots__ = ("bundles", "contributors")
    class BundlesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.ScalarMap[str, bytes]
    contributors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, bundles: _Optional[_Mapping[str, bytes]] = ..., contributors: _Optional[_Iterable[str]] = ...) -> None: ...

class SecAggUnmaskRequest(_message.Message):
    __slots__ = ("survivors", "dropped", "signatures")
    class SignaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    signatures: _containers.ScalarMap[str, bytes]
    def __init__(self, survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ..., signatures: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class SecAggViewSignature(_message.Message):
    __slots__ = ("signature",)
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    def __init__(self, signature: _Optional[bytes] = ...) -> None: ...

class SecAggUnmaskResponse(_message.Message):
    __slots__ = ("self_mask_shares", "mask_key_shares")
    class SelfMaskSharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    class MaskKeySharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    SELF_MASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    self_mask_shares: _containers.ScalarMap[str, bytes]
    mask_key_shares: _containers.ScalarMap[str, bytes]
    def __init__(self, self_mask_shares: _Optional[_Mapping[str, bytes]] = ..., mask_key_shares: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class TaskMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("task_id", "round", "num_examples", "metrics", "payload")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    round: int
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    payload: PayloadInfo
    def __init__(self, task_id: _Optional[str] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., payload: _Optional[_Union[PayloadInfo, _Mapping]] = ...) -> None: ...

class ResultMessage(_message.Message):
    __slots__ = ("header", "chunk", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    chunk: Chunk
    trailer: PayloadTrailer
    def __init__(self, header: _Optional[_Union[ResultHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., trailer: _Optional[_Union[PayloadTrailer, _Mapping]] = ...) -> None: ...

class PushResultReply(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("federation_active",)
    FEDERATION_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    federation_active: bool
    def __init__(self, federation_active: _Optional[bool] = ...) -> None: ...
