"""The ``lightning-lisa`` command: Lightning's CLI for :class:`~lightning_lisa.recipes.module.CausalLMModule`.

``lightning-lisa fit|validate|test|predict`` takes ``--config`` files and ``--key=value`` overrides for
the Trainer (``trainer.*``), the model (``model.*``), the data (``data.*``) and, optionally, LISA:

* ``--lisa.n_layers=2 --lisa.interval=20 ...`` (or a ``lisa:`` mapping in a config file) adds one
  :class:`~lightning_lisa.LISA` callback; leave ``lisa`` out for full fine-tuning;
* or, as for any callback, ``trainer.callbacks`` with ``class_path: lightning_lisa.LISA`` and
  ``init_args``. Configuring LISA in both places is refused.

Every init argument is type-checked by jsonargparse. After ``fit`` a summary is printed (validation
loss, blocks per period, optimizer-state bytes against full fine-tuning, output paths); see the
``summary.*`` options.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lightning_lisa.callback import LISA
from lightning_lisa.errors import LISAConfigError
from lightning_lisa.recipes.data import TextDataModule, format_data_summary
from lightning_lisa.recipes.module import CausalLMModule
from lightning_lisa.recipes.summary import (
    FitReport,
    OptimizerStateTracker,
    SummaryOptions,
    estimate_full_finetuning_state,
    format_summary,
    measure_full_finetuning_state,
    output_paths,
    validation_loss,
)


class LisaCLI(LightningCLI):
    """``LightningCLI`` with :class:`CausalLMModule`, :class:`TextDataModule`, a ``--lisa.*`` group and a summary.

    Args:
        args: Arguments to parse instead of ``sys.argv[1:]`` (e.g. ``["fit", "--config", "run.yaml"]``).
        run: Run the subcommand; ``False`` only builds the model, data and Trainer (no subcommand).
        kwargs: Further arguments of :class:`~lightning.pytorch.cli.LightningCLI`.

    Attributes:
        report: The numbers of the last summary, after ``fit``.

    Examples:
        >>> cli = LisaCLI(args=["--model.config", '{"model_type": "llama", "vocab_size": 512, "hidden_size": 16, '
        ...     '"intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}',
        ...     "--lisa.n_layers=1", "--trainer.logger=false"], run=False)
        >>> [type(c).__name__ for c in cli.trainer.callbacks if isinstance(c, LISA)]
        ['LISA']
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        self.report: FitReport | None = None
        self._answers_before: list[str] = []
        self._tracker: OptimizerStateTracker | None = None
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault(
            "parser_kwargs", {"prog": "lightning-lisa", "description": "Fine-tune a causal language model with LISA."}
        )
        super().__init__(CausalLMModule, TextDataModule, args=args, run=run, auto_configure_optimizers=False, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the optional ``--lisa.*`` callback and the ``--summary.*`` options."""
        parser.add_argument(
            "--lisa",
            type=LISA | None,
            default=None,
            help="Train with LISA: give any of its arguments (e.g. --lisa.n_layers=2) or a `lisa:` mapping in a "
            "config file; --lisa.help LISA lists them. Leave it out for full fine-tuning.",
        )
        parser.add_argument("--summary", type=SummaryOptions, default=SummaryOptions(), help="The report after fit.")
        parser.add_argument(
            "--prompts",
            type=list[str] | None,
            default=None,
            help="Prompts the model answers (greedy) before and after fit, printed with the summary; rendered "
            "with the tokenizer's chat template when it has one.",
        )
        parser.add_argument(
            "--controls",
            type=dict[str, str] | None,
            default=None,
            help="Control questions and the answer each needs (a mapping prompt: answer): answered before and "
            "after fit like --prompts; the summary says which answers the model knew before and lost.",
        )
        parser.add_argument("--max_new_tokens", type=int, default=40, help="Tokens generated per prompt.")

    def before_instantiate_classes(self) -> None:
        """Refuse a second LISA before anything (such as a large model) is built; default the tokenizer.

        A pretrained model (``model.model_name_or_path``) without ``data.tokenizer`` gets its own
        tokenizer (the same directory, Hub name or GGUF file): the default BPE would not match its
        embeddings.
        """
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        model_path = config.get("model.model_name_or_path")
        if model_path is not None and "data.tokenizer" in config and config.get("data.tokenizer") is None:
            config["data.tokenizer"] = model_path
        in_callbacks = [c for c in _as_list(config.get("trainer.callbacks")) if _is_lisa_config(c)]
        in_group = config.get("lisa") is not None
        if len(in_callbacks) + int(in_group) > 1:
            where = (["--lisa (a `lisa:` mapping)"] if in_group else []) + [
                f"trainer.callbacks (class_path {c.get('class_path')!r})" for c in in_callbacks
            ]
            self._parser(self.subcommand).error(
                f"LISA is configured more than once: {'; '.join(where)}. A Trainer takes one LISA callback: keep "
                "either the `lisa:` group or the `trainer.callbacks` entry."
            )

    def instantiate_classes(self) -> None:
        """Build the classes; a value the library refuses (e.g. ``--lisa.n_layers=0``) is a usage error, exit 2."""
        try:
            super().instantiate_classes()
        except (ValueError, LISAConfigError) as error:
            refused = _config_error(error)
            if refused is None:
                raise
            self._parser(self.subcommand).error(str(refused))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Build the Trainer with the ``--lisa`` callback (if given) and, for fit, the state tracker."""
        extra: list[Callback] = []
        lisa = self._get(self.config_init, "lisa")
        if lisa is not None:
            extra.append(lisa)
        if self.subcommand == "fit" and self._options().enabled:
            self._tracker = OptimizerStateTracker()
            extra.append(self._tracker)
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        return self._instantiate_trainer(trainer_config, callbacks + extra)

    # --------------------------------------------------------------------------------- fit

    def before_fit(self) -> None:
        """Validate the untrained model if ``summary.validate_before``."""
        options = self._options()
        self.report = FitReport()
        if options.enabled and options.validate_before:
            ckpt_path = self._get(self.config_init, "ckpt_path")
            results = self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False)
            self.report.val_loss_before = validation_loss(results)
        self._answers_before = self._answer() if self.trainer.is_global_zero else []

    def after_fit(self) -> None:
        """Validate the trained model, then print the summary (on global rank zero)."""
        options = self._options()
        if not options.enabled or self.report is None or self.trainer.interrupted:
            return
        report = self.report
        results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        report.val_loss_after = validation_loss(results)
        if not self.trainer.is_global_zero:
            return
        report.peak_state_bytes = self._tracker.peak if self._tracker is not None else 0
        if options.measure_full_finetuning:
            batch = next(iter(self.datamodule.train_dataloader()))
            report.full_state_bytes = measure_full_finetuning_state(self.model.model, self.model.make_optimizer, batch)
            report.full_state_measured = True
        else:
            report.full_state_bytes = estimate_full_finetuning_state(self.model.model, self.model.hparams["optimizer"])
        report.paths = output_paths(self.trainer, self.model)
        lisa = next((c for c in self.trainer.callbacks if isinstance(c, LISA)), None)  # type: ignore[attr-defined]
        print(format_summary(report, self.model, lisa, self.trainer.global_step), flush=True)
        data = self.datamodule
        if isinstance(data, TextDataModule) and data.summary:
            print(format_data_summary(data.summary, data.packing, data.max_length), flush=True)
        prompts = list(self._get(self.config_init, "prompts") or [])
        controls = dict(self._get(self.config_init, "controls") or {})
        if prompts or controls:
            after = self._answer()
            if prompts:
                print(format_answers(prompts, self._answers_before, after), flush=True)
            if controls:
                n = len(prompts)
                print(format_controls(controls, self._answers_before[n:], after[n:]), flush=True)

    def _answer(self) -> list[str]:
        """The model's greedy answers to ``--prompts``, then ``--controls`` (nothing without a tokenizer)."""
        prompts = list(self._get(self.config_init, "prompts") or [])
        prompts += list(self._get(self.config_init, "controls") or {})
        datamodule = self.datamodule
        if not prompts or datamodule is None:
            return []
        if getattr(datamodule, "tokenizer", None) is None:
            datamodule.setup("fit")
        tokenizer = datamodule.tokenizer
        if tokenizer is None:
            return []
        max_new_tokens = int(self._get(self.config_init, "max_new_tokens", default=40))
        return generate_answers(self.model.model, tokenizer, list(prompts), max_new_tokens)

    def _options(self) -> SummaryOptions:
        options = self._get(self.config_init, "summary")
        if isinstance(options, SummaryOptions):
            return options
        if isinstance(options, Namespace):
            return SummaryOptions(**options.as_dict())
        return SummaryOptions(**(options or {}))


