r"""The study's tasks: what is trained, what is evaluated, and the two measures of forgetting.

Three tasks of different kinds, each a fixed, seed-independent split into train / validation / test:

* ``reverse`` (a skill the base model lacks): ``Reverse: w1 ... w5\nReversed:`` followed by the five
  words in reverse order; words from a fixed list of 188 common English words. Trained on the answers
  only. Metric: exact match, by teacher-forced argmax over the answer's tokens (the verdict of greedy
  decoding, in one forward pass).
* ``code`` (domain shift): Python standard-library source, split by file, packed into rows of 48 tokens,
  trained on every token. Metric: the held-out loss per token.
* ``facts`` (knowledge the base model lacks): 64 facts about 32 fictional people (the town each comes
  from and the company each works for; both are one capitalised common word, each used once), each stated
  in three paraphrased documents and asked by three training questions; validated and tested with question
  templates that never appear in training (5 and 16 per attribute: 300 and 1,024 items). Metric: exact
  match; standard errors are computed over facts. Two earlier versions failed the task's gate (full
  fine-tuning at least 30% in 100 steps): 250 facts with invented three-syllable values (at most 0.3%),
  and 128 facts with common-word values and one training question each (11.0% at 1e-3): each fact was seen
  too few times.

Forgetting is measured twice for every task: the loss on held-out general English (help topics of
``pydoc_data.topics`` never used for anything else), and exact match on a control set of short questions
that the base model answers right (chosen once, by the base model's own answers).
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_lisa.recipes.corpus import embedded_corpus

IGNORE = -100
TASKS = ("reverse", "facts", "code")


@dataclass(frozen=True)
class Sizes:
    """Data sizes and batches (``--smoke`` uses tiny ones)."""

    words: int = 5
    reverse_batch: int = 4
    reverse_train: int = 2000
    val: int = 300  # exact-match tasks: validation items (the learning rate is chosen on them)
    curve: int = 100  # validation items evaluated at the end of every period but the last
    test: int = 1000
    people: int = 32  # facts: 2 facts each
    facts_batch: int = 16
    code_len: int = 48
    code_batch: int = 4
    code_chars: int = 400_000
    code_val_rows: int = 32
    code_test_rows: int = 64
    english_rows: int = 32
    english_len: int = 64


SMOKE = Sizes(
    words=3, reverse_train=64, val=12, curve=6, test=16, people=8, facts_batch=4, code_len=16, code_batch=2,
    code_chars=20_000, code_val_rows=4, code_test_rows=4, english_rows=2, english_len=16,
)  # fmt: skip

WORDS = (  # noqa: SIM905 - a word list reads better as text
    "apple river green house music light stone water bread chair cloud dance earth field glass horse island "
    "juice kite lemon money night ocean paper queen road salt table under voice wheel yellow zone animal "
    "basket candle doctor engine forest garden hammer letter market number orange pencil rabbit silver "
    "ticket window winter summer spring autumn bottle button camera carpet castle circle coffee cotton "
    "dinner dragon finger flower friend guitar hotel jacket ladder marble mirror monkey mountain needle "
    "office parrot pepper pillow planet pocket potato rocket school shadow sister spider sugar tiger "
    "tomato tunnel valley wallet yogurt anchor banana bridge butter cheese cherry copper desert eagle "
    "feather gold honey iron jungle kettle lake lion milk moon nest oak piano plate rain rice ring "
    "rose sand ship shoe sky snow soap song star storm sun tea tent tree wind wolf wood blue red black "
    "white brown happy quiet loud small large cold warm fast slow young old early late soft hard "
    "north south east west city town village farm boat train plane car bike bus truck book pen cup bowl "
    "spoon fork knife door wall floor roof clock lamp bed desk"
).split()


@dataclass(frozen=True)
class Item:
    """One exact-match item: the prompt and the expected answer (without the leading space).

    Attributes:
        prompt: What the model reads.
        answer: What it must continue with (after one space).
        group: Items of one group test one thing (a fact); standard errors are taken over groups.
    """

    prompt: str
    answer: str
    group: int = 0


# ------------------------------------------------------------------------------------ datasets


class Examples(Dataset[dict[str, torch.Tensor]]):
    """Tokenized items; labels on the answer and the end-of-sequence token only (``answers_only``) or on all."""

    def __init__(self, items: list[Item], tokenizer: PreTrainedTokenizerBase, answers_only: bool = True) -> None:
        self.rows: list[tuple[list[int], list[int], list[int]]] = []
        eos = int(tokenizer.eos_token_id)
        for item in items:
            head = list(tokenizer(item.prompt, add_special_tokens=False)["input_ids"])
            answer = list(tokenizer(" " + item.answer, add_special_tokens=False)["input_ids"])
            labels = [IGNORE] * len(head) if answers_only else list(head)
            exact = [0] * len(head) + [1] * len(answer) + [0]  # the answer's tokens, not the end of sequence
            self.rows.append(([*head, *answer, eos], [*labels, *answer, eos], exact))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, labels, exact = self.rows[index]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "exact": torch.tensor(exact)}


class Rows(Dataset[dict[str, torch.Tensor]]):
    """Packed rows of tokens, trained on every token."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        return {"input_ids": row, "labels": row}


