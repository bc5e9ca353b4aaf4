"""TextDataModule through `datasets`: file kinds, mixed sources, column mapping, the cache, length policy, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_lisa.errors import LISAConfigError
from lightning_lisa.recipes.data import IGNORE_INDEX, DataSource, TextDataModule
from lightning_lisa.recipes.data import module as data_module

WORDS = ["<unk>", "<pad>", "<s>", "</s>", "U:", "A:", ";", "hi", "hello", "how", "fine", "are", "you", "one", "two",
         "three", "four", "five", "six", "Q", "ans"]  # fmt: skip


def word_tokenizer(template_end: str = ";") -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = (
        "{% for m in messages %}{{ 'U: ' if m.role == 'user' else 'A: ' }}{{ m.content }} " + template_end + " "
        "{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
    )
    return tok


def jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def decoded_targets(tok: PreTrainedTokenizerFast, item: dict[str, torch.Tensor]) -> str:
    ids, labels = item["input_ids"][1:], item["labels"][1:]  # position 0 is never predicted
    return tok.decode(ids[labels != IGNORE_INDEX])


COMPLETIONS = [{"prompt": "Q one", "completion": "ans two three"}, {"prompt": "Q four", "completion": "ans five"}] * 4


def module(tmp_path: Path, **kwargs: object) -> TextDataModule:
    settings: dict[str, object] = {"tokenizer": word_tokenizer(), "max_length": 32, "packing": "none",
                                   "cache_dir": str(tmp_path / "cache"), "batch_size": 2}  # fmt: skip
    settings.update(kwargs)
    return TextDataModule(**settings)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- file kinds


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "arrow", "saved", "folder"])
def test_every_file_kind_reads_the_same_rows(tmp_path: Path, kind: str):
    import datasets

    table = datasets.Dataset.from_list(COMPLETIONS)
    target = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        jsonl(target, COMPLETIONS)
    elif kind == "json":
        target.write_text(json.dumps(COMPLETIONS))
    elif kind == "parquet":
        table.to_parquet(str(target))
    elif kind == "csv":
        table.to_csv(str(target), index=False)
    elif kind == "arrow":
        import pyarrow as pa

        with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_stream(sink, table.data.schema) as writer:
            writer.write_table(table.data.table)
    elif kind == "saved":
        table.save_to_disk(str(target))
    else:  # a folder of two JSON Lines shards, read in name order
        target.mkdir()
        jsonl(target / "part-0.jsonl", COMPLETIONS[:3])
        jsonl(target / "part-1.jsonl", COMPLETIONS[3:])
    dm = module(tmp_path, path=str(target), val_fraction=0.25)
    dm.setup("fit")
    assert dm.summary["train"]["records"] == 8 and dm.summary["train"]["formats"] == {"completion": 8}
    assert dm.train_set is not None and dm.val_set is not None
    assert len(dm.train_set) + len(dm.val_set) == 8
    tok = dm.tokenizer
    assert tok is not None
    targets = {decoded_targets(tok, item) for item in dm.train_set}  # the prompt takes no loss
    assert targets <= {"ans two three </s>", "ans five </s>"}
    first = dm.train_set[0]
    assert first["input_ids"][0] == tok.bos_token_id and first["input_ids"][-1] == tok.eos_token_id


def test_mixed_sources_with_column_mapping_and_a_separate_validation_set(tmp_path: Path):
    qa = [{"question": "Q one", "answer": "ans two"}] * 3
    turns = [("human", "hi"), ("gpt", "hello"), ("human", "how are you"), ("gpt", "fine")]
    chats = [{"conversations": [{"from": who, "value": text} for who, text in turns]}] * 2
    import datasets

    datasets.Dataset.from_list(qa).to_parquet(str(tmp_path / "qa.parquet"))
    jsonl(tmp_path / "chat.jsonl", chats)
    jsonl(tmp_path / "val.jsonl", [{"text": "one two three"}] * 2)
    sources = [
        DataSource(
            str(tmp_path / "qa.parquet"), type="alpaca", columns={"instruction": "question", "output": "answer"}
        ),
        DataSource(str(tmp_path / "chat.jsonl"), max_examples=1),
    ]
    dm = module(tmp_path, sources=sources, val_sources=[DataSource(str(tmp_path / "val.jsonl"))])
    dm.setup("fit")
    assert dm.summary["train"]["formats"] == {"alpaca": 3, "sharegpt": 1}
    assert dm.train_set is not None and dm.val_set is not None and len(dm.val_set) == 2
    tok = dm.tokenizer
    assert tok is not None
    targets = sorted(decoded_targets(tok, item) for item in dm.train_set)
    assert targets == ["ans two </s>"] * 3 + ["hello ; fine ;"]
    last = module(tmp_path, sources=[sources[1]], train_on="last_answer", val_sources=dm.val_sources)
    last.setup("fit")
    assert [decoded_targets(tok, item) for item in last.train_set] == ["fine ;"]  # type: ignore[union-attr]
    everything = module(tmp_path, sources=[sources[1]], train_on="all", val_sources=dm.val_sources)
    everything.setup("fit")
    row = everything.train_set[0]  # type: ignore[index]
    assert torch.equal(row["labels"], row["input_ids"])


def test_deprecated_spellings_still_work(tmp_path: Path):
    path = jsonl(tmp_path / "c.jsonl", COMPLETIONS)
    with pytest.deprecated_call(match="packing=False"):
        dm = module(tmp_path, path=str(path), packing=False)
    assert dm.packing == "none"
    with pytest.deprecated_call(match="mask_prompt=False"):
        dm = module(tmp_path, path=str(path), mask_prompt=False)
    assert dm.train_on == "all"
    with pytest.deprecated_call(match="packing=True"):
        assert module(tmp_path, path=str(path), packing=True).packing == "stream"
    with pytest.raises(LISAConfigError, match=r"`packing='pack'` is not one of"):
        module(tmp_path, path=str(path), packing="pack")
    with pytest.raises(LISAConfigError, match="Give `path` or `sources`"):
        module(tmp_path, path=str(path), sources=[DataSource(str(path))])


# ------------------------------------------------------------------------------------ cache


def count_builds(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    builds: list[Path] = []
    original = data_module.build_cache

    def counting(folder: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        builds.append(folder)
        return original(folder, *args, **kwargs)

    monkeypatch.setattr(data_module, "build_cache", counting)
    return builds


def test_cache_is_reused_until_the_data_the_template_or_a_setting_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    builds = count_builds(monkeypatch)
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4
    path = jsonl(tmp_path / "chat.jsonl", chats)

    def run(tok: PreTrainedTokenizerFast, **kwargs: object) -> TextDataModule:
        dm = module(tmp_path, path=str(path), tokenizer=tok, **kwargs)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    first = run(word_tokenizer())
    assert len(builds) == 1 and first.cache_path == builds[0]
    run(word_tokenizer())  # same content, a new tokenizer object: reused
    saved = tmp_path / "tok-copy"
    word_tokenizer().save_pretrained(str(saved))
    run(PreTrainedTokenizerFast.from_pretrained(str(saved)))  # the same tokenizer loaded from elsewhere: reused
    assert len(builds) == 1
    jsonl(path, [*chats, chats[0]])  # an edited file
    run(word_tokenizer())
    assert len(builds) == 2
    edited_template = run(word_tokenizer(template_end="you"))  # another chat template
    assert len(builds) == 3
    assert "you" in word_tokenizer().decode(edited_template.train_set[0]["input_ids"])  # type: ignore[index]
    run(word_tokenizer(), max_length=16)  # another setting
    assert len(builds) == 4
    run(word_tokenizer(), max_length=16)
    assert len(builds) == 4
    run(word_tokenizer(), max_length=16, rebuild_cache=True)  # forced
    assert len(builds) == 5 and len(set(builds)) == 4


def test_parallel_tokenization_gives_the_same_rows(tmp_path: Path):
    records = [{"prompt": f"Q {' '.join(WORDS[13 : 13 + i % 6])}", "completion": "ans two"} for i in range(40)]
    path = jsonl(tmp_path / "c.jsonl", records)
    one = module(tmp_path / "a", path=str(path))
    two = module(tmp_path / "b", path=str(path), num_proc=2)
    one.setup("fit")
    two.setup("fit")
    assert one.train_set is not None and two.train_set is not None
    assert [r["input_ids"].tolist() for r in one.train_set] == [r["input_ids"].tolist() for r in two.train_set]


# ---------------------------------------------------------------------------- length policy


def test_overlong_records_are_truncated_or_dropped_and_counted(tmp_path: Path):
    records = [{"prompt": "Q", "completion": "ans " + "one " * n} for n in (2, 3, 20, 30)]
    records.append({"prompt": "Q " + "two " * 40, "completion": "ans"})  # the prompt fills the row
    path = jsonl(tmp_path / "long.jsonl", records * 2)
    cut = module(tmp_path, path=str(path), max_length=16, val_fraction=0.2)
    cut.setup("fit")
    counts = cut.summary["train"]
    assert (counts["records"], counts["truncated"], counts["dropped_too_long"]) == (10, 4, 0)
    assert counts["dropped_without_targets"] == 2 and counts["examples"] == 8
    assert cut.train_set is not None and max(len(r["input_ids"]) for r in cut.train_set) == 16
    dropped = module(tmp_path, path=str(path), max_length=16, overlong="drop", val_fraction=0.2)
    dropped.setup("fit")
    counts = dropped.summary["train"]
    assert (counts["truncated"], counts["dropped_too_long"], counts["examples"]) == (0, 6, 4)
    assert "6 dropped as too long" in data_module.format_data_summary(dropped.summary, "none", 16)


# ----------------------------------------------------------------------------------- errors


def test_bad_data_names_the_file_and_the_record(tmp_path: Path):
    path = jsonl(tmp_path / "qa.jsonl", [{"question": "a", "answer": "b"}, {"question": "c"}])
    with pytest.raises(
        ValueError, match=r"qa\.jsonl:1: a 'alpaca' record needs the fields \['instruction', 'output'\]"
    ):
        module(tmp_path, sources=[DataSource(str(path), type="alpaca")]).setup("fit")
    mapped = DataSource(str(path), type="alpaca", columns={"instruction": "question", "output": "answer"})
    with pytest.raises(ValueError, match=r"qa\.jsonl:2: a 'alpaca' record needs"):
        module(tmp_path, sources=[mapped]).setup("fit")
    wrong = DataSource(str(path), columns={"output": "reply"})
    with pytest.raises(ValueError, match=r"qa\.jsonl: `columns=\{'output': 'reply'\}` names the columns \['reply'\]"):
        module(tmp_path, sources=[wrong]).setup("fit")
    empty = jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": []}])
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: the conversation has no 'assistant' message"):
        module(tmp_path, path=str(empty)).setup("fit")
    blank_lines = tmp_path / "gaps.jsonl"
    blank_lines.write_text('{"text": "one"}\n\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"gaps\.jsonl:3: field 'text' must be a string, got int"):
        module(tmp_path, path=str(blank_lines)).setup("fit")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ValueError, match=r"broken\.parquet: could not be read as parquet"):
        module(tmp_path, path=str(broken)).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"`path='\./missing\.jsonl'`: no such file"):
        module(tmp_path, path="./missing.jsonl").setup("fit")
    odd = tmp_path / "data.xyz"
    odd.write_text("x")
    with pytest.raises(LISAConfigError, match=r"cannot tell how to read 'data\.xyz'"):
        module(tmp_path, sources=[DataSource(str(odd))]).setup("fit")


def test_the_local_jsonl_example_config_at_tiny_scale(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from cli_args import tiny

    from lightning_lisa.recipes.cli import LisaCLI

    records = [{"instruction": f"Repeat {i}.", "output": f"{i} " * (i % 5 + 1)} for i in range(40)]
    path = jsonl(tmp_path / "alpaca.jsonl", records)
    config = Path(__file__).parents[1] / "examples" / "configs" / "finetune-local-jsonl.yaml"
    cli = LisaCLI(
        args=[
            "fit",
            "--config",
            str(config),
            *tiny(tmp_path, tmp_path / "cache", steps=2),
            "--model.model_name_or_path=null",
            "--data.tokenizer=null",
            "--data.max_examples=null",
            f'--data.sources=[{{"path": "{path}"}}]',
            "--data.num_workers=0",
            "--data.num_proc=1",
            "--trainer.callbacks=[]",
            "--data.max_length=192",
        ]
    )
    assert cli.datamodule.packing == "isolated" and cli.trainer.global_step == 2
    assert cli.datamodule.summary["train"]["formats"] == {"alpaca": 40}
    assert "Data: 40 records, 0 truncated to 192 tokens, 0 dropped as too long" in capsys.readouterr().out


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_pre_tokenized_rows_on_arrow_equal_those_through_python(tmp_path: Path, overlong: str):
    import datasets

    ids = [list(range(n % 30 + 1)) for n in range(40)]
    datasets.Dataset.from_dict({"input_ids": ids}).to_parquet(str(tmp_path / "ids.parquet"))  # the Arrow path
    jsonl(tmp_path / "labelled.jsonl", [{"input_ids": i, "labels": i} for i in ids])  # through Python
    runs = []
    for name in ("ids.parquet", "labelled.jsonl"):
        dm = module(tmp_path / f"c-{name}", path=str(tmp_path / name), max_length=10, overlong=overlong)
        dm.setup("fit")
        assert dm.train_set is not None
        runs.append(
            (dm.summary["train"], [r["input_ids"].tolist() for r in dm.train_set], list(dm.train_set.targets()))
        )
    assert runs[0] == runs[1]
    assert runs[0][0]["dropped_without_targets"] == 2 and runs[0][0]["formats"] == {"tokens": 40}


def test_another_packing_or_split_reuses_the_tokenized_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from lightning_lisa.recipes.data import cache

    calls: list[int] = []
    original = cache.tokenize_parts

    def counting(parts, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(parts))
        return original(parts, *args, **kwargs)

    monkeypatch.setattr(cache, "tokenize_parts", counting)
    path = jsonl(tmp_path / "c.jsonl", COMPLETIONS)
    rows = {}
    for packing, fraction in (("none", 0.25), ("isolated", 0.25), ("none", 0.5), ("stream", 0.25)):
        dm = module(tmp_path, path=str(path), packing=packing, val_fraction=fraction, max_length=16)
        dm.setup("fit")
        assert dm.train_set is not None
        rows[packing, fraction] = sorted(tuple(r["input_ids"].tolist()) for r in dm.train_set)
    assert len(calls) == 2  # none, isolated and the other split share the examples; stream keeps them whole
    assert rows["none", 0.5] != rows["none", 0.25]
    module(tmp_path, path=str(path), packing="isolated", max_length=16, rebuild_cache=True).setup("fit")
    assert len(calls) == 3
