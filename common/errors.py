"""The exception hierarchy shared by every fedlink component."""


class FedlinkError(Exception):
    """Base class: every error fedlink raises on purpose derives from this."""


class ConfigError(FedlinkError):
    """A configuration value is missing, malformed or out of range."""


class PKIError(FedlinkError):
    """Certificates or keys are missing, invalid, or do not belong together."""


class PayloadError(FedlinkError):
    """A streamed payload is malformed: wrong size, wrong hash, chunks out of order."""


class PayloadIncomplete(PayloadError):
    """A payload stream ended before the announced size arrived."""


class TensorFormatError(FedlinkError):
    """Bytes are not a valid safetensors document, or use an unsupported dtype."""


class UpdateRejected(FedlinkError):
    """A client's update failed validation; the global model was not touched.

    `code` names the gRPC status the coordinator answers with, so the servicer stays thin.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class UploadIncomplete(FedlinkError):
    """A result stream ended before its payload was complete. A client whose connection drops
    mid-upload can look exactly like this to the coordinator (gRPC may end the request stream
    before it reports the cancellation), so it counts as an interrupted upload that the client
    may retry, not as a rejected one."""

    code = "DATA_LOSS"


class StorageError(FedlinkError, OSError):
    """The coordinator could not write a file it needs (its disk is full or failing).

    For an upload being spooled this is the coordinator's problem, not the client's: the client
    is told `code` (RESOURCE_EXHAUSTED), backs off and retries. For the global model or a
    checkpoint, the last good state stays in place and the coordinator stops without telling
    clients the federation finished, so a restart (once there is space) resumes.
    """

    code = "RESOURCE_EXHAUSTED"


class AccessDenied(FedlinkError):
    """A caller may not use the coordinator right now: not on the allow-list, revoked, outside
    its certificate's validity, a superseded session, or over a rate or concurrency limit.

    `code` names the gRPC status the coordinator answers with.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class TaskError(FedlinkError):
    """A task module is missing, incomplete, or cannot provide the requested data."""


class DataUnavailableError(TaskError):
    """A data set cannot be loaded (e.g. it must be downloaded and there is no network)."""


class SecAggError(FedlinkError):
    """A secure-aggregation step cannot go on: too few participants or shares for the threshold,
    or a malformed, inconsistent or unauthenticated message."""


class SecAggRefused(SecAggError):
    """A client refuses a request that would reveal its secrets, e.g. both the self-mask share and
    the masking-key share of the same peer (which would let the server unmask that peer's input)."""


class BelowPrivacyFloor(SecAggRefused):
    """The coordinator asks a client for less privacy than its site's own floor allows (a
    smaller cohort or threshold, no DP or less noise, more attempts at one round, or no secure
    aggregation at all): the client takes no part."""
