"""Write-to-temp-then-rename, so nothing half-written is ever left at a path."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from napari_fewlabel.errors import FewLabelError


def _suffix(path: Path) -> str:
    # Keep the full suffix (".nii.gz") so writers that pick compression by name still do.
    name = path.name
    for double in (".nii.gz", ".tar.gz"):
        if name.lower().endswith(double):
            return name[-len(double) :]
    return path.suffix


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; a saved mask or model should get
# the permissions any other new file gets (0666 less the umask), like the old file had.
_FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary file lives in the destination folder so the final
    ``os.replace`` is atomic on the same file system. On any error it is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FewLabelError(
            f"The folder {folder} does not exist: create it or choose another place to save."
        )
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_suffix(path), dir=folder)
    except OSError as exc:
        raise FewLabelError(
            f"Cannot write to {folder} ({exc.strerror}): choose a folder you can write to."
        ) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        raise FewLabelError(
            f"Could not write {path} ({exc.strerror or exc}): check free disk space and "
            "permissions, or choose another place."
        ) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
