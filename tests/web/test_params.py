"""Query parameters and the admin token of the proxy's own endpoints: every bad value is a 400 in the
OpenAI error shape naming the parameter, never a 500; the bearer scheme is case-insensitive."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

TOKEN = "s3cret-Token"

BAD_SINCE = [
    "99999999999d",  # seconds beyond any Unix time
    "9" * 400 + "d",  # more than a float holds: inf
    "9" * 5000 + "s",  # more digits than int() converts
    "-1h",
    "nan",
    "inf",
    "1e9d",
    "1.5.5h",
    "٣h",  # Arabic-Indic digit three
    "1h; drop",
    "\x00",
]
BAD_LIMIT = ["0", "-1", "10001", "99999999999999999999", "9" * 5000, "1.5", "1e3", "abc", "", "٣", "²", " 5"]


@pytest.fixture
def proxy(start_proxy: Callable[..., str], fake_upstream: str) -> str:
    return start_proxy(fake_upstream)


def _assert_openai_400(resp: httpx.Response, param: str) -> None:
    assert resp.status_code == 400, (resp.status_code, resp.text[:200])
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert isinstance(error["message"], str) and len(error["message"]) < 200


@pytest.mark.parametrize("since", BAD_SINCE)
def test_bad_since_is_400(proxy: str, since: str) -> None:
    resp = httpx.get(f"{proxy}/scer/summary", params={"since": since}, timeout=10)
    _assert_openai_400(resp, "since")


@pytest.mark.parametrize("limit", BAD_LIMIT)
def test_bad_limit_is_400(proxy: str, limit: str) -> None:
    resp = httpx.get(f"{proxy}/scer/requests", params={"limit": limit}, timeout=10)
    _assert_openai_400(resp, "limit")


@pytest.mark.parametrize(("since", "ok"), [("36500d", True), ("0s", True), ("1.5h", True), ("36501d", False)])
def test_since_bounds(proxy: str, since: str, ok: bool) -> None:
    resp = httpx.get(f"{proxy}/scer/summary", params={"since": since}, timeout=10)
    assert resp.status_code == (200 if ok else 400), resp.text


def test_limit_bounds(proxy: str) -> None:
    for limit in ("1", "10000", "0010"):
        assert httpx.get(f"{proxy}/scer/requests", params={"limit": limit}, timeout=10).status_code == 200


@pytest.mark.parametrize(
    "header",
    [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}", f"BeArEr   {TOKEN}"],
)
def test_bearer_scheme_is_case_insensitive(
    start_proxy: Callable[..., str], fake_upstream: str, header: str
) -> None:
    proxy = start_proxy(fake_upstream, server={"admin_token": TOKEN})
    resp = httpx.get(f"{proxy}/scer/summary", headers={"Authorization": header}, timeout=10)
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    "header",
    [
        "",
        TOKEN,
        f"Basic {TOKEN}",
        f"Bearer {TOKEN.lower()}",  # the token itself is compared exactly
        f"Bearer {TOKEN}x",
        f"Bearer{TOKEN}",
        f"Bearer {TOKEN} {TOKEN}",
        "Bearer",
    ],
)
def test_wrong_admin_token_is_refused(
    start_proxy: Callable[..., str], fake_upstream: str, header: str
) -> None:
    proxy = start_proxy(fake_upstream, server={"admin_token": TOKEN})
    resp = httpx.get(f"{proxy}/scer/summary", headers={"Authorization": header}, timeout=10)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_admin_token"


ODD = ["%00", "%ff", "%ed%a0%80", "%0d%0a", "a%00b", "x" * 4000, "%e2%80%ae", "..%2f..%2f"]


@pytest.mark.parametrize("odd", ODD)
def test_odd_values_never_answer_500(proxy: str, odd: str) -> None:
    """Names from the query or the path that are not text a client would send: never a 500."""
    paths = [
        f"/scer/summary?model={odd}",
        f"/scer/summary?tenant={odd}",
        f"/scer/summary?since={odd}",
        f"/scer/requests?limit={odd}",
        f"/scer/requests/{odd}",
        f"/scer/label/{odd}.svg",
        f"/scer/manifest/{odd}.yaml",
        f"/scer?since={odd}",
    ]
    with httpx.Client(base_url=proxy, timeout=10, follow_redirects=False) as http:
        for path in paths:
            resp = http.get(path)
            assert resp.status_code < 500, (path, resp.status_code, resp.text[:200])
