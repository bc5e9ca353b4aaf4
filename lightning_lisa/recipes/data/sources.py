"""Where the records come from: local files and folders of any common format, or data sets on the Hugging Face Hub.

Everything is read with Hugging Face ``datasets``. A :class:`DataSource` names one file, folder or Hub
data set; a data module mixes several, as axolotl's ``datasets:`` list does. Each source is read in
parts (one per file), so an error names the file and the record. :func:`source_digest` is the content
part of the tokenization cache's key: file contents for local data, the fingerprint ``datasets``
computes for a Hub data set.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from lightning_lisa.errors import LISAConfigError, check_choice, check_int
from lightning_lisa.recipes.corpus import _read_text, embedded_corpus
from lightning_lisa.recipes.data.records import RECORD_FORMATS, RecordFormat

if TYPE_CHECKING:
    from datasets import Dataset

#: How files are read: by extension (``auto``), or named.
Reader = Literal["auto", "json", "parquet", "csv", "arrow", "text"]
READERS: tuple[str, ...] = get_args(Reader)

#: File extensions and their readers (``.txt`` and ``.md``: paragraphs separated by blank lines).
EXTENSIONS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
    ".md": "text",
}


@dataclass
class DataSource:
    """One source of records: a local file or folder, or a data set on the Hugging Face Hub.

    Args:
        path: A file (``.json``, ``.jsonl``, ``.parquet``, ``.csv``, ``.arrow``, ``.txt``), a folder of such
            files (read in name order), a folder written by ``Dataset.save_to_disk``, or a Hub name (e.g.
            ``"tatsu-lab/alpaca"``; needs network access at the first use, then ``datasets``' own cache).
        type: The record format (see :data:`~lightning_lisa.recipes.records.RecordFormat`); ``auto`` detects
            it per record.
        split: The split to read (Hub data sets and ``save_to_disk`` folders of several splits).
        data_files: For a Hub data set or a folder: the files to read (a glob or a list).
        name: The configuration name of a Hub data set.
        columns: The data's column for a field this library reads, e.g. ``{"instruction": "question",
            "output": "answer"}`` or ``{"messages": "dialog"}``.
        reader: How files are read: ``auto`` (by extension), ``json``, ``parquet``, ``csv``, ``arrow`` or
            ``text``.
        max_examples: Read only the first this many records of this source (``None``: all).

    Examples:
        >>> DataSource("data/train.parquet", columns={"output": "answer"}).columns
        {'output': 'answer'}
    """

    path: str
    type: RecordFormat = "auto"
    split: str = "train"
    data_files: list[str] | str | None = None
    name: str | None = None
    columns: dict[str, str] | None = None
    reader: Reader = "auto"
    max_examples: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise LISAConfigError(f"`path={self.path!r}` is not allowed; give a file, a folder or a Hub name.")
        check_choice("type", self.type, RECORD_FORMATS)
        check_choice("reader", self.reader, READERS)
        if self.max_examples is not None:
            check_int("max_examples", self.max_examples, 1)
        if self.columns is not None and not all(isinstance(v, str) for v in self.columns.values()):
            raise LISAConfigError(f"`columns={self.columns!r}` must map field names to column names (strings).")

    def describe(self) -> dict[str, Any]:
        """The settings that change what is read (for the cache key)."""
        return asdict(self)


@dataclass
class Part:
    """A part of a source read as one ``datasets.Dataset``: one file, or one Hub split.

    Attributes:
        label: The file or the Hub name, for messages.
        dataset: The records.
        json_lines: The file when it is JSON Lines (so a record's line can be found for an error).
    """

    label: str
    dataset: Dataset
    json_lines: Path | None = None

    def where(self, record: int) -> str:
        """``file:line`` for a JSON Lines record, else ``label, record N`` (1-based)."""
        if self.json_lines is not None:
            line = _line_of_record(self.json_lines, record)
            if line is not None:
                return f"{self.json_lines}:{line}"
        return f"{self.label}, record {record + 1}"


def embedded_source() -> list[Part]:
    """The help text shipped with Python (``pydoc_data.topics``), one record per topic."""
    from datasets import Dataset

    texts = [e.text for e in embedded_corpus()]
    return [Part("the embedded corpus (pydoc_data.topics)", Dataset.from_dict({"text": texts}))]


def local_files(source: DataSource) -> list[Path] | None:
    """The files of a local source in reading order; ``None`` for a Hub name or a ``save_to_disk`` folder.

    Raises:
        LISAConfigError: For a folder without readable files, or a file of an unknown extension.
    """
    path = Path(source.path).expanduser()
    if not path.exists():
        if source.path.startswith((".", "/", "~")) or Path(source.path).suffix.lower() in EXTENSIONS:
            raise FileNotFoundError(f"`path={source.path!r}`: no such file or folder (resolved to {path.resolve()}).")
        return None  # a Hub name
    if path.is_dir() and _is_saved_dataset(path):
        return None
    if path.is_file():
        _reader(source, path)
        return [path]
    pattern = source.data_files
    if isinstance(pattern, str):
        candidates = sorted(path.glob(pattern))
    elif isinstance(pattern, list):
        candidates = sorted(f for p in pattern for f in path.glob(p))
    else:
        candidates = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    files = [p for p in candidates if p.is_file()]
    if not files:
        raise LISAConfigError(
            f"`path={source.path!r}`: the folder has no data files ({', '.join(sorted(EXTENSIONS))}"
            f"{'' if pattern is None else f' matching data_files={pattern!r}'})."
        )
    for file in files:
        _reader(source, file)
    return files


def read_source(source: DataSource, cache_dir: Path) -> list[Part]:
    """Read ``source`` with ``datasets``: one part per local file, one for a Hub data set or a saved folder.

    Args:
        source: What to read.
        cache_dir: ``datasets``' own cache of converted files.

    Raises:
        FileNotFoundError: For a local path that does not exist.
        ValueError: For a file ``datasets`` cannot read (for JSON Lines: the line that is not JSON).
        LISAConfigError: For an unknown file type, or a Hub data set that cannot be loaded.
    """
    import datasets

    files = local_files(source)
    path = Path(source.path).expanduser()
    if files is None and path.is_dir():
        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.DatasetDict):
            if source.split not in saved:
                raise LISAConfigError(
                    f"`path={source.path!r}` holds the splits {sorted(saved)}; `split={source.split!r}` is not one."
                )
            saved = saved[source.split]
        return [Part(str(path), saved)]
    if files is None:
        try:
            loaded = datasets.load_dataset(
                source.path,
                source.name,
                split=source.split,
                data_files=source.data_files,
                cache_dir=str(cache_dir),
            )
        except Exception as err:  # datasets raises many types (connection, missing split, bad config)
            raise LISAConfigError(
                f"`path={source.path!r}` is not a local file or folder, and loading it as a Hub data set failed "
                f"({type(err).__name__}: {err}). Check the name, `split={source.split!r}`, `name={source.name!r}`, "
                "and the network (or HF_HUB_OFFLINE)."
            ) from err
        assert isinstance(loaded, datasets.Dataset)
        return [Part(source.path, loaded)]
    return [_read_file(source, file, cache_dir) for file in files]


def source_digest(source: DataSource, cache_dir: Path) -> str:
    r"""A digest of the source's content: its files' bytes, or the fingerprint ``datasets`` gives a Hub split.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = Path(d) / "a.jsonl"
        ...     _ = p.write_text('{"text": "hi"}\\n')
        ...     first = source_digest(DataSource(str(p)), Path(d))
        ...     _ = p.write_text('{"text": "ho"}\\n')
        ...     first != source_digest(DataSource(str(p)), Path(d))
        True
    """
    digest = hashlib.sha256(json.dumps(source.describe(), sort_keys=True).encode())
    files = local_files(source)
    path = Path(source.path).expanduser()
    if files is None and path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    if files is None:
        for part in read_source(source, cache_dir):
            digest.update(str(getattr(part.dataset, "_fingerprint", "")).encode())
        return digest.hexdigest()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        digest.update(file_digest(file).encode())
    return digest.hexdigest()


def embedded_digest() -> str:
    """A digest of the embedded corpus (it changes with the Python version)."""
    digest = hashlib.sha256()
    for example in embedded_corpus():
        digest.update(example.text.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _reader(source: DataSource, file: Path) -> str:
    if source.reader != "auto":
        return source.reader
    reader = EXTENSIONS.get(file.suffix.lower())
    if reader is None:
        raise LISAConfigError(
            f"`path={source.path!r}`: cannot tell how to read {file.name!r} from its extension; use one of "
            f"{sorted(EXTENSIONS)} or set `reader` to one of {list(READERS[1:])}."
        )
    return reader


def _read_file(source: DataSource, file: Path, cache_dir: Path) -> Part:
    import datasets

    reader = _reader(source, file)
    if reader == "text":
        paragraphs = [e.text for e in _read_text(file.read_text(encoding="utf-8"))]
        if not paragraphs:
            raise ValueError(f"{file}: the corpus is empty (no text after skipping blank lines).")
        return Part(str(file), datasets.Dataset.from_dict({"text": paragraphs}))
    json_lines = file if reader == "json" and file.suffix.lower() != ".json" else None
    try:
        loaded = datasets.load_dataset(reader, data_files=str(file), split="train", cache_dir=str(cache_dir))
    except Exception as err:  # pyarrow's and datasets' parse errors have no common type
        if json_lines is not None:
            _raise_json_error(file, source.type, err)
        raise ValueError(f"{file}: could not be read as {reader} ({type(err).__name__}: {err}).") from err
    assert isinstance(loaded, datasets.Dataset)
    if len(loaded) == 0:
        raise ValueError(f"{file}: the corpus is empty (no records).")
    return Part(str(file), loaded, json_lines)


def _raise_json_error(file: Path, record_type: str, cause: Exception) -> None:
    """Find the first line of a JSON Lines file that is not JSON or not a valid record, and raise an error naming it."""
    from lightning_lisa.recipes.data.records import record_format, to_example

    for number, line in _numbered_lines(file):
        where = f"{file}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno}).") from err
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
        kind = record_format(record, record_type, where)
        if kind != "tokens":
            to_example(record, kind, where)
    raise ValueError(
        f"{file}: the records could not be read together ({type(cause).__name__}: {cause}); every line is a valid "
        "record on its own, so a field probably has different types in different records."
    ) from cause


def _numbered_lines(file: Path) -> Iterator[tuple[int, str]]:
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def _line_of_record(file: Path, record: int) -> int | None:
    for index, (number, _) in enumerate(_numbered_lines(file)):
        if index == record:
            return number
    return None


def _is_saved_dataset(path: Path) -> bool:
    return (
        (path / "dataset_info.json").is_file()
        or (path / "dataset_dict.json").is_file()
        or (path / "state.json").is_file()
    )


def hf_cache(cache_dir: Path) -> Path:
    """Where ``datasets`` keeps the Arrow files of the sources it converts."""
    return Path(os.environ.get("HF_DATASETS_CACHE") or cache_dir / "hf-datasets")
