"""The admin token of ``/scer/*`` and ``/metrics``: an ``Authorization: Bearer <token>`` header."""

from __future__ import annotations

import hmac


def bearer_matches(authorization: str, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` as a bearer token.

    The scheme is case-insensitive (RFC 7235 section 2.1: ``bearer`` and ``BEARER`` are ``Bearer``) and
    the whitespace around and between scheme and token is not part of either; the token itself is
    compared exactly, in constant time."""
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode("utf-8", "replace"), token.encode("utf-8"))
