"""Deterministic simulated outputs: how many tokens a request produces, and their text.

Both depend only on the simulator's seed and the request body (less the keys that only change the
transport: ``stream``, ``stream_options``, ``user``), so the same request gives the same answer
streamed or not, on every run.

The text is made of words that are each exactly one cl100k_base token with their leading space
(" the", " river", ...). cl100k's pre-tokenizer splits such text before every space-letter run, so
re-tokenizing the concatenated completion gives back exactly one token per word: the completion
text of ``n`` tokens re-tokenizes to ``n`` tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from typing import Any

# Every entry is one cl100k_base token with a leading space (checked by tests/test_sim_output.py).
WORDS: tuple[str, ...] = tuple(
    " " + w
    for w in (
        "the a of and to in is that for it as was with be by on not he this are or his from at which "
        "but have an they you were her she there one all we their been has when who will more no if "
        "out so said what up its about into than them can only other new some could time these two may "
        "then do first any like now my over such our man me even most made after also did many before "
        "must through back years where much your way well down should because each just those people "
        "how too little state good very make world still own see men work long here get both between "
        "life being under never day same another know while last might us great old year off come "
        "since against go came right used take three river mountain light water stone forest cloud "
        "rain wind fire field road city house garden bridge sea sun moon star tree bird song voice "
        "story green blue red quiet bright small large open early late slow quick warm cold deep "
        "clear simple careful gentle"
    ).split()
)

TRANSPORT_KEYS = frozenset({"stream", "stream_options", "user"})
# Natural (unconstrained) output lengths: log-normal with a mean of MEAN_OUTPUT_TOKENS.
MEAN_OUTPUT_TOKENS = 250.0
OUTPUT_SIGMA = 0.8
_OUTPUT_MU = math.log(MEAN_OUTPUT_TOKENS) - OUTPUT_SIGMA**2 / 2.0


def request_seed(seed: int, kind: str, body: dict[str, Any]) -> int:
    """A 64-bit seed from the simulator seed, the endpoint kind and the body (transport keys left out)."""
    material = {k: v for k, v in body.items() if k not in TRANSPORT_KEYS}
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    digest = hashlib.sha256(f"{seed}\x00{kind}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def natural_length(rng: random.Random) -> int:
    """Tokens a request would produce before its end-of-sequence token (at least 1)."""
    return max(1, round(rng.lognormvariate(_OUTPUT_MU, OUTPUT_SIGMA)))


def output_length(key: int, max_tokens: int, ignore_eos: bool) -> tuple[int, str]:
    """``(completion_tokens, finish_reason)``: exactly ``max_tokens`` ("length") with ``ignore_eos``,
    else the natural length ("stop"), capped at ``max_tokens`` ("length")."""
    if ignore_eos:
        return max_tokens, "length"
    natural = natural_length(random.Random(key))
    if natural < max_tokens:
        return natural, "stop"
    return max_tokens, "length"


def output_words(key: int, count: int) -> list[str]:
    """The ``count`` token texts of the completion (each one cl100k token)."""
    rng = random.Random(key ^ 0x5DEECE66D)
    return rng.choices(WORDS, k=count)
