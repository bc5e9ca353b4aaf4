"""TextDataModule, corpus reading and the cached default tokenizer: shapes, labels, errors, cache reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_lisa.recipes import tokenizer as tokenizer_module
from lightning_lisa.recipes.corpus import ALPACA_PROMPT_NO_INPUT, read_corpus, record_to_example
from lightning_lisa.recipes.data import IGNORE_INDEX, TextDataModule
from lightning_lisa.recipes.data.records import tokenize_examples
from lightning_lisa.recipes.data.sources import Part
from lightning_lisa.recipes.tokenizer import bpe_cache_path, default_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def write(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


def jsonl(path: Path, records: list[object]) -> Path:
    return write(path, "\n".join(json.dumps(r) for r in records) + "\n")


# ------------------------------------------------------------------------------------ errors


def test_missing_file_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"path='.*nope\.txt'.*no such file"):
        read_corpus(tmp_path / "nope.txt")


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl"])
def test_empty_corpus_is_named(tmp_path: Path, name: str):
    path = write(tmp_path / name, "\n  \n\n")
    with pytest.raises(ValueError, match=rf"{name}: the corpus is empty"):
        read_corpus(path)


def test_invalid_json_names_file_and_line(tmp_path: Path):
    path = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        read_corpus(path)


def test_record_without_fields_names_file_line_and_keys(tmp_path: Path):
    path = jsonl(tmp_path / "data.jsonl", [{"text": "ok"}, {"instruction": "Say hi.", "response": "hi"}])
    with pytest.raises(ValueError, match=r"data\.jsonl:2: record has keys \['instruction', 'response'\]"):
        read_corpus(path)


def test_non_string_field_and_non_object_record(tmp_path: Path):
    with pytest.raises(ValueError, match=r"a\.jsonl:1: field 'text' must be a string, got int"):
        read_corpus(jsonl(tmp_path / "a.jsonl", [{"text": 3}]))
    with pytest.raises(ValueError, match=r"b\.jsonl:2: expected a JSON object, got list"):
        read_corpus(jsonl(tmp_path / "b.jsonl", [{"text": "x"}, ["x"]]))


def test_datamodule_surfaces_corpus_errors_and_bad_arguments(tmp_path: Path):
    path = write(tmp_path / "bad.jsonl", "{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        TextDataModule(path=str(path), cache_dir=str(tmp_path)).setup("fit")
    with pytest.raises(ValueError, match=r"`val_fraction=1\.5`"):
        TextDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match=r"`max_length=1`"):
        TextDataModule(max_length=1)


def test_too_small_corpus_says_how_many_sequences(tmp_path: Path):
    path = write(tmp_path / "short.txt", "Just a few words.")
    dm = TextDataModule(path=str(path), vocab_size=270, max_length=64, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"short\.txt: the corpus gives 0 sequence\(s\) of `max_length=64`"):
        dm.setup("fit")


# ------------------------------------------------------------------------------- tokenizer


def test_default_tokenizer_is_cached_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls: list[Path] = []
    original = tokenizer_module.train_bpe

    def counting(texts, vocab_size, path):  # type: ignore[no-untyped-def]
        calls.append(path)
        original(texts, vocab_size, path)

    monkeypatch.setattr(tokenizer_module, "train_bpe", counting)
    texts = [TEXT]
    first = default_tokenizer(texts, vocab_size=280, cache_dir=tmp_path)
    second = default_tokenizer(texts, vocab_size=280, cache_dir=tmp_path)
    assert len(calls) == 1
    assert calls[0] == bpe_cache_path(texts, 280, tmp_path) and calls[0].is_file()
    assert first("lazy dog")["input_ids"] == second("lazy dog")["input_ids"]
    default_tokenizer(texts, vocab_size=290, cache_dir=tmp_path)  # another vocabulary: another file
    default_tokenizer([*texts, "more"], vocab_size=280, cache_dir=tmp_path)  # another corpus: another file
    assert len(calls) == 3 and len(set(calls)) == 3


def test_cache_dir_defaults_to_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LIGHTNING_LISA_CACHE", str(tmp_path / "env-cache"))
    assert bpe_cache_path(["x"], 300).parent == tmp_path / "env-cache"


def test_datamodule_trains_the_tokenizer_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = []
    original = tokenizer_module.train_bpe
    monkeypatch.setattr(tokenizer_module, "train_bpe", lambda *a: (calls.append(a[2]), original(*a)))
    for _ in range(2):
        dm = TextDataModule(max_examples=3, vocab_size=300, max_length=32, cache_dir=str(tmp_path))
        dm.prepare_data()
        dm.setup("fit")
    assert len(calls) == 1
    assert dm.tokenizer is not None and len(dm.tokenizer) == 300


# ------------------------------------------------------------------------------- sequences


def test_packing_gives_full_sequences_and_a_seeded_split(tmp_path: Path):
    path = write(tmp_path / "book.txt", "\n\n".join([TEXT] * 5))
    dm = TextDataModule(path=str(path), vocab_size=280, max_length=16, val_fraction=0.2, cache_dir=str(tmp_path))
    dm.setup("fit")
    assert dm.train_set is not None and dm.val_set is not None
    n_train, n_val = len(dm.train_set), len(dm.val_set)
    assert n_val == (n_train + n_val) // 5
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, 16)
    assert torch.equal(batch["input_ids"], batch["labels"])
    again = TextDataModule(path=str(path), vocab_size=280, max_length=16, val_fraction=0.2, cache_dir=str(tmp_path))
    again.setup("fit")
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(dm.val_set, again.val_set, strict=True))


def test_alpaca_records_padded_with_the_prompt_masked(tmp_path: Path):
    records = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"text": "A plain record."},
    ]
    path = jsonl(tmp_path / "alpaca.jsonl", records * 4)
    examples = read_corpus(path)
    assert examples[0].prompt == ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour.")
    assert "### Input:\n2 and 3" in examples[1].prompt
    dm = TextDataModule(path=str(path), vocab_size=300, max_length=200, packing=False, cache_dir=str(tmp_path))
    dm.setup("fit")
    tok = dm.tokenizer
    assert tok is not None and dm.train_set is not None
    for item in dm.train_set:
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        trained = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
        assert "### Instruction" not in trained  # no loss on the prompt
        assert trained.rstrip("</s>").strip() in {"<s>Blue.", "<s>5", "<s>A plain record."}
    batch = next(iter(dm.train_dataloader()))
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_a_tokenizer_object_is_used_as_is(tmp_path: Path):
    tok = default_tokenizer([TEXT], vocab_size=280, cache_dir=tmp_path)
    path = write(tmp_path / "t.txt", TEXT)
    dm = TextDataModule(path=str(path), tokenizer=tok, max_length=16)
    dm.setup("fit")
    assert dm.tokenizer is tok


# ------------------------------------------------------------------------------------ chat


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a small chat template (`U:`/`A:` headers, `;` ends a turn)."""
    words = ["<unk>", "<pad>", "U:", "A:", ";", "hi", "hello", "how", "fine", "are", "you"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token=";")
    tok.chat_template = (
        "{% for m in messages %}{{ 'U: ' if m.role == 'user' else 'A: ' }}{{ m.content }} ; {% endfor %}"
        "{% if add_generation_prompt %}A: {% endif %}"
    )
    return tok


