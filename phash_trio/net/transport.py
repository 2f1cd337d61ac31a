"""An httpx transport that connects only to the addresses it checked (no DNS rebinding).

httpx resolves a host itself when it connects; a check done before the request (resolve, see
only public addresses) leaves a window in which a hostile DNS server can answer differently the
second time (rebinding to 127.0.0.1 or a cloud metadata address). Here the httpcore network
backend resolves the host once, refuses it unless every address is public, and opens the TCP
connection to one of exactly those addresses. TLS SNI and the Host header still carry the name
(httpcore passes the origin's host to ``start_tls``), so certificates are verified as usual.

A refused host surfaces as ``httpx.ConnectError`` whose ``__cause__`` is a
:class:`NonPublicAddress` (use :func:`refused_address` to tell it from a network failure).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx
import trio
from httpcore import AsyncNetworkStream, TrioBackend

from phash_trio.net.endpoints import (
    BadEndpoint,
    Resolve,
    public_addresses,
    system_resolve,
)

__all__ = ["NonPublicAddress", "PinnedBackend", "guarded_transport", "refused_address"]


_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


class NonPublicAddress(httpcore.ConnectError):
    """The host resolves to an address we must not contact; nothing was connected."""


class PinnedBackend(TrioBackend):
    """Trio backend whose ``connect_tcp`` resolves once, checks, and connects to that address."""

    def __init__(self, *, allow_private: bool = False, resolve: Resolve = system_resolve) -> None:
        self._allow_private = allow_private
        self._resolve = resolve
        #: Every (host, address) connected to, oldest first (bounded), for tests and debugging.
        self.connected: list[tuple[str, str]] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> AsyncNetworkStream:
        limit = float("inf") if timeout is None else timeout
        try:
            with trio.fail_after(limit):
                addresses = await public_addresses(
                    host, port, resolve=self._resolve, allow_private=self._allow_private
                )
        except BadEndpoint as exc:
            raise NonPublicAddress(f"{host}: {exc.reason}") from None
        except trio.TooSlowError:
            raise httpcore.ConnectTimeout(f"{host}: no DNS answer in {limit:g} s") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"{host}: cannot resolve: {exc}") from None
        # The parent connects by name; here every address given is an IP literal, so trio does
        # not resolve again (happy eyeballs over the checked addresses, in the order given).
        last: Exception | None = None
        for address in addresses:
            try:
                stream = await super().connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:  # try the next checked address
                last = exc
                continue
            self.connected.append((host, address))
            del self.connected[:-100]
            return stream
        assert last is not None
        raise last


def guarded_transport(
    *,
    allow_private: bool = False,
    resolve: Resolve = system_resolve,
    limits: httpx.Limits = _LIMITS,
    ssl_context: ssl.SSLContext | None = None,
) -> httpx.AsyncHTTPTransport:
    """An ``httpx.AsyncHTTPTransport`` whose connections go through :class:`PinnedBackend`."""
    transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    # httpx builds its pool without a backend hook; rebuild it with ours (same settings).
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context or httpx.create_ssl_context(),  # certifi, as httpx itself
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=PinnedBackend(allow_private=allow_private, resolve=resolve),
    )
    return transport


def refused_address(exc: BaseException) -> NonPublicAddress | None:
    """The :class:`NonPublicAddress` behind an httpx error, if that is why it failed."""
    cause = exc.__cause__
    return cause if isinstance(cause, NonPublicAddress) else None
