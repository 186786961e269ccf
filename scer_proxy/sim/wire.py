"""The simulator's OpenAI wire format: request validation and response shapes (pure, no I/O).

Shapes follow the OpenAI API reference for chat completions and (legacy) completions, streamed and
not, including ``stream_options.include_usage`` (every chunk then carries ``"usage": null`` and a
last chunk with ``"choices": []`` carries the usage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scer_proxy.wire import tokens


class WireError(Exception):
    """A request error, answered in the OpenAI error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    kind: str
    body: dict[str, Any]
    prompt_tokens: int
    max_tokens: int
    ignore_eos: bool
    stream: bool
    include_usage: bool


def _bad(message: str, param: str | None, code: str | None = None) -> WireError:
    return WireError(400, message, param=param, code=code)


def _optional_bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"'{key}' must be a boolean, got {type(value).__name__}", key)
    return value


def _optional_positive_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{key}' must be an integer, got {type(value).__name__}", key)
    if value < 1:
        raise _bad(f"'{key}' must be at least 1, got {value}", key)
    return value


def check_model(body: dict[str, Any], model_id: str) -> None:
    model = body.get("model")
    if model is None:
        raise _bad("you must provide a model parameter", "model")
    if not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {type(model).__name__}", "model")
    if model != model_id:
        raise WireError(
            404,
            f"The model `{model}` does not exist or you do not have access to it. This server serves `{model_id}`.",
            param="model",
            code="model_not_found",
        )


def _check_messages(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if messages is None:
        raise _bad("'messages' is a required property", "messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array", "messages")
    for i, message in enumerate(messages):
        param = f"messages.[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"'{param}' must be an object", param)
        role = message.get("role")
        if not isinstance(role, str):
            raise _bad(f"'{param}.role' is required and must be a string", f"{param}.role")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _bad(f"'{param}.content' must be a string or an array of parts", f"{param}.content")


def _check_prompt(body: dict[str, Any]) -> None:
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("'prompt' is a required property", "prompt")
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list):
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return
        if len(prompt) == 1 and (
            isinstance(prompt[0], str)
            or (
                isinstance(prompt[0], list)
                and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt[0])
            )
        ):
            return
        raise _bad(
            "the simulator serves one prompt per request (a string or an array of token ids)", "prompt"
        )
    raise _bad(f"'prompt' must be a string or an array of token ids, got {type(prompt).__name__}", "prompt")


def parse_generation_request(
    kind: str,
    body: Any,
    *,
    model_id: str,
    max_model_len: int,
    default_max_tokens: int,
    usage_on_streams: bool,
) -> GenerationRequest:
    """Validate a chat or completions body; raises :class:`WireError` with the OpenAI status."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    check_model(body, model_id)
    if kind == "chat":
        _check_messages(body)
    else:
        _check_prompt(body)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n != 1):
        raise _bad("the simulator supports only n = 1", "n")
    stream = _optional_bool(body, "stream")
    ignore_eos = _optional_bool(body, "ignore_eos")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        include_usage = _optional_bool(stream_options, "include_usage")
    max_tokens = _optional_positive_int(body, "max_tokens")
    if kind == "chat":
        max_completion_tokens = _optional_positive_int(body, "max_completion_tokens")
        if max_completion_tokens is not None:
            max_tokens = max_completion_tokens
    prompt_tokens = tokens.count_prompt(kind, body)
    param = "messages" if kind == "chat" else "prompt"
    if prompt_tokens >= max_model_len or (
        max_tokens is not None and prompt_tokens + max_tokens > max_model_len
    ):
        requested = prompt_tokens + (max_tokens or 0)
        raise _bad(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{requested} tokens ({prompt_tokens} in the {param}, {max_tokens or 0} in the completion). "
            f"Please reduce the length of the {param} or completion.",
            param,
            "context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(default_max_tokens, max_model_len - prompt_tokens)
    return GenerationRequest(
        kind=kind,
        body=body,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        ignore_eos=ignore_eos,
        stream=stream,
        include_usage=include_usage and stream and usage_on_streams,
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    kind: str, *, id_: str, created: int, model: str, text: str, finish_reason: str, usage_: dict[str, int]
) -> dict[str, Any]:
    """The non-streamed response body."""
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {
        "id": id_,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_,
    }


class ChunkMaker:
    """Builds the chunks of one stream (same id, created and model on every chunk)."""

    def __init__(self, kind: str, *, id_: str, created: int, model: str, include_usage: bool) -> None:
        self.kind = kind
        self.include_usage = include_usage
        self._base: dict[str, Any] = {
            "id": id_,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created,
            "model": model,
        }

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = dict(self._base)
        chunk["choices"] = [choice]
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def role(self) -> dict[str, Any] | None:
        """The chat stream's opening chunk (none for completions)."""
        if self.kind != "chat":
            return None
        return self._chunk(
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        )

    def token(self, text: str) -> dict[str, Any]:
        if self.kind == "chat":
            return self._chunk(
                {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
            )
        return self._chunk({"index": 0, "text": text, "logprobs": None, "finish_reason": None})

    def finish(self, finish_reason: str) -> dict[str, Any]:
        if self.kind == "chat":
            return self._chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason})
        return self._chunk({"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason})

    def usage(self, usage_: dict[str, int]) -> dict[str, Any]:
        chunk = dict(self._base)
        chunk["choices"] = []
        chunk["usage"] = usage_
        return chunk


def tokenize(body: Any, *, model_id: str) -> list[int]:
    """vLLM-style ``/tokenize``: token ids of a ``prompt`` or of chat ``messages``.

    The count always equals ``tokens.count_prompt`` of the same prompt, so the two agree. Chat
    messages are rendered ChatML-style with cl100k_im's framing ids (``<|im_start|>`` role
    ``<|im_sep|>`` content ``<|im_end|>``, 3 framing tokens a message, as the cookbook counts them).
    """
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    if "model" in body:
        check_model(body, model_id)
    enc = tokens.encoding()
    if "messages" in body:
        _check_messages(body)
        ids: list[int] = []
        for message in body["messages"]:
            ids.append(_IM_START)
            for key, value in message.items():
                if key == "role":
                    ids.extend(enc.encode_ordinary(str(value)))
                elif key == "name":
                    ids.append(_IM_SEP)
                    ids.extend(enc.encode_ordinary(str(value)))
            ids.append(_IM_SEP)
            ids.extend(enc.encode_ordinary(tokens.content_text(message.get("content"))))
            ids.append(_IM_END)
        ids.extend([_IM_START, *enc.encode_ordinary("assistant"), _IM_SEP])
        return ids
    _check_prompt(body)
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return enc.encode_ordinary(prompt)
    return [int(t) for t in prompt]


_IM_START, _IM_END, _IM_SEP = 100264, 100265, 100266
