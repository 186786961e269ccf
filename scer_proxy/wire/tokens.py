"""Token counting with no network: tiktoken's cl100k_base loaded from the file bundled in the package.

tiktoken normally downloads its BPE ranks on first use, which fails offline. The ranks are shipped in
``scer_proxy/data/cl100k_base.tiktoken`` and checked against tiktoken's own published sha256.

Chat prompts are counted the way OpenAI's cookbook counts them for cl100k models ("How to count
tokens with tiktoken"): 3 tokens of framing per message, 1 more for a ``name``, and 3 to prime the
reply. The simulator counts its prompts with the same functions, so its ``usage`` and the proxy's
tokenizer fallback agree exactly; for any other server the fallback is an approximation of that
server's own tokenizer, which is why ``/tokenize`` is preferred where the server has one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from importlib import resources
from typing import Any, Literal

import tiktoken
from tiktoken.load import load_tiktoken_bpe

CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_CL100K_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
_CL100K_SPECIAL = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_REPLY_PRIMING = 3


@functools.cache
def encoding() -> tiktoken.Encoding:
    """The bundled cl100k_base encoding (loaded once, from the package, never from the network)."""
    path = resources.files("scer_proxy") / "data" / "cl100k_base.tiktoken"
    with resources.as_file(path) as file_path:
        ranks = load_tiktoken_bpe(str(file_path), expected_hash=CL100K_SHA256)
    return tiktoken.Encoding(
        name="cl100k_base", pat_str=_CL100K_PATTERN, mergeable_ranks=ranks, special_tokens=_CL100K_SPECIAL
    )


def count_text(text: str) -> int:
    """Tokens in ``text``; special-token strings are counted as ordinary text, never rejected."""
    return len(encoding().encode_ordinary(text))


def content_text(content: Any) -> str:
    """The text of a message ``content``: a string, or a list of parts with ``text``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


@functools.lru_cache(maxsize=256)
def _count_role(role: str) -> int:
    """Roles repeat on every message ("system", "user", "assistant"): counted once each."""
    return count_text(role)


def count_chat_messages(messages: Iterable[Any]) -> int:
    """Prompt tokens of a chat request, by the OpenAI cookbook's cl100k formula."""
    total = TOKENS_REPLY_PRIMING
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if key == "content":
                total += count_text(content_text(value))
            elif key == "name":
                total += TOKENS_PER_NAME + count_text(str(value))
            elif key == "role":
                role = str(value)  # any client can send any role: only short ones are remembered
                total += _count_role(role) if len(role) <= 32 else count_text(role)
    return total


def _count_prompt_value(value: Any) -> int:
    """A completions ``prompt`` or an embeddings ``input``: text, token ids, or lists of either."""
    if isinstance(value, str):
        return count_text(value)
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):
            return len(value)
        return sum(_count_prompt_value(v) for v in value)
    return 0


def _count_responses_input(value: Any) -> int:
    if isinstance(value, str):
        return count_text(value)
    if isinstance(value, list):
        return sum(count_text(content_text(item.get("content"))) for item in value if isinstance(item, dict))
    return 0


def count_prompt(kind: str, body: dict[str, Any]) -> int:
    """Prompt (input) tokens of a request body of the given endpoint kind."""
    if kind == "chat":
        return count_chat_messages(body.get("messages") or [])
    if kind == "completions":
        return _count_prompt_value(body.get("prompt", ""))
    if kind == "embeddings":
        return _count_prompt_value(body.get("input", ""))
    if kind == "responses":
        return _count_responses_input(body.get("input", "")) + count_text(str(body.get("instructions") or ""))
    return 0


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_chars(v) if not isinstance(v, int) else 4 for v in value)
    if isinstance(value, dict):
        return sum(_chars(v) for k, v in value.items() if k in ("content", "text", "input", "name", "role"))
    return 0


def estimate_prompt(kind: str, body: dict[str, Any]) -> int:
    """A quick prompt-token estimate for the request path (about 4 characters a token, no tokenizing).

    Used to place the request's prefill on the timeline until the upstream's usage gives the count.
    """
    if kind == "chat":
        messages = body.get("messages") or []
        return _chars(messages) // 4 + TOKENS_PER_MESSAGE * len(messages) + TOKENS_REPLY_PRIMING
    if kind == "completions":
        return _chars(body.get("prompt", "")) // 4
    if kind == "embeddings":
        return _chars(body.get("input", "")) // 4
    return (_chars(body.get("input", "")) + _chars(body.get("instructions") or "")) // 4


