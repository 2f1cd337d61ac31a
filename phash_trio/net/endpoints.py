"""Every URL taken from untrusted data (a DID document's PDS, a did:web host) is checked here.

:func:`parse_endpoint` turns any value into an :class:`Endpoint` or one :class:`BadEndpoint`:
not a string, oversized, control characters, not http(s), userinfo, query or fragment, an
IDNA-invalid or malformed host, an odd port, an IP literal outside the public internet. The
host of the returned endpoint is ASCII (IDNA-encoded) so no later layer meets a name it cannot
encode (httpx raised ``InvalidURL`` for ``https://☃.net``, which stopped the service).

:func:`public_addresses` resolves a host once and refuses it when any address is not public;
:mod:`phash_trio.net.transport` then connects to exactly those addresses.

``allow_private`` (``ALLOW_PRIVATE_NETWORKS``, tests and the local demo) admits http, any port
and private addresses; the shape checks still apply.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import attrs
import idna
import trio

__all__ = [
    "MAX_ENDPOINT_CHARS",
    "BadEndpoint",
    "Endpoint",
    "Resolve",
    "is_public_address",
    "parse_endpoint",
    "public_addresses",
    "system_resolve",
]

#: Longest accepted endpoint URL; real ones are a few dozen characters.
MAX_ENDPOINT_CHARS = 512
#: Longest excerpt of a bad value kept in an error message (they end up in logs).
_SHOW_CHARS = 80
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_PATH = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")

#: ``(host, port) -> addresses``; injectable so tests can play a rebinding DNS server.
Resolve = Callable[[str, int], Awaitable[list[str]]]


class BadEndpoint(ValueError):
    """A URL from untrusted data that we will not contact; ``reason`` says why (one line)."""

    def __init__(self, value: object, reason: str) -> None:
        self.value = value
        self.reason = reason
        super().__init__(f"{_show(value)}: {reason}")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW_CHARS else text[: _SHOW_CHARS - 4] + "...'"


@attrs.frozen
class Endpoint:
    """A checked base URL: ASCII host, explicit port."""

    scheme: str
    #: Lower-case ASCII host (IDNA-encoded); IPv6 without brackets.
    host: str
    port: int
    #: Path without a trailing slash ("" for the root).
    path: str
    #: True when ``host`` is an IP literal.
    is_ip: bool

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.path}"


def is_public_address(text: str) -> bool:
    """True when ``text`` is an IP address on the public internet (IPv4-mapped v6 unwrapped)."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_reserved
        or addr.is_multicast
        or addr.is_unspecified
    )


def _ascii_host(value: object, host: str, allow_private: bool) -> tuple[str, bool]:
    """The host as lower-case ASCII and whether it is an IP literal; BadEndpoint otherwise."""
    try:
        return str(ipaddress.ip_address(host)), True
    except ValueError:
        pass
    if not host.isascii():
        try:
            host = idna.encode(host.lower(), uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError) as exc:
            raise BadEndpoint(value, f"host is not a valid IDNA name ({exc})") from None
    host = host.lower().rstrip(".")
    if len(host) > 253 or ("." not in host and not allow_private):
        raise BadEndpoint(value, "host is not a fully qualified domain name")
    for label in host.split("."):
        if not _LABEL.fullmatch(label):
            raise BadEndpoint(value, f"host label {label[:20]!r} is not a valid DNS label")
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError, ValueError) as exc:
                raise BadEndpoint(value, f"host is not a valid IDNA name ({exc})") from None
    if host.split(".")[-1].isdigit():
        raise BadEndpoint(value, "host looks like a malformed IP address")
    return host, False


def parse_endpoint(value: object, *, allow_private: bool = False) -> Endpoint:
    """Check an untrusted base URL's shape; raise :class:`BadEndpoint` with one reason."""
    if not isinstance(value, str):
        raise BadEndpoint(value, f"not a string but {type(value).__name__}")
    if len(value) > MAX_ENDPOINT_CHARS:
        raise BadEndpoint(value, f"longer than {MAX_ENDPOINT_CHARS} characters")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise BadEndpoint(value, "contains whitespace or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise BadEndpoint(value, f"not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in (("https", "http") if allow_private else ("https",)):
        raise BadEndpoint(value, "is not https" if not allow_private else "is not http(s)")
    if parts.username is not None or parts.password is not None:
        raise BadEndpoint(value, "carries credentials")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise BadEndpoint(value, "carries a query or a fragment")
    if not host:
        raise BadEndpoint(value, "has no host")
    ascii_host, is_ip = _ascii_host(value, host, allow_private)
    default = 443 if scheme == "https" else 80
    port = default if port is None else port
    if is_ip and not allow_private and not is_public_address(ascii_host):
        raise BadEndpoint(value, f"{ascii_host} is a non-public address")
    if not allow_private and port != 443:
        raise BadEndpoint(value, f"port {port} is not 443")
    if port == 0:
        raise BadEndpoint(value, "port 0")
    path = parts.path.rstrip("/")
    if not _PATH.fullmatch(path):
        raise BadEndpoint(value, "path has characters a URL path cannot carry")
    return Endpoint(scheme, ascii_host, port, path, is_ip)


async def system_resolve(host: str, port: int) -> list[str]:
    """Every address of ``host`` from the system resolver (OSError when there is none)."""
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def public_addresses(
    host: str, port: int, *, resolve: Resolve = system_resolve, allow_private: bool = False
) -> list[str]:
    """Resolve ``host`` once; BadEndpoint if any address is not public (OSError: no answer).

    All addresses must be public: an attacker who controls the name also picks which of its
    addresses a client tries first.
    """
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        addresses = await resolve(host, port)
    if not addresses:
        raise OSError(f"{host} has no addresses")
    if not allow_private:
        for address in addresses:
            if not is_public_address(address):
                raise BadEndpoint(host, f"resolves to non-public address {address}")
    return addresses
