"""Process-level set-up of the ``serve`` command, and the shape of request ids."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from scer_proxy.proxy.accounting import new_request_id
from scer_proxy.proxy.serving import GC_YOUNG_THRESHOLD

ROOT = Path(__file__).resolve().parents[2]


def test_gc_tuning_freezes_the_start_up_heap_and_raises_the_young_threshold() -> None:
    # In a child process: the tuning is process-wide, and this test process's leak checks need the collector.
    code = (
        "import gc, json; from scer_proxy.proxy.serving import tune_gc_for_serving; "
        "before = gc.get_threshold(); frozen, young = tune_gc_for_serving(); "
        "print(json.dumps({'before': before, 'after': gc.get_threshold(), 'frozen': frozen, "
        "'freeze_count': gc.get_freeze_count(), 'young': young, 'enabled': gc.isenabled()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    got = json.loads(out.stdout)
    assert got["enabled"], "the collector stays on; only its pace changes"
    assert got["after"][0] == got["young"] == GC_YOUNG_THRESHOLD > got["before"][0]
    assert got["after"][1:] == got["before"][1:]
    assert got["frozen"] == got["freeze_count"] > 1000, "the modules loaded at start-up are frozen"


def test_request_ids_are_unique_and_sort_in_creation_order() -> None:
    first = [new_request_id() for _ in range(2000)]
    time.sleep(0.002)  # the next millisecond
    later = new_request_id()
    assert all(re.fullmatch(r"scer-[0-9a-f]{32}", rid) for rid in [*first, later])
    assert len(set(first)) == len(first)
    assert later > max(first), "an id made in a later millisecond sorts after every earlier one"
    ms = int(later[5:17], 16)
    assert abs(ms / 1000.0 - time.time()) < 5.0, "the first 12 hex digits are the Unix time in ms"


def test_role_counts_are_remembered_only_for_short_roles() -> None:
    from scer_proxy.wire import tokens

    tokens._count_role.cache_clear()
    long_role = "narrator " * 50
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "again"},
        {"role": long_role, "content": "x"},
    ]
    expected = (
        tokens.TOKENS_REPLY_PRIMING
        + 3 * tokens.TOKENS_PER_MESSAGE
        + 2 * tokens.count_text("user")
        + tokens.count_text(long_role)
        + sum(tokens.count_text(m["content"]) for m in messages)
    )
    assert tokens.count_chat_messages(messages) == expected
    info = tokens._count_role.cache_info()
    assert (info.hits, info.misses, info.currsize) == (1, 1, 1), "one short role remembered, the long one not"
