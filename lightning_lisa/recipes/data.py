"""A ``LightningDataModule`` of tokenized text for causal language modelling.

:class:`TextDataModule` reads a corpus (see :mod:`lightning_lisa.recipes.corpus`), tokenizes it with any
Hugging Face tokenizer (or the default BPE of :mod:`lightning_lisa.recipes.tokenizer`), and either packs the
token stream into ``max_length`` sequences or pads one example per sequence. A seeded share of the
sequences is held out for validation; ``test`` and ``predict`` use the validation sequences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_lisa.recipes.corpus import CorpusFormat, Example, embedded_corpus, read_corpus
from lightning_lisa.recipes.tokenizer import default_tokenizer, load_tokenizer

IGNORE_INDEX = -100
Batch = dict[str, torch.Tensor]


class SequenceDataset(Dataset[Batch]):
    """Token sequences with their labels (``-100`` where no loss is taken).

    Examples:
        >>> ds = SequenceDataset([[1, 2, 3]], [[-100, 2, 3]])
        >>> len(ds), ds[0]["labels"].tolist()
        (1, [-100, 2, 3])
    """

    def __init__(self, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> None:
        self.input_ids = [torch.tensor(ids, dtype=torch.long) for ids in input_ids]
        self.labels = [torch.tensor(lab, dtype=torch.long) for lab in labels]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> Batch:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


class PadCollator:
    """Pads a list of examples to the longest one, with an attention mask and ``-100`` labels.

    Examples:
        >>> batch = PadCollator(pad_id=0)([{"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([5, 6])},
        ...                                {"input_ids": torch.tensor([7]), "labels": torch.tensor([7])}])
        >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()
        ([[5, 6], [7, 0]], [[1, 1], [1, 0]], [[5, 6], [7, -100]])
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[Batch]) -> Batch:
        """Stack ``examples`` into one padded batch."""
        length = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = example["input_ids"]
            labels[row, :n] = example["labels"]
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class TextDataModule(pl.LightningDataModule):
    """Tokenized text for causal LM fine-tuning: a text file, a JSONL corpus, or Python's own docs.

    Args:
        path: A plain-text file (paragraphs separated by blank lines) or a JSONL file of ``{"text": ...}``,
            Alpaca ``{"instruction", "input", "output"}`` or chat ``{"messages": [{"role", "content"}, ...]}``
            records (rendered with the tokenizer's chat template). ``None``: the English help text
            that ships with Python (``pydoc_data.topics``), so nothing is downloaded.
        format: ``"text"``, ``"jsonl"``, or ``"auto"`` (``.jsonl`` files are JSONL).
        tokenizer: A Hugging Face tokenizer, a path/name for ``AutoTokenizer.from_pretrained``, or a GGUF
            file (``*.gguf``: the tokenizer stored in it).
            ``None``: a byte-level BPE of ``vocab_size`` tokens trained on the corpus and cached.
        vocab_size: Vocabulary of the default tokenizer (the model's ``vocab_size`` must be at least this).
        cache_dir: Where the default tokenizer is cached; ``None``: ``$LIGHTNING_LISA_CACHE`` or
            ``~/.cache/lightning_lisa``.
        max_length: Tokens per sequence.
        packing: Concatenate all examples (each ending with EOS) and cut the stream into sequences of
            exactly ``max_length`` tokens; otherwise one example per sequence, truncated and padded.
        mask_prompt: Take no loss on prompt tokens (Alpaca instructions and inputs; in conversations,
            everything but the assistant turns).
        val_fraction: Share of the sequences held out for validation (at least one sequence).
        max_examples: Use only the first this many examples of the corpus (``None``: all).
        batch_size: Sequences per batch.
        num_workers: Data-loader worker processes.
        seed: Seed of the train/validation split.

    Attributes:
        tokenizer: The tokenizer, after :meth:`setup`.

    Examples:
        >>> dm = TextDataModule(max_examples=20, vocab_size=512, max_length=64, cache_dir=getfixture("tmp_path"))
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["input_ids"].shape
        torch.Size([8, 64])
    """

    def __init__(
        self,
        path: str | None = None,
        format: CorpusFormat = "auto",
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        vocab_size: int = 4096,
        cache_dir: str | None = None,
        max_length: int = 128,
        packing: bool = True,
        mask_prompt: bool = True,
        val_fraction: float = 0.05,
        max_examples: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_positive("max_length", max_length, minimum=2)
        _check_positive("batch_size", batch_size)
        _check_positive("vocab_size", vocab_size)
        if max_examples is not None:
            _check_positive("max_examples", max_examples)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction={val_fraction!r}` is not allowed; it must be between 0 and 1 (exclusive).")
        self.path = path
        self.format = format
        self.tokenizer_spec = tokenizer
        self.vocab_size = vocab_size
        self.cache_dir = cache_dir
        self.max_length = max_length
        self.packing = packing
        self.mask_prompt = mask_prompt
        self.val_fraction = val_fraction
        self.max_examples = max_examples
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_set: SequenceDataset | None = None
        self.val_set: SequenceDataset | None = None

    # ---------------------------------------------------------------------------------- hooks

    def prepare_data(self) -> None:
        """Train and cache the default tokenizer once per node, before every process loads it."""
        if self.tokenizer_spec is None:
            self._load_tokenizer(self.examples())

    def setup(self, stage: str) -> None:
        """Read, tokenize and split the corpus (once; later stages reuse it)."""
        if self.train_set is not None:
            return
        examples = self.examples()
        tokenizer = self._load_tokenizer(examples)
        input_ids, labels = self._tokenize(tokenizer, examples)
        if len(input_ids) < 2:
            raise ValueError(
                f"{self._source()}: the corpus gives {len(input_ids)} sequence(s) of `max_length={self.max_length}` "
                "tokens; at least 2 are needed (one to train on, one to validate). Use more text or a smaller "
                "`max_length`."
            )
        order = torch.randperm(len(input_ids), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = max(1, math.floor(len(order) * self.val_fraction))
        val, train = order[:n_val], order[n_val:]
        self.train_set = SequenceDataset([input_ids[i] for i in train], [labels[i] for i in train])
        self.val_set = SequenceDataset([input_ids[i] for i in sorted(val)], [labels[i] for i in sorted(val)])
        self.tokenizer = tokenizer

    def train_dataloader(self) -> DataLoader[Batch]:
        """Shuffled training sequences."""
        return self._loader(self._splits()[0], shuffle=True)

    def val_dataloader(self) -> DataLoader[Batch]:
        """The held-out sequences."""
        return self._loader(self._splits()[1], shuffle=False)

    def test_dataloader(self) -> DataLoader[Batch]:
        """The held-out sequences (there is no separate test split)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader[Batch]:
        """The held-out sequences, to score them."""
        return self.val_dataloader()

    # ------------------------------------------------------------------------------- helpers

    def examples(self) -> list[Example]:
        """The corpus, as :class:`~lightning_lisa.recipes.corpus.Example` records (first ``max_examples``)."""
        examples = embedded_corpus() if self.path is None else read_corpus(self.path, self.format)
        return examples[: self.max_examples] if self.max_examples is not None else examples

    def _source(self) -> str:
        return "the embedded corpus (pydoc_data.topics)" if self.path is None else str(self.path)

    def _load_tokenizer(self, examples: list[Example]) -> PreTrainedTokenizerBase:
        if self.tokenizer_spec is not None:
            return load_tokenizer(self.tokenizer_spec)
        texts = [e.prompt + e.text for e in examples]
        return default_tokenizer(texts, self.vocab_size, self.cache_dir)

    def _tokenize(
        self, tokenizer: PreTrainedTokenizerBase, examples: list[Example]
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and labels of every sequence: packed, or one (truncated) example each."""
        eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
        plain = [e for e in examples if not e.messages]
        prompts = iter(_encode(tokenizer, [e.prompt for e in plain]))
        texts = iter(_encode(tokenizer, [e.text for e in plain]))
        docs_ids, docs_labels = [], []
        for example in examples:
            if example.messages:
                ids, labels = chat_tokens(tokenizer, example.messages, self.mask_prompt, self._source())
                docs_ids.append(ids)
                docs_labels.append(labels)
                continue
            prompt, text = next(prompts), next(texts)
            start = [bos] if bos is not None else []
            end = [eos] if eos is not None else []
            hidden = [IGNORE_INDEX] * len(prompt) if self.mask_prompt else prompt
            docs_ids.append(start + prompt + text + end)
            docs_labels.append(start + hidden + text + end)
        if not self.packing:
            return self._truncate(docs_ids, docs_labels)
        stream_ids = [t for d in docs_ids for t in d]
        stream_labels = [t for d in docs_labels for t in d]
        n = len(stream_ids) // self.max_length * self.max_length
        chunks = range(0, n, self.max_length)
        return (
            [stream_ids[i : i + self.max_length] for i in chunks],
            [stream_labels[i : i + self.max_length] for i in chunks],
        )

    def _truncate(self, ids: list[list[int]], labels: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
        """Cut examples to ``max_length``; drop those left without a token to learn (a prompt too long)."""
        kept = [
            (i[: self.max_length], lab[: self.max_length])
            for i, lab in zip(ids, labels, strict=True)
            if any(t != IGNORE_INDEX for t in lab[1 : self.max_length])
        ]
        if len(kept) < len(ids):
            rank_zero_warn(
                f"{self._source()}: {len(ids) - len(kept)} of {len(ids)} examples have no response token within "
                f"`max_length={self.max_length}` (the prompt fills it) and are left out."
            )
        return [k[0] for k in kept], [k[1] for k in kept]

    def _splits(self) -> tuple[SequenceDataset, SequenceDataset]:
        if self.train_set is None or self.val_set is None:
            self.setup("fit")
        assert self.train_set is not None
        assert self.val_set is not None
        return self.train_set, self.val_set

    def _loader(self, dataset: SequenceDataset, shuffle: bool) -> DataLoader[Batch]:
        assert self.tokenizer is not None
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=PadCollator(pad),
            persistent_workers=self.num_workers > 0,
        )


def chat_tokens(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[tuple[str, str]],
    assistant_only: bool = True,
    source: str = "the corpus",
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
            pieces.append((text[len(done) :], trained))
            done = text
    whole = render(len(messages), False)
    if whole.startswith(done) and len(whole) > len(done):
        pieces.append((whole[len(done) :], False))
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        if not text:
            continue
        tokens = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
        ids.extend(tokens)
        labels.extend(tokens if trained or not assistant_only else [IGNORE_INDEX] * len(tokens))
    return ids, labels


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    ids: Any = tokenizer(texts, add_special_tokens=False)["input_ids"] if any(texts) else [[] for _ in texts]
    return [list(x) for x in ids]


def _check_positive(name: str, value: object, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}={value!r}` is not allowed; it must be an integer >= {minimum}.")
