"""Atomic file writes: a temporary file in the same folder, flushed and fsync'ed, then renamed
over the final name (``os.replace`` is atomic on POSIX and Windows). A crash mid-write leaves
the previous file untouched and no partial file under the final name.

A process killed mid-write (SIGKILL, power loss) cannot remove its temporary file; the name
``.<final name>.tmp-<pid>-<host>`` says whose it was. ``remove_stale_temps`` deletes those whose
process is gone (same host, PID not alive); every write cleans its own target's stale temps,
and the trainer sweeps its run folder when a run starts.

``atomic_directory`` does the same for a whole folder: it is built under a temporary sibling
folder ``.<name>.tmp-<pid>-<host>`` and renamed into place, so readers see the old folder or the
complete new one. Replacing a folder takes two renames (the old one aside to
``.<name>.old-<pid>-<host>``, the new one in); a process killed between them leaves no folder
under the final name, and the previous one in that ``.old`` sibling: ``refuse_missing_folder``
names it and says how to restore it. ``remove_stale_temps`` sweeps dead writers' temporary
folders too, and their ``.old`` folders once the final name exists again (never the only copy);
``atomic_directory`` sweeps its target's before and after it writes.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save",
    "temp_name", "remove_stale_temps", "remove_stale_temps_under", "atomic_directory", "old_name",
    "refuse_missing_folder",
]

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-(?P<host>[A-Za-z0-9_.-]*))?$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64]


def temp_name(path: str | os.PathLike) -> Path:
    """The temporary file an atomic write of ``path`` by this process uses."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{_host()}")


def old_name(path: str | os.PathLike) -> Path:
    """Where ``atomic_directory`` of this process puts the folder it replaces, between its two renames."""
    path = Path(path)
    return path.with_name(f".{path.name}.old-{os.getpid()}-{_host()}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # alive under another user (or cannot tell): keep
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete what dead writers left in ``folder`` (only for the final name ``name`` if given):
    temporary files and folders of atomic writes (``.<name>.tmp-<pid>-<host>``), and folders
    that ``atomic_directory`` moved aside (``.<name>.old-<pid>-<host>``) once ``<name>`` exists
    again: while it is missing, the ``.old`` folder is the only copy and is kept. Anything of
    another host or of a live process is kept, and so are symlinks. Returns the deleted paths."""
    d = Path(folder)
    if not d.is_dir():
        return []
    host, removed = _host(), []
    for p in d.iterdir():
        m = _TEMP.match(p.name)
        if m is None or (name is not None and m.group("name") != name):
            continue
        if m.group("host") not in (None, host) or _pid_alive(int(m.group("pid"))):
            continue
        if m.group("kind") == "old" and not (d / m.group("name")).exists():
            continue  # the previous folder, and no new one in its place: keep (refuse_missing_folder)
        try:
            if p.is_symlink():
                continue
            if p.is_dir():
                shutil.rmtree(p)
                removed.append(p)
            elif p.is_file():
                p.unlink()
                removed.append(p)
        except FileNotFoundError:  # another cleaner got there first
            pass
    return removed


def refuse_missing_folder(path: str | os.PathLike, what: str, again: str) -> None:
    """If the folder ``path`` is missing but a replacement of it was killed between its two
    renames (a ``.<name>.old-*`` sibling holds the previous one), a FileNotFoundError that says
    where it is and how to restore it; otherwise nothing (the caller's usual checks follow)."""
    old = _surviving_old(Path(path))
    if old is not None:
        raise FileNotFoundError(
            f"{path} is missing, but the previous {what} survives in {old}: a write of {path} was killed between "
            f"its two renames. Restore it with: mv '{old}' '{path}' (or {again})")


def _surviving_old(path: Path) -> Path | None:
    """The newest ``.<name>.old-*`` folder beside a missing ``path`` (see ``atomic_directory``)."""
    if path.exists() or not path.parent.is_dir():
        return None
    olds = [p for p in path.parent.iterdir()
            if (m := _TEMP.match(p.name)) and m.group("kind") == "old" and m.group("name") == path.name
            and p.is_dir() and not p.is_symlink()]
    return max(olds, key=lambda p: p.stat().st_mtime) if olds else None


def remove_stale_temps_under(folders: Iterable[str | os.PathLike]) -> list[Path]:
    """``remove_stale_temps`` over several folders (missing ones are skipped)."""
    out: list[Path] = []
    for f in folders:
        out += remove_stale_temps(f)
    return out


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(f)`` on a binary temporary file, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    remove_stale_temps(path.parent, path.name)  # left by earlier writers of this file that died


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    atomic_write_bytes(text.encode(), path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically, always with the zip records' CRC-32 (``load_checkpoint``
    verifies it: a flipped bit in tensor data is then detected)."""
    from torch.serialization import get_crc32_options, set_crc32_options

    before = get_crc32_options()
    set_crc32_options(True)
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    finally:
        set_crc32_options(before)


@contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder as a whole: ``with atomic_directory(out) as tmp: <write files into tmp>``.

    The files are written into a temporary sibling folder; when the block ends without an
    exception every file is fsync'ed and the folder is renamed to ``path``. If the block
    raises, the temporary folder is removed and ``path`` is untouched.

    ``path`` must not exist unless ``overwrite`` is set; then the old folder is renamed aside,
    the new one renamed in, and the old one deleted (a crash between the two renames leaves
    the old folder under ``.<name>.old-<pid>-<host>`` beside ``path``, never a partial one under
    it; without ``overwrite`` such a survivor is refused like an existing ``path``).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (choose another folder, or overwrite it)")
    if not overwrite and (old := _surviving_old(path)) is not None:
        raise FileExistsError(f"the previous {path} survives in {old} (a replacement was killed between its two "
                              f"renames): restore it with mv '{old}' '{path}', or overwrite it")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)  # dead writers' temporary folders (full size)
    tmp = temp_name(path)  # .<name>.tmp-<pid>-<host>, as file writes name theirs
    if tmp.exists():  # left over by a crashed earlier attempt of this process id
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(Path(root))
        if path.exists():
            old = old_name(path)
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
        remove_stale_temps(path.parent, path.name)  # dead writers' .old folders: <name> exists again
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
