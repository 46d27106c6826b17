"""An in-process channel: the coordinator's real services (servicer, access checks, limits,
round engine), called by real client code without a socket.

`InProcessChannel` stands in for a `grpc.Channel` under the generated stubs: each call is
serialized with protobuf and handed to the service's own handler on an event loop, with a
context that presents the caller's certificate as a verified TLS handshake would. So the
engine is driven exactly as over the network, minus TLS and TCP: the seam that tests use to run
a federation in one process, and that simulation builds on (docs/architecture.md). It is not a
security boundary: whoever constructs a channel chooses the certificate it presents.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc

Serializer = Callable[[Any], bytes] | None
Deserializer = Callable[[bytes], Any] | None
Metadata = Sequence[tuple[str, str]]
# A grpc.aio handler's coroutine (or async generator) function, as the servicer defines it.
Behavior = Callable[..., Any]
_END = object()


class InProcessRpcError(grpc.RpcError):
    """A call ended with a status other than OK, as grpc.RpcError reports it to a client."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Context:
    """The servicer's view of one call: who is calling, with which metadata."""

    def __init__(self, peer: str, cert_pem: bytes | None, metadata: Metadata | None) -> None:
        self._peer = peer
        self._auth = {"x509_pem_cert": [cert_pem]} if cert_pem is not None else {}
        self._metadata = tuple(metadata or ())
        self.trailing: tuple[tuple[str, str], ...] = ()

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        self.trailing = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Aborted(code, details)


class _Call:
    """What `with_call` returns beside the response."""

    def __init__(self, context: _Context) -> None:
        self._context = context

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._context.trailing

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK

    def details(self) -> str:
        return ""


class HandlerCollector:
    """Takes the handlers that `add_*Servicer_to_server` registers, by method path."""

    def __init__(self) -> None:
        self.methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        for handler in handlers:
            for name, method in getattr(handler, "_method_handlers", {}).items():
                self.methods[name] = method

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        for name, method in handlers.items():
            self.methods[f"/{service}/{name}"] = method


class InProcessServices:
    """The coordinator's services on an event loop of their own thread, for in-process
    channels. `register(server)` is a generated `add_*Servicer_to_server` bound to a servicer."""

    def __init__(self, *registrations: Callable[[Any], None]) -> None:
        collector = HandlerCollector()
        for register in registrations:
            register(collector)
        self.methods = collector.methods
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="inprocess", daemon=True)
        self._thread.start()

    def channel(self, cert_pem: bytes | None, peer: str = "inprocess") -> InProcessChannel:
        """A channel whose calls present `cert_pem` as their verified client certificate."""
        return InProcessChannel(self, cert_pem, peer)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    def run(self, coroutine: Any, timeout: float | None = None) -> Any:
        """Run `coroutine` on the services' loop; its result, or InProcessRpcError."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise InProcessRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
            ) from None
        except _Aborted as exc:
            raise InProcessRpcError(exc.code, exc.details) from None

    def handler(self, method: str) -> grpc.RpcMethodHandler[Any, Any]:
        found = self.methods.get(method)
        if found is None:
            raise InProcessRpcError(grpc.StatusCode.UNIMPLEMENTED, f"no method {method}")
        return found


class InProcessChannel:
    """Quacks like `grpc.Channel` for generated stubs (unary-unary, unary-stream and
    stream-unary calls, the kinds fedlink's services use)."""

    def __init__(self, services: InProcessServices, cert_pem: bytes | None, peer: str) -> None:
        self._services = services
        self._cert_pem = cert_pem
        self._peer = peer

    def _context(self, metadata: Metadata | None) -> _Context:
        return _Context(self._peer, self._cert_pem, metadata)

    def unary_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        **_: Any,
    ) -> _UnaryUnary:
        return _UnaryUnary(self, method, request_serializer, response_deserializer)

    def unary_stream(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        **_: Any,
    ) -> _UnaryStream:
        return _UnaryStream(self, method, request_serializer, response_deserializer)

    def stream_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        **_: Any,
    ) -> _StreamUnary:
        return _StreamUnary(self, method, request_serializer, response_deserializer)

    def close(self) -> None:
        pass


def _through_wire(serialize: Serializer, deserialize: Deserializer, message: Any) -> Any:
    """`message` as the other side would read it: serialized and parsed again."""
    data = serialize(message) if serialize is not None else message
    return deserialize(data) if deserialize is not None else data


class _Method:
    def __init__(
        self,
        channel: InProcessChannel,
        method: str,
        serialize: Serializer,
        deserialize: Deserializer,
    ) -> None:
        self._channel = channel
        self._method = method
        self._serialize = serialize
        self._deserialize = deserialize

    @property
    def _services(self) -> InProcessServices:
        return self._channel._services

    def _request(self, handler: grpc.RpcMethodHandler[Any, Any], request: Any) -> Any:
        return _through_wire(self._serialize, handler.request_deserializer, request)

    def _response(self, handler: grpc.RpcMethodHandler[Any, Any], response: Any) -> Any:
        return _through_wire(handler.response_serializer, self._deserialize, response)


class _UnaryUnary(_Method):
    def __call__(
        self, request: Any, timeout: float | None = None, metadata: Metadata | None = None, **_: Any
    ) -> Any:
        return self.with_call(request, timeout=timeout, metadata=metadata)[0]

    def with_call(
        self, request: Any, timeout: float | None = None, metadata: Metadata | None = None, **_: Any
    ) -> tuple[Any, _Call]:
        handler = self._services.handler(self._method)
        behavior: Behavior | None = handler.unary_unary
        assert behavior is not None
        context = self._channel._context(metadata)
        reply = self._services.run(behavior(self._request(handler, request), context), timeout)
        return self._response(handler, reply), _Call(context)


class _UnaryStream(_Method):
    def __call__(
        self, request: Any, timeout: float | None = None, metadata: Metadata | None = None, **_: Any
    ) -> _ResponseStream:
        handler = self._services.handler(self._method)
        behavior: Behavior | None = handler.unary_stream
        assert behavior is not None
        context = self._channel._context(metadata)
        replies = behavior(self._request(handler, request), context)
        return _ResponseStream(self, handler, replies)


class _ResponseStream:
    """A server stream read one message at a time from the caller's thread: each `next` runs
    the handler up to its next message, so a slow reader holds the handler back (flow control)."""

    def __init__(
        self, method: _Method, handler: grpc.RpcMethodHandler[Any, Any], replies: Any
    ) -> None:
        self._method = method
        self._handler = handler
        self._replies: AsyncIterator[Any] = replies

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        reply = self._method._services.run(anext(self._replies, _END))
        if reply is _END:
            raise StopIteration
        return self._method._response(self._handler, reply)

    def cancel(self) -> None:
        self._method._services.run(self._replies.aclose())  # type: ignore[attr-defined]


class _StreamUnary(_Method):
    def __call__(
        self,
        requests: Iterator[Any],
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **_: Any,
    ) -> Any:
        handler = self._services.handler(self._method)
        behavior: Behavior | None = handler.stream_unary
        assert behavior is not None
        context = self._channel._context(metadata)

        async def messages() -> AsyncIterator[Any]:
            loop = asyncio.get_running_loop()
            while (request := await loop.run_in_executor(None, next, requests, _END)) is not _END:
                yield self._request(handler, request)

        reply = self._services.run(behavior(messages(), context), timeout)
        return self._response(handler, reply)