def test_chat_records_train_on_the_assistant_turns_only(tmp_path: Path):
    turns = [("user", "hi"), ("assistant", "hello"), ("user", "how are you"), ("assistant", "fine")]
    conversation = {"messages": [{"role": role, "content": content} for role, content in turns]}
    path = jsonl(tmp_path / "chat.jsonl", [conversation] * 4)
    tok = word_tokenizer()
    data = TextDataModule(path=str(path), tokenizer=tok, packing=False, max_length=32, batch_size=4, val_fraction=0.25)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert tok.decode(ids[batch["attention_mask"][0] == 1]) == "U: hi ; A: hello ; U: how are you ; A: fine ;"
    assert tok.decode(ids[labels != IGNORE_INDEX]) == "hello ; fine ;"

    everything = TextDataModule(path=str(path), tokenizer=tok, packing=False, max_length=32, mask_prompt=False)
    everything.setup("fit")
    row = everything.train_set[0]  # type: ignore[index]
    assert torch.equal(row["labels"], row["input_ids"])


def test_a_conversation_is_located_only_when_it_is_invalid():
    # a JSON Lines record's line is found by reading the file up to it: asked for every record, a
    # file of n conversations was read n times over (100,000 conversations: 44% done after 25 minutes;
    # 89 s once located only for an error)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    examples = [record_to_example({"messages": turns})] * 3
    asked: list[int] = []

    def where(index: int) -> str:
        asked.append(index)
        return f"chat.jsonl:{index + 1}"

    tok = word_tokenizer()
    assert len(tokenize_examples(tok, examples, "answers", where)) == 3
    assert asked == []
    tok.chat_template = None
    with pytest.raises(ValueError, match=r"^chat\.jsonl:1: the records are conversations \('messages'\)"):
        tokenize_examples(tok, examples, "answers", where)
    assert asked == [0]


def test_valid_json_lines_records_are_never_located(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # the default tokenizer's training and the cache's record loop, as the chat case above
    asked: list[int] = []
    where = Part.where

    def counted(self: Part, record: int) -> str:
        asked.append(record)
        return where(self, record)

    monkeypatch.setattr(Part, "where", counted)
    records = [{"instruction": f"Say {word}.", "input": "", "output": word} for word in ("yes", "no", "maybe")]
    path = jsonl(tmp_path / "alpaca.jsonl", records * 4)
    dm = TextDataModule(path=str(path), vocab_size=300, max_length=200, packing=False, cache_dir=str(tmp_path))
    dm.setup("fit")
    assert dm.train_set is not None and len(dm.train_set) > 0
    assert asked == []
    bad = jsonl(tmp_path / "bad.jsonl", [*records, {"instruction": "Say nothing.", "input": "", "output": None}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:4: "):
        TextDataModule(path=str(bad), vocab_size=300, max_length=200, cache_dir=str(tmp_path)).setup("fit")
    assert asked == [3]


def test_records_that_leave_nothing_to_train_on_are_refused_with_the_reason(tmp_path: Path):
    records = [{"instruction": f"Say {word}.", "input": "", "output": word} for word in ("yes", "no", "maybe")]
    path = jsonl(tmp_path / "alpaca.jsonl", records * 4)
    dm = TextDataModule(path=str(path), vocab_size=300, max_length=8, packing=False, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"alpaca\.jsonl: none of the 12 records is left to train on: 12 have no "
                       r"trained token in their first `max_length=8` tokens"):  # fmt: skip
        dm.setup("fit")


def test_bad_chat_records_are_named(tmp_path: Path):
    no_answer = jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"a\.jsonl:1: the conversation has no 'assistant' message"):
        read_corpus(no_answer)
    bad = jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(ValueError, match=r"b\.jsonl:1: messages\[0\] must be an object with 'role' and 'content'"):
        read_corpus(bad)
    not_a_list = jsonl(tmp_path / "c.jsonl", [{"messages": "hi"}])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: 'messages' must be a non-empty list"):
        read_corpus(not_a_list)
