"""The one exception type of lightning-lisa, and the checks of arguments that raise it.

Every misconfiguration LISA finds (a bad argument, a model or strategy it cannot train) raises
:class:`LISAConfigError` before the first optimizer step. It subclasses Lightning's
``MisconfigurationException``, so code that catches that keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning.fabric.utilities.exceptions import MisconfigurationException


class LISAConfigError(MisconfigurationException):
    """A setting LISA cannot run with; the message names the argument, what was given and what is allowed.

    Examples:
        >>> from lightning_lisa import LISA
        >>> try:
        ...     LISA(n_layers=0)
        ... except LISAConfigError as err:
        ...     print(err)
        `n_layers=0` is not allowed; `n_layers` must be an integer >= 1.
    """


def check_int(name: str, value: object, minimum: int | None = None) -> None:
    """Raise unless ``value`` is an ``int`` (not a ``bool``) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        allowed = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise LISAConfigError(f"`{name}={value!r}` is not allowed; `{name}` must be {allowed}.")


def check_positive(name: str, value: object) -> None:
    """Raise unless ``value`` is a finite number (not a ``bool``) greater than 0."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < math.inf:
        raise LISAConfigError(f"`{name}={value!r}` is not allowed; it must be a number > 0.")


def check_bool(name: str, value: object) -> None:
    """Raise unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise LISAConfigError(f"`{name}={value!r}` is not allowed; it must be True or False.")


def check_choice(name: str, value: object, allowed: Sequence[object]) -> None:
    """Raise unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise LISAConfigError(f"`{name}={value!r}` is not one of {list(allowed)}.")


def check_names(name: str, value: object, allow_str: bool) -> None:
    """Raise unless ``value`` is ``None``, a list of dotted names, or (with ``allow_str``) one dotted name."""
    if value is None or (allow_str and isinstance(value, str)):
        return
    if isinstance(value, str):
        raise LISAConfigError(f"`{name}={value!r}` must be a list of names, e.g. `{name}=[{value!r}]`, or None.")
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        allowed = "a dotted path, a list of dotted paths" if allow_str else "a list of dotted names"
        raise LISAConfigError(f"`{name}={value!r}` is not allowed; `{name}` must be {allowed} or None.")
