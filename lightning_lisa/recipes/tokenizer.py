"""Tokenizers: any Hugging Face tokenizer, or a small byte-level BPE trained on the corpus and cached.

The default tokenizer lets a run start on a machine with no network: it is trained with the
``tokenizers`` library on the training text itself at first use (well under a second for the
embedded corpus) and saved under the cache directory, keyed by the text and the vocabulary size, so
later runs load it instead of training it again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

#: Special tokens of the default tokenizer, in id order.
SPECIAL_TOKENS: dict[str, str] = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}

#: Environment variable that overrides the default cache directory.
CACHE_ENV = "LIGHTNING_LISA_CACHE"


def default_cache_dir() -> Path:
    """``$LIGHTNING_LISA_CACHE``, else ``$XDG_CACHE_HOME/lightning_lisa``, else ``~/.cache/lightning_lisa``.

    Examples:
        >>> default_cache_dir().name
        'lightning_lisa'
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lightning_lisa"


def bpe_cache_path(texts: Iterable[str], vocab_size: int, cache_dir: str | Path | None = None) -> Path:
    """Where the default tokenizer for ``texts`` and ``vocab_size`` is cached.

    Examples:
        >>> bpe_cache_path(["some text"], 512, "/tmp/cache").name
        'bpe-512-f4c526ef828934f7.json'
    """
    digest = hashlib.sha256(f"bpe-v1:{vocab_size}".encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return directory / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"


def train_bpe(texts: Iterable[str], vocab_size: int, path: Path) -> None:
    """Train a byte-level BPE tokenizer on ``texts`` and save it to ``path`` (atomically).

    Args:
        texts: The training text.
        vocab_size: Size of the vocabulary, special tokens included; at least 260 (the 256 byte
            symbols, the special tokens and one merge).
        path: Where to write the ``tokenizers`` JSON file.

    Raises:
        ValueError: If ``vocab_size`` is too small.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(SPECIAL_TOKENS) + 1
    if vocab_size < minimum:
        raise ValueError(f"`vocab_size={vocab_size}` is too small for a byte-level BPE; it must be >= {minimum}.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    tokenizer.save(tmp)
    os.replace(tmp, path)  # concurrent processes never read a half-written file


def default_tokenizer(
    texts: list[str], vocab_size: int = 4096, cache_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer of ``texts``: loaded from the cache, or trained and cached first.

    Args:
        texts: The training text (the cache key includes it).
        vocab_size: Size of the vocabulary, special tokens included (smaller if the text runs out of
            pairs to merge).
        cache_dir: Directory of the cache; ``None`` for :func:`default_cache_dir`.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     tok = default_tokenizer(["hello world, hello tokens"] * 10, vocab_size=300, cache_dir=d)
        >>> tok.decode(tok("hello world")["input_ids"]), tok.eos_token, len(tok) <= 300
        ('hello world', '</s>', True)
    """
    path = bpe_cache_path(texts, vocab_size, cache_dir)
    if not path.is_file():
        train_bpe(texts, vocab_size, path)
    return PreTrainedTokenizerFast(tokenizer_file=str(path), **SPECIAL_TOKENS)  # type: ignore[no-untyped-call]


def load_tokenizer(tokenizer: str | PreTrainedTokenizerBase, **kwargs: Any) -> PreTrainedTokenizerBase:
    """A tokenizer object as is, or loaded from a path or name, or the tokenizer of a GGUF file.

    Paths and names go to ``AutoTokenizer.from_pretrained``; a ``*.gguf`` file to
    :func:`~lightning_lisa.recipes.gguf.load_gguf_tokenizer`.

    Raises:
        ValueError: If the tokenizer cannot be loaded, naming what was given.
        LISAConfigError: For a GGUF file that is missing or unreadable, or without the ``gguf`` package.
    """
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if str(tokenizer).lower().endswith(".gguf"):
        from lightning_lisa.recipes.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(tokenizer, **kwargs)
    try:
        loaded: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(tokenizer, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"`tokenizer={tokenizer!r}` could not be loaded with AutoTokenizer.from_pretrained: {err}. Give a local "
            "directory with tokenizer files, a Hub name (with network access), or null for the default tokenizer."
        ) from err
    return loaded
