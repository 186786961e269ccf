"""Deterministic simulated outputs: lengths and one-token-per-word text."""

from __future__ import annotations

import random
import statistics

from scer_proxy.sim.output import WORDS, natural_length, output_length, output_words, request_seed
from scer_proxy.wire import tokens


def test_every_word_is_one_cl100k_token_with_its_leading_space() -> None:
    enc = tokens.encoding()
    assert len(WORDS) == len(set(WORDS)) >= 150
    for word in WORDS:
        assert word.startswith(" ") and word[1:].isalpha()
        assert len(enc.encode_ordinary(word)) == 1, word


def test_generated_text_retokenizes_to_its_token_count() -> None:
    for key in range(20):
        for count in (1, 2, 17, 256, 3000):
            text = "".join(output_words(key, count))
            assert tokens.count_text(text) == count


def test_outputs_are_deterministic_and_depend_on_seed_and_body() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    key = request_seed(0, "chat", body)
    assert key == request_seed(0, "chat", dict(reversed(list(body.items()))))
    # transport-only keys do not change the answer: streamed and not give the same text
    assert key == request_seed(0, "chat", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert key != request_seed(1, "chat", body)
    assert key != request_seed(0, "completions", body)
    assert key != request_seed(0, "chat", {**body, "max_tokens": 51})
    assert output_words(key, 30) == output_words(key, 30)


def test_lengths_ignore_eos_and_the_cap() -> None:
    assert output_length(123, 77, ignore_eos=True) == (77, "length")
    lengths = [natural_length(random.Random(i)) for i in range(4000)]
    assert min(lengths) >= 1
    assert 225 <= statistics.fmean(lengths) <= 275
    finishes = {output_length(i, 100, ignore_eos=False)[1] for i in range(200)}
    assert finishes == {"stop", "length"}
    for i in range(200):
        count, reason = output_length(i, 100, ignore_eos=False)
        assert 1 <= count <= 100
        assert (reason == "length") == (count == 100)
