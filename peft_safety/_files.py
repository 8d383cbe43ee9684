"""Writing files safely: checks before any work, and atomic replacement so that no half-written file remains."""

from __future__ import annotations

import glob
import os
import tempfile
from typing import Any

TEMP_SUFFIX = ".peft_safety-tmp"  # temporary files of saves in progress end with this


def check_output_file(path: str | os.PathLike, what: str = "output file") -> str:
    """Raise ``OSError`` (a ``FileNotFoundError``, ``IsADirectoryError`` or ``PermissionError``) unless ``path``
    can be written: its folder exists and is writable and ``path`` is not a folder. Returns ``path`` as ``str``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"The {what} '{path}' is a folder; give a file name.")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"The folder of the {what} '{path}' does not exist; create '{folder}' first.")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise PermissionError(f"The {what} '{path}' cannot be written (no write permission); choose another path.")
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> str:
    """Raise ``OSError`` unless ``path`` is a writable folder or can be created (its nearest existing parent is a
    writable folder). Returns ``path`` as ``str``."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"The {what} '{path}' is a file; give a folder.")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"The {what} '{path}' cannot be created: '{existing}' is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"The {what} '{path}' cannot be written (no write permission in '{existing}').")
    return path


def _temporary(path: str) -> str:
    """A new empty temporary file ``.{name}.{pid}.XXXX.peft_safety-tmp`` next to ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=folder)
    os.close(handle)
    return temporary


def _publish(temporary: str, path: str) -> None:
    """Rename the finished ``temporary`` over ``path`` (atomic), with the permissions a plain ``open(path, "w")``
    would give (``mkstemp`` makes files owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    os.replace(temporary, path)


def _discard(temporary: str) -> None:
    try:
        os.remove(temporary)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Remove temporary files left next to ``path`` by saves of ``path`` whose process no longer runs (killed)."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*{TEMP_SUFFIX}")):
        pid = os.path.basename(stale)[len(name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            try:
                os.remove(stale)
            except OSError:
                pass


def atomic_save_file(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None) -> None:
    """``safetensors.torch.save_file`` into ``.{name}.{pid}.*.peft_safety-tmp`` next to ``path``, then an atomic
    rename over ``path``. On any error the temporary file is removed and ``path`` keeps its previous content; the
    temporary files of earlier killed saves of ``path`` are removed first."""
    from safetensors.torch import save_file

    path = check_output_file(path)
    remove_stale_temporaries(path)
    temporary = _temporary(path)
    try:
        save_file(tensors, temporary, metadata=metadata)
        _publish(temporary, path)
    except BaseException:
        _discard(temporary)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file renamed over it: never a half-written file."""
    path = check_output_file(path)
    remove_stale_temporaries(path)
    temporary = _temporary(path)
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)
        _publish(temporary, path)
    except BaseException:
        _discard(temporary)
        raise