def generate_answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 40) -> list[str]:
    """Greedy answers of ``model`` to ``prompts`` (as user turns of the chat template, if the tokenizer has one).

    Examples:
        >>> from lightning_lisa.recipes.gguf import SMOLLM2, load_gguf_model, load_gguf_tokenizer
        >>> generate_answers(load_gguf_model(SMOLLM2), load_gguf_tokenizer(SMOLLM2),
        ...                  ["What is the capital of France?"], 12)  # doctest: +SKIP
        ['The capital of France is Paris.']
    """
    import torch

    was_training = model.training
    model.eval()
    answers = []
    with torch.no_grad():
        for prompt in prompts:
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                )
            else:
                text = prompt
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def format_answers(prompts: list[str], before: list[str], after: list[str]) -> str:
    """The prompts with the answers before and after fine-tuning, one block each.

    Examples:
        >>> print(format_answers(["2+2?"], ["5"], ["4"]))
        Prompts, answered greedily before and after fine-tuning:
          > 2+2?
            before: 5
            after:  4
    """
    lines = ["Prompts, answered greedily before and after fine-tuning:"]
    for index, prompt in enumerate(prompts):
        lines.append(f"  > {prompt}")
        lines.append(f"    before: {one_line(before[index]) if index < len(before) else '(not generated)'}")
        lines.append(f"    after:  {one_line(after[index]) if index < len(after) else '(not generated)'}")
    return "\n".join(lines)