# A prompt whose text is longer than this is not tokenized: a few MB take cl100k seconds of CPU.
PROMPT_TOKENIZE_MAX_BYTES = 262_144
PROMPT_INLINE_MAX_BYTES = 2_048
BYTES_PER_TOKEN_ESTIMATE = 4


def _text_bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "replace"))


def _prompt_value_bytes(value: Any) -> int:
    """A completions ``prompt`` or embeddings ``input``; a token id counts as one token's bytes."""
    if isinstance(value, str):
        return _text_bytes(value)
    if isinstance(value, list):
        return sum(BYTES_PER_TOKEN_ESTIMATE if isinstance(v, int) else _prompt_value_bytes(v) for v in value)
    return 0


def prompt_tokens_from_bytes(size_bytes: int) -> int:
    """The size estimate of a prompt's tokens: 4 bytes of text a token, rounded up."""
    return -(-size_bytes // BYTES_PER_TOKEN_ESTIMATE)


def prompt_text_bytes(kind: str, body: dict[str, Any]) -> int:
    """UTF-8 bytes of the text :func:`count_prompt` would tokenize (quick: no tokenizing)."""
    if kind == "chat":
        total = 0
        for message in body.get("messages") or []:
            if isinstance(message, dict):
                for text in (content_text(message.get("content")), message.get("name"), message.get("role")):
                    total += _text_bytes(str(text or ""))
        return total
    if kind in ("completions", "embeddings"):
        return _prompt_value_bytes(body.get("prompt" if kind == "completions" else "input", ""))
    if kind == "responses":
        value = body.get("input", "")
        if isinstance(value, list):
            size = sum(_text_bytes(content_text(i.get("content"))) for i in value if isinstance(i, dict))
        else:
            size = _text_bytes(value) if isinstance(value, str) else 0
        return size + _text_bytes(str(body.get("instructions") or ""))
    return 0


def prompt_plan(
    kind: str, body: dict[str, Any], *, max_bytes: int = PROMPT_TOKENIZE_MAX_BYTES
) -> tuple[Literal["inline", "thread", "estimate"], int]:
    """How a prompt is counted, by the size of its text, and its size estimate (4 bytes a token).

    ``inline``: short (up to :data:`PROMPT_INLINE_MAX_BYTES`), counted at once (microseconds);
    ``thread``: counted with :func:`count_prompt` away from the request path; ``estimate``: over
    ``max_bytes``, never tokenized (a few MB take seconds): the size estimate is its count.
    """
    size = prompt_text_bytes(kind, body)
    estimate = prompt_tokens_from_bytes(size)
    if size > max_bytes:
        return "estimate", estimate
    return ("inline" if size <= PROMPT_INLINE_MAX_BYTES else "thread"), estimate


def tokenize_prompt_request(kind: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """The body for an upstream's ``/tokenize`` that counts a request's prompt, or None where none can.

    Chat: vLLM's form, ``model`` and ``messages`` (and ``tools``), which applies the model's chat
    template as the request did; only a server that answers with ``count`` understood it
    (:func:`tokenize_count`). Completions with a text prompt: ``prompt`` (vLLM) and ``content``
    (llama.cpp), special tokens added as for a completion. Anything else (token ids, batches, other
    endpoints) has no such form.
    """
    model = body.get("model")
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        request: dict[str, Any] = {"model": model, "messages": messages, "add_generation_prompt": True}
        if isinstance(body.get("tools"), list):
            request["tools"] = body["tools"]
        return request
    if kind == "completions":
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return None
        return {"model": model, "prompt": prompt, "content": prompt, "add_special": True}
    return None


def tokenize_count(answer: Any, *, need_count: bool = False) -> int | None:
    """The count in a ``/tokenize`` answer: vLLM's ``count``, else the length of ``tokens`` (llama.cpp).

    ``need_count``: only ``count`` is believed. llama.cpp answers a body without ``content`` (the chat
    form) with no tokens, so a bare ``tokens`` list does not count a chat prompt.
    """
    if not isinstance(answer, dict):
        return None
    count = answer.get("count")
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        return count
    if need_count:
        return None
    ids = answer.get("tokens")
    return len(ids) if isinstance(ids, list) else None
