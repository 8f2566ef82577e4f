"""Connection-level limits of ``mocohub serve`` that aiohttp lacks: a header timeout and a cap.

aiohttp keeps a connection that never completes its first request's headers
for its ``keepalive_timeout`` at best (an hour by default, and not at all
before aiohttp 3.14), and accepts connections until the process runs out of
descriptors. :class:`ConnectionGuard` wraps the public connection hooks of
aiohttp's ``web.Server``: a connection that has not sent its first request's
headers within ``header_timeout_s`` is answered 408 and closed, and one over
``max_connections`` is answered 503 and closed. (Later requests on a kept-alive
connection are timed by aiohttp's ``keepalive_timeout``, which the app sets to
the same value.)

Malformed HTTP (a bad chunk size, a header line too long, ...) is answered
400 by aiohttp, which logs it with a traceback; :class:`ClientErrorLog` makes
that one line, as the client's mistake it is.

Example:
    >>> guard = ConnectionGuard(settings, stats)
    >>> guard.attach(runner.server)  # after runner.setup()
    >>> guard.request_started(request.protocol)  # in a middleware
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

if TYPE_CHECKING:
    from .serve import ServeSettings

__all__ = ["ClientErrorLog", "ConnectionGuard"]

log = logging.getLogger("mocohub.serve")


def _raw_response(status: int, phrase: str, reason: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, for use outside aiohttp."""
    body = json.dumps({"error": reason}).encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class ConnectionGuard:
    """The header timeout and the cap on open connections, around aiohttp's ``web.Server``.

    Args:
        settings: ``header_timeout_s`` and ``max_connections`` are used.
        stats: counters ``header_timeouts`` and ``connections_refused`` are increased.

    Example:
        >>> guard = ConnectionGuard(ServeSettings(max_connections=256), stats)
        >>> guard.attach(runner.server)
    """

    def __init__(self, settings: ServeSettings, stats: dict[str, int]) -> None:
        self.settings, self.stats = settings, stats
        self._timers: dict[web.RequestHandler, asyncio.TimerHandle] = {}
        self._full = False

    def attach(self, server: web.Server) -> None:
        """Watch ``server``'s connections (an ``AppRunner``'s, after ``setup()``)."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: web.RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            if len(server.connections) > self.settings.max_connections:
                self.stats["connections_refused"] += 1
                if not self._full:  # once per episode, not once per connection
                    log.warning(
                        "%d connections open, the limit (--max-connections): refusing more",
                        self.settings.max_connections,
                    )
                self._full = True
                reason = (
                    f"The server has {self.settings.max_connections} connections open, its "
                    "limit; retry later."
                )
                transport.write(_raw_response(503, "Service Unavailable", reason))
                # closed on the next turn of the loop: the handler starts its task after
                # this hook returns, and that task expects the connection still registered
                asyncio.get_running_loop().call_soon(transport.close)
                return
            self._full = False
            self._timers[handler] = asyncio.get_running_loop().call_later(
                self.settings.header_timeout_s, self._expire, handler, transport
            )

        def connection_lost(handler: web.RequestHandler, exc: BaseException | None = None) -> None:
            timer = self._timers.pop(handler, None)
            if timer is not None:
                timer.cancel()
            lost(handler, exc)

        # web.Server's public hooks, called by each connection's RequestHandler
        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def request_started(self, handler: web.RequestHandler) -> None:
        """The connection's first request has arrived: its headers were in time."""
        timer = self._timers.pop(handler, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        self._timers.pop(handler, None)
        if transport.is_closing():
            return
        self.stats["header_timeouts"] += 1
        reason = (
            f"The request's headers did not arrive within {self.settings.header_timeout_s:g} s."
        )
        transport.write(_raw_response(408, "Request Timeout", reason))
        transport.close()


class ClientErrorLog(logging.LoggerAdapter):
    """aiohttp's server logger, with a client's malformed HTTP as one warning line.

    Give it as ``logger`` to aiohttp's request handlers (``handler_args``); any
    other exception keeps its traceback.

    Example:
        >>> web.Application(handler_args={"logger": ClientErrorLog(logging.getLogger("x"))})
    """

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(error, HttpProcessingError):
            detail = " ".join(str(error.message).split())[:200]  # may hold the client's bytes
            text = str(msg) % args if args else str(msg)
            self.warning("%s: %d (%s)", text, error.code, detail, **kwargs)
        else:
            self.error(msg, *args, exc_info=exc_info, **kwargs)
