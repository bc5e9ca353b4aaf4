"""Records to token ids and labels: plain text, Alpaca, prompt/completion, chat, ShareGPT and pre-tokenized rows.

A record is one row of a data set (a JSON object, a parquet or CSV row). Its format is detected per
record (``"auto"``) or named. The loss is taken on the answers by default (:data:`TrainOn`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, get_args

from transformers import PreTrainedTokenizerBase

from lightning_lisa.recipes.corpus import Example, record_to_example

#: The label of tokens that take no loss.
IGNORE_INDEX = -100

#: Stands for a record's place in an error message until :func:`located` fills it in.
HERE = "\0"


@contextmanager
def located(where: Callable[[], str]) -> Iterator[None]:
    """A ``ValueError`` raised inside names its record: ``where()`` replaces :data:`HERE` in the message.

    ``where`` is called only for an error: finding a JSON Lines record's line reads the file up to it, so
    asking it for every record would read a file of n records n times over.

    Example:
        >>> with located(lambda: "data.jsonl:7"):
        ...     record_format({"txt": "hi"}, "auto", HERE)
        Traceback (most recent call last):
        ...
        ValueError: data.jsonl:7: record has keys ['txt']; expected a 'text' field, ...
    """
    try:
        yield
    except ValueError as err:
        raise ValueError(str(err).replace(HERE, where())) from None


#: Record formats: ``text`` (``{"text"}``), ``alpaca`` (``{"instruction", "input", "output"}``), ``completion``
#: (``{"prompt", "completion"}``), ``chat`` (``{"messages": [{"role", "content"}, ...]}``), ``sharegpt``
#: (``{"conversations": [{"from", "value"}, ...]}``), ``tokens`` (pre-tokenized ``{"input_ids"}``, optional
#: ``"labels"``), or ``auto`` (detected per record, in that order of precedence: tokens, messages,
#: conversations, text, Alpaca, completion).
RecordFormat = Literal["auto", "text", "alpaca", "completion", "chat", "sharegpt", "tokens"]
RECORD_FORMATS: tuple[str, ...] = get_args(RecordFormat)

#: Where the loss is taken: ``answers`` (the Alpaca output, the completion, every assistant turn of a
#: conversation; plain text is all answer), ``all`` (every token), ``last_answer`` (only the final
#: assistant turn of a conversation, the earlier turns are context).
TrainOn = Literal["answers", "all", "last_answer"]
TRAIN_ON: tuple[str, ...] = get_args(TrainOn)

#: The fields each format needs (after the column mapping).
REQUIRED: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "tokens": ("input_ids",),
}

#: ShareGPT speaker names and the chat roles they become.
SHAREGPT_ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "model": "assistant",
}


def record_format(record: dict[str, Any], fmt: str, where: str) -> str:
    """The format of ``record``: ``fmt`` if named (its fields checked), else detected from its fields.

    Raises:
        ValueError: If a named format's fields are missing, or no format fits; names ``where``.

    Examples:
        >>> record_format({"prompt": "2+2=", "completion": "4"}, "auto", "a.jsonl:1")
        'completion'
        >>> record_format({"question": "2+2="}, "alpaca", "a.jsonl:1")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: a.jsonl:1: a 'alpaca' record needs the fields ['instruction', 'output']; it has ['question'] ...
    """
    present = {k for k, v in record.items() if v is not None}
    if fmt != "auto":
        missing = [f for f in REQUIRED[fmt] if f not in present]
        if missing:
            raise ValueError(
                f"{where}: a {fmt!r} record needs the fields {list(REQUIRED[fmt])}; it has {sorted(present)} "
                "(map other column names with `columns`)."
            )
        return fmt
    for candidate, fields in (
        ("tokens", ("input_ids",)),
        ("chat", ("messages",)),
        ("sharegpt", ("conversations",)),
        ("text", ("text",)),
        ("alpaca", ("instruction", "output")),
        ("completion", ("prompt", "completion")),
    ):
        if all(f in present for f in fields):
            return candidate
    raise ValueError(
        f"{where}: record has keys {sorted(present)}; expected a 'text' field, Alpaca 'instruction' and 'output' "
        "fields (and an optional 'input'), 'prompt' and 'completion', a chat 'messages' list, a ShareGPT "
        "'conversations' list, or pre-tokenized 'input_ids' (map other column names with `columns`)."
    )


def to_example(record: dict[str, Any], fmt: str, where: str) -> Example:
    """An :class:`~lightning_lisa.recipes.corpus.Example` of a text, Alpaca, completion, chat or ShareGPT record.

    Raises:
        ValueError: For a record without the fields of its format, or with fields of the wrong type.

    Examples:
        >>> to_example({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        ...            "sharegpt", "x").messages
        (('user', 'Hi'), ('assistant', 'Hello'))
    """
    present = {k: v for k, v in record.items() if v is not None}
    if fmt == "completion":
        prompt, completion = present["prompt"], present["completion"]
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise ValueError(
                    f"{where}: field {key!r} must be a string, got {type(value).__name__} ({value!r:.40})."
                )
        return Example(text=completion, prompt=prompt)
    if fmt == "sharegpt":
        turns = present["conversations"]
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} objects.")
        messages = []
        for index, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("from"), str):
                raise ValueError(f"{where}: conversations[{index}] must be an object with 'from' and 'value'.")
            role = SHAREGPT_ROLES.get(turn["from"])
            if role is None:
                raise ValueError(
                    f"{where}: conversations[{index}] has 'from'={turn['from']!r}; expected one of "
                    f"{sorted(SHAREGPT_ROLES)}."
                )
            messages.append({"role": role, "content": turn.get("value")})
        return record_to_example({"messages": messages}, where)
    only = {"text": ("text",), "alpaca": ("instruction", "input", "output"), "chat": ("messages",)}[fmt]
    subset = {k: present[k] for k in only if k in present}
    if fmt == "chat" and isinstance(subset.get("messages"), list):
        subset["messages"] = [_plain_message(m) for m in subset["messages"]]
    return record_to_example(subset, where)


def _plain_message(message: Any) -> Any:
    """A chat message without the ``None`` fields a columnar file adds (a union of every message's keys)."""
    return {k: v for k, v in message.items() if v is not None} if isinstance(message, dict) else message


def chat_tokens(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[tuple[str, str]],
    assistant_only: bool = True,
    source: str = "the corpus",
    last_only: bool = False,
) -> tuple[list[int], list[int]]:
    r"""Token ids of a conversation rendered with the tokenizer's chat template, and its labels.

    The conversation is rendered turn by turn: before each assistant message, the conversation so far
    with the template's generation prompt (e.g. ``<|im_start|>assistant\n``); then with the message.
    The text the message adds (its content and the template's end-of-turn marker) is what the loss is
    taken on; everything else (system prompt, user turns, role headers) gets ``-100`` labels.

    Args:
        tokenizer: A tokenizer with a ``chat_template``.
        messages: ``(role, content)`` pairs.
        assistant_only: Take the loss on the assistant turns only; ``False``: on every token.
        source: Where the conversation comes from, for error messages.
        last_only: With ``assistant_only``, take the loss on the final assistant turn only.

    Raises:
        ValueError: If the tokenizer has no chat template, or the template does not render a
            conversation's prefix as a prefix of the whole (so the turns cannot be told apart).

    Examples:
        >>> from transformers import PreTrainedTokenizerFast
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        ...     {w: i for i, w in enumerate(["<unk>", "U:", "A:", "hi", "hello", ";"])}, unk_token="<unk>")))
        >>> tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        >>> tok.chat_template = ("{% for m in messages %}{{ 'U: ' if m.role == 'user' else 'A: ' }}{{ m.content }} ; "
        ...     "{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
        >>> chat_tokens(tok, [("user", "hi"), ("assistant", "hello")])
        ([1, 3, 5, 2, 4, 5], [-100, -100, -100, -100, 4, 5])
    """
    pieces = chat_pieces(tokenizer, messages, assistant_only, source, last_only)
    encoded = encode(tokenizer, [text for text, _ in pieces])
    return join_pieces(pieces, encoded, assistant_only)


def chat_pieces(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[tuple[str, str]],
    assistant_only: bool = True,
    source: str = "the corpus",
    last_only: bool = False,
) -> list[tuple[str, bool]]:
    """The rendered conversation cut into pieces of text, each with whether it is trained on (see :func:`chat_tokens`).

    Raises:
        ValueError: As :func:`chat_tokens`.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{source}: the records are conversations ('messages'), but the tokenizer "
            f"({type(tokenizer).__name__}) has no chat template. Use the model's own tokenizer (`data.tokenizer`, "
            "e.g. the model's directory or GGUF file), or give records with 'text' fields."
        )
    history = [{"role": role, "content": content} for role, content in messages]

    def render(upto: int, generation: bool) -> str:
        text: Any = tokenizer.apply_chat_template(history[:upto], tokenize=False, add_generation_prompt=generation)
        return str(text)

    last = max((i for i, (role, _) in enumerate(messages) if role == "assistant"), default=-1)
    pieces: list[tuple[str, bool]] = []
    done = ""
    for index, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        for text, trained in ((render(index, True), False), (render(index + 1, False), True)):
            if not text.startswith(done):
                raise ValueError(
                    f"{source}: the tokenizer's chat template does not render the start of a conversation as a "
                    "prefix of the whole, so the assistant turns cannot be located; give records with 'text' "
                    "fields or Alpaca records instead."
                )
            pieces.append((text[len(done) :], trained and (not last_only or index == last)))
            done = text
    if last != len(messages) - 1:  # turns after the last answer (ending with an answer, `done` is the whole)
        whole = render(len(messages), False)
        if whole.startswith(done) and len(whole) > len(done):
            pieces.append((whole[len(done) :], False))
    return [(text, trained) for text, trained in pieces if text]


def join_pieces(
    pieces: Sequence[tuple[str, bool]], encoded: Sequence[Sequence[int]], assistant_only: bool
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation from its pieces and their token ids."""
    ids: list[int] = []
    labels: list[int] = []
    for (_, trained), tokens in zip(pieces, encoded, strict=True):
        ids.extend(int(t) for t in tokens)
        labels.extend(tokens if trained or not assistant_only else [IGNORE_INDEX] * len(tokens))
    return ids, [int(t) for t in labels]


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (one call for all)."""
    ids: Any = tokenizer(texts, add_special_tokens=False)["input_ids"] if any(texts) else [[] for _ in texts]
    return [list(x) for x in ids]


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], train_on: str, where: Callable[[int], str]
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of each example: ``BOS prompt text EOS`` (prompt masked), or a chat rendering.

    Args:
        tokenizer: The tokenizer.
        examples: The examples.
        train_on: One of :data:`TrainOn`.
        where: The description of example ``i`` for error messages; called only when example ``i`` is invalid.
    """
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    plain = [e for e in examples if not e.messages]
    prompts = iter(encode(tokenizer, [e.prompt for e in plain]))
    texts = iter(encode(tokenizer, [e.text for e in plain]))
    masked, last_only = train_on != "all", train_on == "last_answer"

    def pieces_of(index: int, example: Example) -> list[tuple[str, bool]]:
        with located(lambda: where(index)):
            return chat_pieces(tokenizer, example.messages, masked, HERE, last_only)

    chats = [pieces_of(i, e) for i, e in enumerate(examples) if e.messages]
    flat = iter(encode(tokenizer, [text for pieces in chats for text, _ in pieces]))  # one call for the batch
    conversations = iter(chats)
    start = [bos] if bos is not None else []
    end = [eos] if eos is not None else []
    out = []
    for example in examples:
        if example.messages:
            pieces = next(conversations)
            out.append(join_pieces(pieces, [next(flat) for _ in pieces], masked))
            continue
        prompt, text = next(prompts), next(texts)
        hidden = [IGNORE_INDEX] * len(prompt) if train_on != "all" else prompt
        out.append((start + prompt + text + end, start + hidden + text + end))
    return out
