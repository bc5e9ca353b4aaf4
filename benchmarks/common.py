"""What the benchmark scripts share: the package versions they print with their results."""

from __future__ import annotations

import importlib.metadata as md
import platform


def versions(*packages: str) -> dict[str, str]:
    """Python's version, each package's installed version, and lightning-lisa's (installed or from this tree)."""
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            found[package] = "not installed"
    import lightning_lisa

    try:
        found["lightning-lisa"] = md.version("lightning-lisa")
    except md.PackageNotFoundError:
        found["lightning-lisa"] = f"{lightning_lisa.__version__} (source tree)"
    return found
