"""Check a checkpoint before it is resumed from: a truncated, corrupted or incomplete one is named.

torch reads a truncated checkpoint file with an error that names no file (``OSError: [Errno 22]
Invalid argument``, ``PytorchStreamReader failed reading zip archive``), and a file with a damaged
byte in a tensor loads without any error at all: torch's zip reader does not verify the CRC-32
checksums the file holds. :func:`check_checkpoint` verifies them (it reads the whole file once), and
checks that a distributed checkpoint (a folder) holds the metadata that is written last, when every
shard is complete. LISA calls it when fit starts, before Lightning loads anything or any checkpoint
is written, so a bad checkpoint stops the run with :class:`~lightning_lisa.errors.LISAConfigError`
and leaves every file as it was.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from lightning_lisa.errors import LISAConfigError

#: Files a distributed checkpoint folder of Lightning's ``ModelParallelStrategy`` / ``FSDPStrategy`` holds
#: once complete: ``torch.distributed.checkpoint``'s metadata, written after every shard, and Lightning's
#: own (the loops' and callbacks' state), written after that.
FOLDER_FILES = (".metadata", "meta.pt")

#: The first bytes of a zip archive (torch's checkpoint format since 1.6) and of a pickle (the older one).
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"


def checkpoint_problem(path: str | Path) -> str | None:
    """What is wrong with the checkpoint at ``path``, or ``None`` when it is complete and its checksums hold.

    Examples:
        >>> import tempfile, torch
        >>> folder = Path(tempfile.mkdtemp())
        >>> torch.save({"w": torch.ones(3)}, folder / "good.ckpt")
        >>> checkpoint_problem(folder / "good.ckpt") is None
        True
        >>> _ = (folder / "cut.ckpt").write_bytes((folder / "good.ckpt").read_bytes()[:300])
        >>> checkpoint_problem(folder / "cut.ckpt")
        'the file is truncated (its zip directory is missing)'
    """
    path = Path(path)
    if path.is_dir():
        missing = [name for name in FOLDER_FILES if not (path / name).is_file()]
        if missing:
            return f"the folder lacks {missing}, which are written last: its write did not finish"
        return None
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    if head.startswith(PICKLE_MAGIC) and not head.startswith(ZIP_MAGIC):
        return None  # torch's legacy format has no checksums to verify
    if head != ZIP_MAGIC:
        return f"the file does not start like a torch checkpoint (first bytes {head!r})"
    if not zipfile.is_zipfile(path):
        return "the file is truncated (its zip directory is missing)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"the file cannot be read as a zip archive ({error})"
    if bad is not None:
        return f"the record {bad!r} fails its CRC-32 checksum: the file is corrupted"
    return None


def check_checkpoint(path: str | Path | None, argument: str = "ckpt_path") -> None:
    """Raise :class:`~lightning_lisa.errors.LISAConfigError` naming ``path`` if it is not a sound checkpoint.

    Nothing is checked for ``None``, for remote paths (``s3://...``) and for paths that do not exist
    (Lightning reports those itself).

    Args:
        path: The checkpoint about to be resumed from: a file, or a distributed checkpoint's folder.
        argument: The argument that named it, for the message.
    """
    if path is None or "://" in str(path):
        return
    path = Path(path)
    if not path.exists():
        return
    problem = checkpoint_problem(path)
    if problem is None:
        return
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path)
    hint = f" Other checkpoints in {str(path.parent)!r}: {others[-8:]}." if others else ""
    raise LISAConfigError(
        f"`{argument}={str(path)!r}` cannot be resumed from: {problem}. Nothing was loaded and no file was "
        f"changed. Resume from an earlier checkpoint.{hint}"
    )
