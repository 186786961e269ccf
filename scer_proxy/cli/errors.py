"""The one error type of the command line, and the words every command uses for the same failure.

A command raises :class:`CliError`; :func:`command` prints it as one line on stderr,
``scer-proxy <command>: <message>``, and returns its exit code: 2 for bad usage or configuration,
1 for a failure at run time.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from scer_proxy.cli.tables import terminal_text
from scer_proxy.config import ConfigError

if TYPE_CHECKING:
    import httpx

USAGE = 2
FAILED = 1
TIMEOUT_S = 30.0  # how long a command waits for a server's answer


class CliError(Exception):
    """A failure to report as one line; ``exit_code`` is :data:`USAGE` or :data:`FAILED`."""

    def __init__(self, message: str, exit_code: int = FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def print_error(line: str) -> None:
    print(terminal_text(one_line(line, 2000)), file=sys.stderr)


Command = Callable[[argparse.Namespace], int]


def command(name: str) -> Callable[[Command], Command]:
    """Run a command's function, turning its failures into one line on stderr and the exit code."""

    def wrap(run: Command) -> Command:
        @functools.wraps(run)
        def wrapper(args: argparse.Namespace) -> int:
            try:
                return run(args)
            except CliError as exc:
                error = exc
            except ConfigError as exc:
                error = CliError(str(exc), USAGE)
            except OSError as exc:  # a port in use, a file that cannot be written
                error = CliError(str(exc), FAILED)
            print_error(f"scer-proxy {name}: {error.message}")
            return error.exit_code

        return wrapper

    return wrap


def file_not_found(path: str, flag: str = "") -> CliError:
    return CliError(f"{flag + ': ' if flag else ''}file not found: {path}", USAGE)


def _reason(exc: BaseException) -> str:
    """The deepest OS-level reason of a transport error, worded the same by the sync and async clients."""
    reason = str(exc)
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError):
            if cause.errno is not None and cause.errno > 0:
                reason = os.strerror(cause.errno)
            elif cause.strerror:
                reason = cause.strerror
        cause = cause.__cause__ or cause.__context__
    return one_line(reason)


def request_failed(exc: Exception, where: str, flag: str) -> CliError:
    """``where`` (e.g. "the proxy at URL") could not be asked: a bad URL is usage (2), the rest exit 1."""
    import httpx

    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return CliError(f"{flag}: {one_line(str(exc))}", USAGE)
    if isinstance(exc, httpx.TimeoutException):
        return CliError(f"{where}: no answer within {TIMEOUT_S:g} s", FAILED)
    return CliError(f"{where}: unreachable ({type(exc).__name__}: {_reason(exc)})", FAILED)


def http_status(resp: httpx.Response, where: str, exit_code: int = FAILED) -> CliError:
    """``where`` answered with an error status."""
    return CliError(
        f"{where}: HTTP {resp.status_code} {resp.reason_phrase}: {one_line(resp.text, 200)}", exit_code
    )


def proxy_at(url: str) -> str:
    """How every command names a proxy it talks to."""
    return f"the proxy at {url.rstrip('/')}"


def get(
    url: str, where: str, flag: str, usage_statuses: tuple[int, ...] = (), **kwargs: Any
) -> httpx.Response:
    """``GET url``; a transport failure or an error status raised as a :class:`CliError`, exit 2 for
    ``usage_statuses`` (what the server refused because of a flag: a bad filter, a missing token)."""
    import httpx

    try:
        resp = httpx.get(url, timeout=TIMEOUT_S, **kwargs)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise request_failed(exc, where, flag) from None
    if resp.status_code in usage_statuses:
        raise http_status(resp, flag, USAGE)
    if resp.status_code != 200:
        raise http_status(resp, where)
    return resp