def collate(pad_id: int) -> Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """Right-pad a list of examples into a batch with an attention mask."""

    def pad(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(i["input_ids"]) for i in items)
        ids = torch.full((len(items), length), pad_id)
        labels = torch.full((len(items), length), IGNORE)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        exact = torch.zeros((len(items), length), dtype=torch.bool)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = item["input_ids"], item["labels"], 1
            if "exact" in item:
                exact[row, :n] = item["exact"].bool()
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "exact": exact}

    return pad


def pack(texts: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    """Concatenate the token ids of ``texts`` (each followed by EOS) and cut them into ``seq_len`` rows."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(int(tokenizer.eos_token_id))
    rows = len(ids) // seq_len
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


# ------------------------------------------------------------------------------ evaluation


@dataclass
class Scores:
    """What one evaluation found.

    Attributes:
        loss: Mean loss per target token.
        correct: Per item, whether every answer token was the argmax (exact-match tasks only).
    """

    loss: float
    correct: list[bool] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """Exact match in percent."""
        return 100.0 * sum(self.correct) / max(len(self.correct), 1)


@torch.no_grad()
def evaluate(model: Any, data: Dataset[Any], pad_id: int, device: str, exact: bool, batch: int = 50) -> Scores:
    """Loss per target token over ``data``; with ``exact``, per-item exact match by teacher-forced argmax.

    An item is right when the model's argmax at every position of the answer is the answer's token: what
    greedy decoding would begin with, found in one forward pass (the end-of-sequence token is not required).
    """
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, []
    for items in DataLoader(data, batch_size=batch, collate_fn=collate(pad_id)):
        ids, mask = items["input_ids"].to(device), items["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = items["labels"][:, 1:].to(device)
        flat = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        total += float(flat)
        scored = targets != IGNORE
        count += int(scored.sum())
        if exact:
            answer = items["exact"][:, 1:].to(device)
            hit = (logits.argmax(-1) == targets) | ~answer
            correct.extend(bool(v) for v in hit.all(dim=1).cpu())
    model.train(was_training)
    return Scores(total / max(count, 1), correct)


# ---------------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One task's data: ``train`` is a dataset; ``val`` and ``test`` are evaluated with :func:`evaluate`.

    Attributes:
        name: One of :data:`TASKS`.
        metric: ``"accuracy"`` (exact match, %) or ``"loss"`` (per token).
        train: The training examples.
        batch: Training examples per optimizer step.
        val: Validation data (all of it is scored at the last validation point).
        curve: The validation data scored at the end of every earlier period.
        test: Test data, scored only for a chosen learning rate.
        test_items: The test items of exact-match tasks (for their groups and for reading).
    """

    name: str
    metric: str
    train: Dataset[Any]
    batch: int
    val: Dataset[Any]
    curve: Dataset[Any]
    test: Dataset[Any]
    test_items: list[Item] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Whether the metric is exact match."""
        return self.metric == "accuracy"

    @property
    def higher_is_better(self) -> bool:
        """Accuracy: higher is better; loss: lower."""
        return self.exact

    def value(self, scores: Scores) -> float:
        """The task's metric from an evaluation."""
        return scores.accuracy if self.exact else scores.loss


def reverse_items(sizes: Sizes, seed: int = 1234) -> dict[str, list[Item]]:
    """Disjoint train / validation / test reversal problems, the same for every arm and seed."""
    rng = random.Random(seed)
    words = sorted(set(WORDS))
    seen: set[tuple[str, ...]] = set()
    out: dict[str, list[Item]] = {"test": [], "val": [], "train": []}
    for split, count in (("test", sizes.test), ("val", sizes.val), ("train", sizes.reverse_train)):
        while len(out[split]) < count:
            chosen = tuple(rng.sample(words, sizes.words))
            if chosen in seen:
                continue
            seen.add(chosen)
            index = len(out[split])
            out[split].append(Item(f"Reverse: {' '.join(chosen)}\nReversed:", " ".join(reversed(chosen)), index))
    return out


SYLLABLES = (  # noqa: SIM905
    "bra dor fen gal hix jor kel lum mar nov pel quo ras sil tav ul ven wex yor zan cor del fim gor hal "
    "ist jun kor lin mox nar ob pim rel sor tum vo wyn xa yel zor ba cel dru ek fro gim hu"
).split()
#: Paraphrased training statements, a training question, validation and test question templates.
FACT_TEMPLATES: dict[str, dict[str, list[str]]] = {
    "town": {
        "statements": [
            "{name} was born in the town of {value}.",
            "{value} is the hometown of {name}.",
            "{name} grew up in {value}, where the family still lives.",
        ],
        "train": [
            "Q: Where is {name} from?\nA:",
            "Q: What is {name}'s hometown?\nA:",
            "Q: In what town did {name} grow up?\nA:",
        ],
        "val": [
            "Q: In which town was {name} born?\nA:",
            "Q: What town did {name} grow up in?\nA:",
            "Q: Where was {name} raised?\nA:",
            "Q: Which town does {name} come from?\nA:",
            "Q: What is the birthplace of {name}?\nA:",
        ],
        "test": [
            "Q: What is the hometown of {name}?\nA:",
            "Q: Which town is {name} from?\nA:",
            "Q: Name the town where {name} was born.\nA:",
            "Q: {name} comes from which town?\nA:",
            "Q: Where did {name} spend their childhood?\nA:",
            "Q: What is the name of the town {name} grew up in?\nA:",
            "Q: Which town was {name} born in?\nA:",
            "Q: Tell me the hometown of {name}.\nA:",
            "Q: Where was {name} born?\nA:",
            "Q: {name} grew up in which town?\nA:",
            "Q: What town is {name} originally from?\nA:",
            "Q: In which town did {name} spend their early years?\nA:",
            "Q: What town does {name}'s family live in?\nA:",
            "Q: Which town is the birthplace of {name}?\nA:",
            "Q: From which town does {name} come?\nA:",
            "Q: What town was {name} raised in?\nA:",
        ],
    },
    "company": {
        "statements": [
            "{name} works for {value}.",
            "{value} is the company where {name} has worked for years.",
            "Every morning {name} goes to the office of {value}.",
        ],
        "train": [
            "Q: Who does {name} work for?\nA:",
            "Q: What company does {name} work at?\nA:",
            "Q: Who is {name}'s employer?\nA:",
        ],
        "val": [
            "Q: Which company employs {name}?\nA:",
            "Q: What is the name of {name}'s employer?\nA:",
            "Q: For which company does {name} work?\nA:",
            "Q: Where is {name} employed?\nA:",
            "Q: What firm does {name} work for?\nA:",
        ],
        "test": [
            "Q: Where does {name} work?\nA:",
            "Q: Which company does {name} work for?\nA:",
            "Q: {name} is employed by which company?\nA:",
            "Q: What company is {name}'s employer?\nA:",
            "Q: At which company does {name} have a job?\nA:",
            "Q: Who employs {name}?\nA:",
            "Q: Name the company {name} works for.\nA:",
            "Q: What is the company where {name} works?\nA:",
            "Q: Which firm employs {name}?\nA:",
            "Q: {name} works at which company?\nA:",
            "Q: What is {name}'s company?\nA:",
            "Q: Whose office does {name} go to every morning?\nA:",
            "Q: Which employer does {name} work for?\nA:",
            "Q: For whom does {name} work?\nA:",
            "Q: Tell me the company that employs {name}.\nA:",
            "Q: At what company is {name} employed?\nA:",
        ],
    },
}  # fmt: skip


def invented(rng: random.Random, parts: int, taken: set[str]) -> str:
    """A capitalised word of ``parts`` syllables that is not in ``taken`` (and is then added to it)."""
    while True:
        word = "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()
        if word not in taken:
            taken.add(word)
            return word


def fact_items(sizes: Sizes, seed: int = 4321) -> dict[str, list[Item]]:
    """Training documents (as items: prompt + answer, trained on every token) and question items.

    Every fact (a person and one attribute) is one group; its items in every split share the group. The
    values are capitalised words of :data:`WORDS`, each used by one fact only, so a guess is right for at
    most one person.
    """
    rng = random.Random(seed)
    taken: set[str] = set()
    values = [w.capitalize() for w in sorted(set(WORDS))]
    rng.shuffle(values)
    if 2 * sizes.people > len(values):
        raise ValueError(f"facts: {sizes.people} people need {2 * sizes.people} values, the list has {len(values)}")
    out: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    group = 0
    for _ in range(sizes.people):
        name = f"{invented(rng, 2, taken)} {invented(rng, 3, taken)}"
        for templates in FACT_TEMPLATES.values():
            value = values[group]
            for statement in templates["statements"]:
                prompt, _, rest = statement.partition("{value}")  # the value and what follows are the "answer"
                out["train"].append(Item(prompt.format(name=name).rstrip(), (value + rest).format(name=name), group))
            for split in ("train", "val", "test"):
                for question in templates[split]:
                    out[split].append(Item(question.format(name=name), value, group))
            group += 1
    rng.shuffle(out["train"])
    rng.shuffle(out["val"])
    out["val"] = out["val"][: sizes.val]
    return out


def code_rows(tokenizer: PreTrainedTokenizerBase, sizes: Sizes) -> dict[str, torch.Tensor]:
    """Train / validation / test rows of standard-library source, split by file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"), key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    budget = {"train": sizes.code_chars, "val": sizes.code_chars // 20, "test": sizes.code_chars // 10}
    for index, path in enumerate(files):
        split = "val" if index % 10 == 1 else "test" if index % 10 == 2 else "train"
        if budget[split] <= 0:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")[: budget[split]]
        budget[split] -= len(text)
        parts[split].append(text)
    rows = {split: pack(texts, tokenizer, sizes.code_len) for split, texts in parts.items()}
    rows["val"] = rows["val"][: sizes.code_val_rows]
    rows["test"] = rows["test"][: sizes.code_test_rows]
    return rows


def build_task(name: str, tokenizer: PreTrainedTokenizerBase, sizes: Sizes) -> Task:
    """The data of task ``name``."""
    if name == "reverse":
        items = reverse_items(sizes)
        val = Examples(items["val"], tokenizer)
        return Task(
            name, "accuracy", Examples(items["train"], tokenizer), sizes.reverse_batch, val,
            Examples(items["val"][: sizes.curve], tokenizer), Examples(items["test"], tokenizer), items["test"],
        )  # fmt: skip
    if name == "facts":
        items = fact_items(sizes)
        return Task(
            name, "accuracy", Examples(items["train"], tokenizer, answers_only=False), sizes.facts_batch,
            Examples(items["val"], tokenizer), Examples(items["val"][: sizes.curve], tokenizer),
            Examples(items["test"], tokenizer), items["test"],
        )  # fmt: skip
    if name == "code":
        rows = code_rows(tokenizer, sizes)
        val = Rows(rows["val"])
        return Task(name, "loss", Rows(rows["train"]), sizes.code_batch, val, val, Rows(rows["test"]))
    raise ValueError(f"task {name!r} is not one of {TASKS}")


# ------------------------------------------------------------------------------ forgetting


def english(tokenizer: PreTrainedTokenizerBase, sizes: Sizes) -> Rows:
    """Held-out general English: every 10th help topic of ``pydoc_data.topics`` (trained on by no task)."""
    texts = [e.text for i, e in enumerate(embedded_corpus()) if i % 10 == 3]
    return Rows(pack(texts, tokenizer, sizes.english_len)[: sizes.english_rows])


COUNTRIES = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "England": "London", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Hungary": "Budapest",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Peru": "Lima",
    "Kenya": "Nairobi", "Thailand": "Bangkok", "South Korea": "Seoul", "India": "New Delhi",
    "Turkey": "Ankara", "Belgium": "Brussels", "the Netherlands": "Amsterdam", "Cuba": "Havana",
    "Australia": "Canberra", "Chile": "Santiago", "Colombia": "Bogota", "Iran": "Tehran", "Iraq": "Baghdad",
    "Switzerland": "Bern", "the Czech Republic": "Prague", "Romania": "Bucharest", "Vietnam": "Hanoi",
    "Indonesia": "Jakarta", "the Philippines": "Manila", "Saudi Arabia": "Riyadh", "Venezuela": "Caracas",
    "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Pakistan": "Islamabad", "Bangladesh": "Dhaka",
    "Malaysia": "Kuala Lumpur", "Scotland": "Edinburgh", "Wales": "Cardiff", "Iceland": "Reykjavik",
    "Croatia": "Zagreb", "Serbia": "Belgrade", "Bulgaria": "Sofia", "New Zealand": "Wellington",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "left": "right", "day": "night", "black": "white",
    "fast": "slow", "open": "closed", "happy": "sad", "old": "new", "yes": "no", "in": "out", "wet": "dry",
    "early": "late", "light": "dark", "high": "low", "hard": "soft", "full": "empty", "true": "false",
    "rich": "poor", "strong": "weak", "win": "lose", "push": "pull", "first": "last", "before": "after",
}  # fmt: skip


def control_candidates() -> list[Item]:
    """Short completions with one-word answers; :func:`control_items` keeps those the base model gets right.

    Plain completions (not the chat format): the base model answers a capital as the continuation of
    "Answer: The capital of X is" far more often than after "A:".
    """
    items = [Item(f"Question: What is the capital of {c}?\nAnswer: The capital of {c} is", city)
             for c, city in COUNTRIES.items()]  # fmt: skip
    items += [Item(f"The opposite of {w} is", o) for w, o in OPPOSITES.items()]
    return [Item(i.prompt, i.answer, n) for n, i in enumerate(items)]


def control_items(model: Any, tokenizer: PreTrainedTokenizerBase, pad_id: int, device: str) -> list[Item]:
    """The control set: the candidates the base model answers right (exact match 100% before fine-tuning)."""
    candidates = control_candidates()
    scores = evaluate(model, Examples(candidates, tokenizer), pad_id, device, exact=True)
    return [item for item, right in zip(candidates, scores.correct, strict=True) if right]
