"""Writes the standard benchmark workload ``standard-chat-v1`` (deterministic; run once, output committed).

300 single-turn chat prompts. Prompt lengths are drawn from a log-normal distribution (median 90 cl100k
tokens, sigma 1.0, clipped to 8..2,048) and built from a question plus paragraphs of context, which
gives a median of 103 tokens, a mean of 151 and a range of 14 to 1,089: a stand-in for the
conversational prompts of ML.ENERGY's LLM chat task (LMArena conversations), mostly short questions
with a long tail of pasted context.
Each prompt has its own fixed output length (``max_tokens`` drawn uniformly from 300 to 500, mean
400, with ``ignore_eos = true`` where the server supports it), near the 390 to 400 tokens the
ML.ENERGY chat rows average for Llama-3.1; lengths that differ keep a closed-loop run from moving in
lock-step waves (every slot finishing at the same step and refilling at once), so the batch stays
near the concurrency as in the leaderboard's steady state.

    python scripts/make_workload.py > scer_proxy/workloads/standard-chat-v1.json
"""

from __future__ import annotations

import json
import math
import random
import sys

from scer_proxy.wire.tokens import count_chat_messages

TOPICS = [
    "rivers",
    "glaciers",
    "solar panels",
    "bread baking",
    "chess openings",
    "the Roman empire",
    "sleep",
    "electric cars",
    "coral reefs",
    "jazz",
    "volcanoes",
    "tax forms",
    "bicycles",
    "tea",
    "photosynthesis",
    "the printing press",
    "marathon training",
    "bees",
    "compilers",
    "tides",
]
ASKS = [
    "Explain {t} to a ten-year-old.",
    "Write a short story about {t}.",
    "What are the pros and cons of {t}?",
    "Summarize what is known about {t}.",
    "Give me a study plan to learn about {t}.",
    "Write a poem about {t}.",
    "Compare {t} with something surprising.",
    "List common myths about {t}.",
]
FILLER = (
    "The notes below were collected over several weeks and may repeat themselves in places. "
    "Some of them are about the history of the subject, some about how it works today, and a few "
    "are questions that were never answered. "
)


def main() -> int:
    rng = random.Random(20251201)
    prompts = []
    for i in range(300):
        target = int(min(2048, max(8, math.exp(math.log(90) + rng.gauss(0, 1.0)))))
        ask = rng.choice(ASKS).format(t=rng.choice(TOPICS))
        text = ask
        while count_chat_messages([{"role": "user", "content": text}]) < target:
            text = text + " " + FILLER if len(text) < 40 else FILLER + text
        prompts.append(
            {
                "id": f"scv1-{i:03d}",
                "messages": [{"role": "user", "content": text}],
                "max_tokens": rng.randint(300, 500),
            }
        )
    json.dump(
        {
            "id": "standard-chat-v1",
            "version": 1,
            "max_tokens": 400,
            "ignore_eos": True,
            "concurrency": 32,
            "description": __doc__.split("\n\n")[1].strip(),
            "prompts": prompts,
        },
        sys.stdout,
        indent=1,
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
