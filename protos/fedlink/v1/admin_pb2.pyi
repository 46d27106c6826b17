from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ("max_log_lines",)
    MAX_LOG_LINES_FIELD_NUMBER: _ClassVar[int]
    max_log_lines: int
    def __init__(self, max_log_lines: _Optional[int] = ...) -> None: ...

class RunStatus(_message.Message):
    __slots__ = ("state", "round", "num_rounds", "completed_rounds", "phase", "deadline_unix", "quorum", "delivered", "clients_needed", "clients", "log", "updated_unix")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_NEEDED_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    state: str
    round: int
    num_rounds: int
    completed_rounds: int
    phase: str
    deadline_unix: float
    quorum: int
    delivered: int
    clients_needed: int
    clients: _containers.RepeatedCompositeFieldContainer[ClientStatus]
    log: _containers.RepeatedCompositeFieldContainer[LogLine]
    updated_unix: float
    def __init__(self, state: _Optional[str] = ..., round: _Optional[int] = ..., num_rounds: _Optional[int] = ..., completed_rounds: _Optional[int] = ..., phase: _Optional[str] = ..., deadline_unix: _Optional[float] = ..., quorum: _Optional[int] = ..., delivered: _Optional[int] = ..., clients_needed: _Optional[int] = ..., clients: _Optional[_Iterable[_Union[ClientStatus, _Mapping]]] = ..., log: _Optional[_Iterable[_Union[LogLine, _Mapping]]] = ..., updated_unix: _Optional[float] = ...) -> None: ...

class ClientStatus(_message.Message):
    __slots__ = ("identity", "connected", "last_seen_unix", "sampled", "bytes_down", "bytes_up", "last_result", "last_error", "excluded")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    LAST_RESULT_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    identity: str
    connected: bool
    last_seen_unix: float
    sampled: bool
    bytes_down: int
    bytes_up: int
    last_result: str
    last_error: str
    excluded: bool
    def __init__(self, identity: _Optional[str] = ..., connected: _Optional[bool] = ..., last_seen_unix: _Optional[float] = ..., sampled: _Optional[bool] = ..., bytes_down: _Optional[int] = ..., bytes_up: _Optional[int] = ..., last_result: _Optional[str] = ..., last_error: _Optional[str] = ..., excluded: _Optional[bool] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("time_unix", "level", "logger", "message")
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    LOGGER_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    time_unix: float
    level: str
    logger: str
    message: str
    def __init__(self, time_unix: _Optional[float] = ..., level: _Optional[str] = ..., logger: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class StopRunRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class StopRunReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExcludeClientRequest(_message.Message):
    __slots__ = ("identity", "reason")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    identity: str
    reason: str
    def __init__(self, identity: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ExcludeClientReply(_message.Message):
    __slots__ = ("already_excluded",)
    ALREADY_EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    already_excluded: bool
    def __init__(self, already_excluded: _Optional[bool] = ...) -> None: ...
