"""Reading training text: a plain-text file, a JSONL corpus, or the English text that ships with Python.

Every source becomes a list of :class:`Example`: a ``prompt`` (context the model reads but is not
trained to produce, e.g. an Alpaca instruction) and a ``text`` (what the model learns to produce).
Bad input raises an error that names the file and the line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

CorpusFormat = Literal["auto", "text", "jsonl"]
FORMATS: tuple[str, ...] = get_args(CorpusFormat)

#: The prompt of Alpaca-style records (Taori et al., 2023), with and without an ``input`` field.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Example:
    """One training document.

    Attributes:
        text: What the model is trained to produce (for a conversation: its messages' contents, one a
            line, which only the default tokenizer's training reads).
        prompt: What precedes ``text`` as context (empty for plain text).
        messages: A conversation, as ``(role, content)`` pairs, to render with the tokenizer's chat
            template and train on the assistant turns (empty for other records).
    """

    text: str
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = field(default=(), repr=False)


def embedded_corpus() -> list[Example]:
    """The help topics of Python's ``pydoc`` (about 460k characters of English), one example each.

    Examples:
        >>> docs = embedded_corpus()
        >>> len(docs) > 50 and all(d.text for d in docs)
        True
    """
    from pydoc_data.topics import topics

    return [Example(text=text.strip()) for _, text in sorted(topics.items()) if text.strip()]


def read_corpus(path: str | Path, corpus_format: str = "auto") -> list[Example]:
    r"""Read ``path`` as plain text (paragraphs separated by blank lines) or JSONL records.

    Args:
        path: The file.
        corpus_format: ``"text"``, ``"jsonl"``, or ``"auto"`` (``.jsonl`` files are JSONL).

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        ValueError: For an empty corpus, invalid JSON or a record without the expected fields; the
            message names the file and the line.

    Examples:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "a.txt")
        ...     _ = open(p, "w").write("First paragraph.\n\nSecond\none.\n")
        ...     read_corpus(p)
        [Example(text='First paragraph.', prompt=''), Example(text='Second\none.', prompt='')]
    """
    if corpus_format not in FORMATS:
        raise ValueError(f"`format={corpus_format!r}` is not one of {list(FORMATS)}.")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"`path={str(path)!r}`: no such file (resolved to {file.resolve()}).")
    jsonl = corpus_format == "jsonl" or (corpus_format == "auto" and file.suffix.lower() == ".jsonl")
    content = file.read_text(encoding="utf-8")
    examples = _read_jsonl(file, content) if jsonl else _read_text(content)
    if not examples:
        kind = "JSONL records" if jsonl else "text"
        raise ValueError(f"{file}: the corpus is empty (no {kind} after skipping blank lines).")
    return examples


def _read_text(content: str) -> list[Example]:
    paragraphs = (p.strip() for p in re.split(r"\n\s*\n", content))
    return [Example(text=p) for p in paragraphs if p]


def _read_jsonl(file: Path, content: str) -> list[Example]:
    examples = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}:{number}: invalid JSON ({err.msg} at column {err.colno}).") from err
        examples.append(record_to_example(record, f"{file}:{number}"))
    return examples


def record_to_example(record: Any, where: str = "record") -> Example:
    r"""Turn one JSON record into an :class:`Example`.

    A record is ``{"text": ...}``, an Alpaca record ``{"instruction": ..., "input": ..., "output": ...}``
    (``input`` optional or empty), whose prompt is :data:`ALPACA_PROMPT`, or a conversation
    ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}`` (the
    format of chat fine-tuning data), rendered later with the tokenizer's chat template.

    Args:
        record: The decoded JSON value.
        where: Where the record comes from (``file:line``), for error messages.

    Raises:
        ValueError: If the record is not an object, lacks the fields, or a field is not a string.

    Examples:
        >>> record_to_example({"instruction": "Add 2 and 3.", "output": "5"}).prompt.endswith("### Response:\n")
        True
        >>> record_to_example({"text": "Hello."})
        Example(text='Hello.', prompt='')
        >>> record_to_example({"messages": [{"role": "user", "content": "Hi"},
        ...                                 {"role": "assistant", "content": "Hello!"}]}).messages
        (('user', 'Hi'), ('assistant', 'Hello!'))
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    if "messages" in record:
        messages = _messages(record["messages"], where)
        return Example(text="\n".join(content for _, content in messages), messages=messages)
    if "text" in record:
        return Example(text=_field(record, "text", where))
    if "instruction" in record and "output" in record:
        instruction = _field(record, "instruction", where)
        extra = _field(record, "input", where) if record.get("input") is not None else ""
        template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
        return Example(
            text=_field(record, "output", where), prompt=template.format(instruction=instruction, input=extra)
        )
    raise ValueError(
        f"{where}: record has keys {sorted(record)}; expected a 'text' field, Alpaca 'instruction' and "
        "'output' fields (and an optional 'input'), or a chat 'messages' list."
    )


def _messages(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """Check a chat ``messages`` list: objects with string ``role`` and ``content``, one assistant turn at least."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
    out = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise ValueError(
                f"{where}: messages[{index}] must be an object with 'role' and 'content', got {message!r:.60}."
            )
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"{where}: messages[{index}]: 'role' and 'content' must be strings, got {message!r:.60}.")
        out.append((role, content))
    if not any(role == "assistant" for role, _ in out):
        raise ValueError(f"{where}: the conversation has no 'assistant' message, so nothing to train on.")
    return tuple(out)


def _field(record: dict[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__} ({value!r:.40}).")
    return value
