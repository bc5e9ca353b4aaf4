"""Write the demo's chat-format task: reversing the order of four words, from words of Python's own help text.

Every record is a conversation in the format instruct models are fine-tuned with::

    {"messages": [{"role": "user", "content": "Reverse the order of the words: module value class object"},
                  {"role": "assistant", "content": "object class value module"}]}

The words are frequent lowercase words of the English help topics that ship with Python
(``pydoc_data.topics``), so nothing is downloaded. SmolLM2-135M-Instruct does not do this task before
fine-tuning. Usage: ``python examples/demo_data.py demo_output/reverse_words.jsonl [--records 800]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
from pathlib import Path

INSTRUCTION = "Reverse the order of the words: "


def vocabulary(size: int = 300) -> list[str]:
    """The ``size`` most frequent lowercase words of 4 to 8 letters in ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    counts = collections.Counter(w for text in topics.values() for w in re.findall(r"\b[a-z]{4,8}\b", text))
    return sorted(w for w, _ in counts.most_common(size))


def conversation(words: list[str]) -> dict[str, list[dict[str, str]]]:
    """One record: the instruction with the words, and the words in reverse order."""
    return {
        "messages": [
            {"role": "user", "content": INSTRUCTION + " ".join(words)},
            {"role": "assistant", "content": " ".join(reversed(words))},
        ]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("out", type=Path, help="the JSONL file to write")
    parser.add_argument("--records", type=int, default=800, help="conversations to write (default 800)")
    parser.add_argument("--words", type=int, default=4, help="words per conversation (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.records < 2 or args.words < 2:
        parser.error("--records and --words must be at least 2")
    rng = random.Random(args.seed)
    vocab = vocabulary()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for _ in range(args.records):
            f.write(json.dumps(conversation(rng.sample(vocab, args.words))) + "\n")
    print(f"wrote {args.records} conversations to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