def one_line(text: str) -> str:
    r"""An answer on one line: its non-empty lines joined by `` ⏎ ``.

    Examples:
        >>> one_line("Paris.\n\nParis is the capital.")
        'Paris. ⏎ Paris is the capital.'
    """
    return " ⏎ ".join(line.strip() for line in text.splitlines() if line.strip())


def format_controls(controls: dict[str, str], before: list[str], after: list[str]) -> str:
    """Control questions answered before and after fine-tuning, and which known answers were lost.

    An answer counts as right when it contains the expected one (case ignored).

    Examples:
        >>> print(format_controls({"Capital of France?": "Paris"}, ["It is Paris."], ["Berlin"]))
        Control questions (what the model knew before), answered before and after fine-tuning:
          > Capital of France? (needs: Paris)
            before: It is Paris. [right]
            after:  Berlin [wrong]
        FORGOTTEN: 1 of the 1 control answers the model knew before fine-tuning.
        >>> print(format_controls({"Opposite of hot?": "cold"}, ["Cold."], []).splitlines()[-2:])
        ['    after:  (not generated)', 'FORGOTTEN: 1 of the 1 control answers the model knew before fine-tuning.']
        >>> format_controls({"Opposite of hot?": "cold"}, ["cold"], ["COLD"]).splitlines()[-1]
        'Kept: all 1 control answers the model knew before fine-tuning.'
        >>> format_controls({"Opposite of hot?": "cold"}, ["warm"], ["warm"]).splitlines()[-1]
        'No control answer was right before fine-tuning, so none can show forgetting.'
    """
    lines = ["Control questions (what the model knew before), answered before and after fine-tuning:"]
    known = lost = 0
    for index, (prompt, expected) in enumerate(controls.items()):
        lines.append(f"  > {prompt} (needs: {expected})")
        verdicts = []
        for label, answers in (("before:", before), ("after: ", after)):
            answer = answers[index] if index < len(answers) else None
            verdicts.append(answer is not None and expected.casefold() in answer.casefold())
            shown = (
                "(not generated)" if answer is None else f"{one_line(answer)} [{'right' if verdicts[-1] else 'wrong'}]"
            )
            lines.append(f"    {label} {shown}")
        known += verdicts[0]
        lost += verdicts[0] and not verdicts[1]
    if not known:
        lines.append("No control answer was right before fine-tuning, so none can show forgetting.")
    elif lost:
        lines.append(f"FORGOTTEN: {lost} of the {known} control answers the model knew before fine-tuning.")
    else:
        lines.append(f"Kept: all {known} control answers the model knew before fine-tuning.")
    return "\n".join(lines)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _is_lisa_config(callback: Any) -> bool:
    """Whether a ``trainer.callbacks`` entry (``class_path`` + ``init_args``, or an instance) is a LISA."""
    if isinstance(callback, LISA):
        return True
    class_path = callback.get("class_path") if isinstance(callback, Namespace | dict) else None
    if not isinstance(class_path, str) or "." not in class_path:
        return False
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, LISA)


def _config_error(error: BaseException) -> LISAConfigError | None:
    """The :class:`LISAConfigError` that ``error`` is, or wraps (jsonargparse wraps what a class raises)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, LISAConfigError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def cli_main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-lisa`` command (and ``python -m lightning_lisa``).

    ``lightning-lisa estimate MODEL ...`` prints the expected training memory of full fine-tuning,
    LoRA and LISA (see :func:`lightning_lisa.estimate.main`); every other subcommand is Lightning's.

    Args:
        args: Command-line arguments; ``None`` reads ``sys.argv[1:]``.
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["estimate"]:
        from lightning_lisa.estimate import main as estimate_main

        raise SystemExit(estimate_main([str(a) for a in argv[1:]]))
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    LisaCLI(args=args)
