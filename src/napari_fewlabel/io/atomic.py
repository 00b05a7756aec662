"""Write-to-temp-then-rename, so nothing half-written is ever left at a path.

Also the checks every command makes on its output paths before any work
(:func:`check_output_file`, :func:`check_output_folder`), so that a wrong
extension or a missing folder is reported in a second, not after an hour of
training.

Temporary files are named ``.<name>.fewlabel-tmp-XXXXXXXX<suffix>`` next to
their destination. A process killed mid-write (SIGKILL, power cut) leaves one
behind; the next atomic write into that folder removes ours that are older
than :data:`STALE_AFTER_S` (a write in progress keeps touching its file).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from napari_fewlabel.errors import FewLabelError

#: Marks the temporary files of our atomic writes (and only ours).
TEMP_MARK = ".fewlabel-tmp-"
#: A temporary file of ours untouched for this long belongs to a write that died.
STALE_AFTER_S = 60.0
# mkstemp's random part is 8 characters of [a-z0-9_].
_TEMP_NAME = re.compile(r"^\..+" + re.escape(TEMP_MARK) + r"[a-z0-9_]{8}(\..*)?$")


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


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _free_space(folder: Path, free_bytes: int | None = None) -> str:
    """``"12.3 MB free"``: of ``folder``, or ``free_bytes`` when the caller has it already."""
    try:
        free = float(shutil.disk_usage(folder).free if free_bytes is None else free_bytes)
    except OSError:
        return "free space unknown"
    for unit in ("bytes", "KB", "MB", "GB"):
        if free < 1000 or unit == "GB":
            return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
        free /= 1000
    return ""  # unreachable


def write_failed(path: Path, reason: object) -> FewLabelError:
    """The error for a write to ``path`` that failed for ``reason`` (disk full, no permission)."""
    path = Path(path)
    if isinstance(reason, OSError):
        reason = reason.strerror or reason
    return FewLabelError(
        f"Cannot write {path} ({reason}; {_free_space(_folder(path))}): free some space or "
        "choose another folder you can write to."
    )


def is_our_temp_file(path: Path) -> bool:
    """Whether ``path`` is named like one of :func:`atomic_path`'s temporary files."""
    return bool(_TEMP_NAME.match(path.name))


def remove_stale_temp_files(folder: Path, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove our temporary files in ``folder`` untouched for ``older_than_s``; return them.

    Only names made by :func:`atomic_path` are considered; anything that cannot
    be removed is left as it is.
    """
    removed: list[Path] = []
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if not entry.name.startswith(".") or TEMP_MARK not in entry.name:
                continue
            path = Path(entry.path)
            with contextlib.suppress(OSError):
                if (
                    is_our_temp_file(path)
                    and entry.is_file(follow_symlinks=False)
                    and now - entry.stat(follow_symlinks=False).st_mtime > older_than_s
                ):
                    path.unlink()
                    removed.append(path)
    return removed


def _make_temp(path: Path, folder: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", suffix=_suffix(path), dir=folder)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary file lives in the destination folder so the final
    ``os.replace`` is atomic on the same file system. On any error it is
    removed and ``path`` is left as it was. Stale temporary files of earlier,
    killed writes in that folder are removed first.
    """
    path = Path(path)
    folder = _folder(path)
    if not folder.is_dir():
        raise FewLabelError(
            f"The folder {folder} does not exist: create it or choose another place to save."
        )
    remove_stale_temp_files(folder)
    try:
        tmp = _make_temp(path, folder)
    except OSError as exc:
        raise FewLabelError(
            f"Cannot write to {folder} ({exc.strerror}): choose a folder you can write to."
        ) from exc
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_failed(path, exc) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# --------------------------------------------------------------- output checks
def _check_folder_writable(folder: Path, option: str) -> None:
    if not folder.exists():
        raise FewLabelError(
            f"Folder {folder} does not exist: create it or choose another {option}."
        )
    if not folder.is_dir():
        raise FewLabelError(f"{folder} is a file, not a folder: choose another {option}.")
    # Really create a file: permissions, read-only mounts and root's privileges all count.
    try:
        probe = _make_temp(Path("write-check"), folder)
    except OSError as exc:
        raise FewLabelError(
            f"Cannot write to folder {folder} ({exc.strerror or exc}): choose a folder you can "
            f"write to for {option}."
        ) from exc
    probe.unlink()


def check_output_file(
    path: str | os.PathLike[str],
    suffixes: Sequence[str],
    *,
    option: str = "--out",
    need_bytes: int = 0,
) -> Path:
    """Refuse an output file before any work is done; return it as a Path.

    Parameters
    ----------
    path : path-like
        Where a command will write.
    suffixes : sequence of str
        Accepted endings, e.g. ``(".nii.gz", ".nii")``; the first is suggested.
    option : str
        The command-line option that named it, for the message.
    need_bytes : int
        Refuse when the folder has less free space than this, so that a job
        whose output is written at the end (a trained model) fails in a second
        rather than after the whole run.

    Raises
    ------
    FewLabelError
        Wrong ending, an existing folder at ``path``, a folder that is
        missing or cannot be written, or less than ``need_bytes`` free.
    """
    out = Path(path).expanduser()
    if out.is_dir():
        raise FewLabelError(
            f"{option} {out} is a folder: give a file name in it, e.g. "
            f"{out / ('result' + suffixes[0])}."
        )
    if not out.name.lower().endswith(tuple(s.lower() for s in suffixes)):
        raise FewLabelError(
            f"{option} must end in {_either(suffixes)}, got {out.name!r}: e.g. "
            f"{option} {out.name.split('.')[0] or 'result'}{suffixes[0]}."
        )
    _check_folder_writable(_folder(out), option)
    if need_bytes > 0:
        try:
            free = shutil.disk_usage(_folder(out)).free
        except OSError:
            free = need_bytes  # unknown: let the write itself report
        if free < need_bytes:
            raise FewLabelError(
                f"Not enough space for {out} ({_free_space(_folder(out), free)}; it needs about "
                f"{need_bytes / 1e6:.0f} MB): free some space or choose another {option}."
            )
    return out


def check_output_folder(path: str | os.PathLike[str], *, option: str = "--out") -> Path:
    """Refuse an output folder before any work: it must be a folder, or creatable in one."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise FewLabelError(f"{out} is a file: give {option} a folder for the results.")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    _check_folder_writable(existing if existing.exists() else Path("."), option)
    return out


def _either(words: Sequence[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return " or ".join(words) if len(words) < 3 else f"{', '.join(words[:-1])} or {words[-1]}"
