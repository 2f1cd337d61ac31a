"""Syntax checks for AT Protocol identifiers, done before any URL is built from them.

One place for the DID and CID rules so the reader, the fetcher, the rule loader and the
configuration agree on what is valid.
"""

from __future__ import annotations

import re

__all__ = ["MAX_DID_LENGTH", "WEB_DID_RE", "is_valid_cid", "is_valid_did"]

MAX_DID_LENGTH = 2048

_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
_PLC_RE = re.compile(r"did:plc:[a-z2-7]{24}")
#: did:web with a host name and an optional ``%3A`` port; groups ``host`` and ``port``.
WEB_DID_RE = re.compile(
    rf"did:web:(?P<host>{_LABEL}(?:\.{_LABEL})*)(?:%3[aA](?P<port>[0-9]{{1,5}}))?"
)
_CID_V1_RE = re.compile(r"b[a-z2-7]{20,99}")
_CID_V0_RE = re.compile(r"Qm[1-9A-HJ-NP-Za-km-z]{44}")


def is_valid_did(s: object) -> bool:
    """True for ``did:plc:`` + 24 base32 chars, or ``did:web:host`` (optional ``%3A`` port)."""
    if not isinstance(s, str) or len(s) > MAX_DID_LENGTH:
        return False
    if _PLC_RE.fullmatch(s):
        return True
    m = WEB_DID_RE.fullmatch(s)
    if m is None:
        return False
    port = m.group("port")
    return port is None or 0 < int(port) <= 65535


def is_valid_cid(s: object) -> bool:
    """True for a base32 CIDv1 (``b…``, at most 100 chars) or a base58btc CIDv0 (``Qm…``)."""
    return isinstance(s, str) and bool(_CID_V1_RE.fullmatch(s) or _CID_V0_RE.fullmatch(s))
