"""How a prompt is counted, by the size of its text: at once, in a thread, or estimated past the cap.

And the ``/tokenize`` forms the proxy sends to count a prompt with the upstream's own tokenizer.
"""

from __future__ import annotations

from typing import Any

import pytest

from scer_proxy.wire import tokens
from scer_proxy.wire.tokens import PROMPT_INLINE_MAX_BYTES, PROMPT_TOKENIZE_MAX_BYTES, prompt_plan


def _chat(content: Any, **message: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content, **message}]}


def test_prompt_text_bytes_is_what_would_be_tokenized() -> None:
    assert tokens.prompt_text_bytes("chat", _chat("hello", name="ann")) == len("hello" + "ann" + "user")
    parts = [{"type": "text", "text": "ab"}, {"type": "image_url", "image_url": {"url": "x" * 999}}]
    assert tokens.prompt_text_bytes("chat", _chat(parts)) == 2 + 4
    assert tokens.prompt_text_bytes("chat", _chat("é" * 10)) == 20 + 4  # UTF-8 bytes, not characters
    assert tokens.prompt_text_bytes("completions", {"prompt": "abc"}) == 3
    assert tokens.prompt_text_bytes("completions", {"prompt": [1, 2, 3]}) == 12  # a token id: 4 bytes
    assert tokens.prompt_text_bytes("embeddings", {"input": ["ab", "cd"]}) == 4
    assert tokens.prompt_text_bytes("responses", {"input": "abc", "instructions": "de"}) == 5
    assert tokens.prompt_text_bytes("responses", {"input": [{"role": "user", "content": "abcd"}]}) == 4


def test_short_prompts_are_counted_at_once() -> None:
    assert prompt_plan("chat", _chat("rivers")) == ("inline", 3)
    size = PROMPT_INLINE_MAX_BYTES - len("user")
    assert prompt_plan("chat", _chat("x" * size))[0] == "inline"
    assert prompt_plan("chat", _chat("x" * (size + 1)))[0] == "thread"


def test_prompts_up_to_the_cap_are_tokenized_in_a_thread() -> None:
    size = PROMPT_TOKENIZE_MAX_BYTES - len("user")
    assert prompt_plan("chat", _chat("x" * size)) == ("thread", PROMPT_TOKENIZE_MAX_BYTES // 4)
    assert prompt_plan("completions", {"prompt": "x" * PROMPT_TOKENIZE_MAX_BYTES})[0] == "thread"


def test_prompts_over_the_cap_are_estimated_from_their_bytes_never_tokenized() -> None:
    size = PROMPT_TOKENIZE_MAX_BYTES - len("user") + 1
    assert prompt_plan("chat", _chat("x" * size)) == ("estimate", -(-(PROMPT_TOKENIZE_MAX_BYTES + 1) // 4))
    assert prompt_plan("completions", {"prompt": "x" * 8_000_000}) == ("estimate", 2_000_000)
    # Bytes, not characters: 2-byte characters reach the cap at half the length.
    assert prompt_plan("completions", {"prompt": "é" * (PROMPT_TOKENIZE_MAX_BYTES // 2 + 1)})[0] == "estimate"
    # Text hidden where the character estimate does not look (a role that is not a short string).
    assert prompt_plan("chat", _chat("hi", role="r" * 300_000))[0] == "estimate"
    assert prompt_plan("embeddings", {"input": ["x" * 200_000, "y" * 200_000]}) == ("estimate", 100_000)


def test_the_cap_is_a_parameter() -> None:
    assert prompt_plan("completions", {"prompt": "x" * 5000}, max_bytes=4096) == ("estimate", 1250)
    assert prompt_plan("completions", {"prompt": "x" * 4096}, max_bytes=4096)[0] == "thread"


@pytest.mark.parametrize(
    ("kind", "body", "expected"),
    [
        (
            "chat",
            {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": True},
        ),
        (
            "chat",
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
            {
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "add_generation_prompt": True,
                "tools": [{"type": "function"}],
            },
        ),
        (
            "completions",
            {"model": "m", "prompt": "once upon"},
            {"model": "m", "prompt": "once upon", "content": "once upon", "add_special": True},
        ),
        ("completions", {"model": "m", "prompt": [1, 2, 3]}, None),  # token ids: counted exactly already
        ("completions", {"model": "m", "prompt": ["a", "b"]}, None),  # a batch: no single form
        ("chat", {"model": "m", "messages": []}, None),
        ("embeddings", {"model": "m", "input": "x"}, None),
    ],
)
def test_tokenize_prompt_request(kind: str, body: dict[str, Any], expected: dict[str, Any] | None) -> None:
    assert tokens.tokenize_prompt_request(kind, body) == expected


def test_tokenize_count_reads_vllm_and_llamacpp_answers() -> None:
    assert tokens.tokenize_count({"count": 5, "tokens": [1, 2, 3, 4, 5], "max_model_len": 9}) == 5
    assert tokens.tokenize_count({"tokens": [1, 2, 3]}) == 3  # llama.cpp
    # A chat prompt needs vLLM's count: llama.cpp answers a body without content with no tokens.
    assert tokens.tokenize_count({"tokens": []}, need_count=True) is None
    assert tokens.tokenize_count({"count": 7}, need_count=True) == 7
    for bad in (None, [1, 2], {"count": -1}, {"count": True}, {"count": "3"}, {}):
        assert tokens.tokenize_count(bad) is None
