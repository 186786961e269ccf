"""Reading a compressed response body with a bound on what it expands to.

The proxy passes compressed bodies on untouched and decompresses a copy only to read usage; a small
gzip can expand a thousandfold (1 MB to 1 GiB), so the copy is decompressed at most up to the limit.
"""

from __future__ import annotations

import zlib


class ResponseTooLarge(Exception):
    """A body, or what it decompresses to, is over the limit on response bodies."""


def _wbits_for(content_encoding: str) -> tuple[int, ...] | None:
    encoding = content_encoding.strip().lower()
    if encoding in ("gzip", "x-gzip"):
        return (16 + zlib.MAX_WBITS,)
    if encoding == "deflate":  # zlib-wrapped as the RFC says, or raw deflate as some servers send it
        return (zlib.MAX_WBITS, -zlib.MAX_WBITS)
    return None


def needs_decoding(content_encoding: str) -> bool:
    """Whether a body with this ``Content-Encoding`` must be decompressed before it can be read."""
    return content_encoding.strip().lower() not in ("", "identity")


def decode_capped(body: bytes, content_encoding: str, max_bytes: int) -> bytes | None:
    """A decompressed copy of ``body``; None for an unknown encoding or a corrupt or truncated body.

    Raises :class:`ResponseTooLarge` once the output passes ``max_bytes``, having produced at most one
    byte more: the work and the memory are bounded by the limit, not by the body's ratio.
    """
    if not needs_decoding(content_encoding):
        if len(body) > max_bytes:
            raise ResponseTooLarge(len(body))
        return body
    options = _wbits_for(content_encoding)
    if options is None:
        return None
    for wbits in options:
        decompressor = zlib.decompressobj(wbits)
        try:
            out = decompressor.decompress(body, max_bytes + 1)
        except zlib.error:
            continue
        if len(out) > max_bytes:
            raise ResponseTooLarge(len(out))
        return out if decompressor.eof else None
    return None
