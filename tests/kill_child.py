"""Run a command and SIGKILL it at a chosen step of an atomic write (chaos tests).

    python tests/kill_child.py -m kind_fast pretrain ...     # a module, as python -m
    python tests/kill_child.py script.py args ...            # a script

The kill is aimed by hooks on ``os.fsync`` and ``os.replace`` (what ``kind_fast.atomic`` calls
for every file and folder it writes), not by timing, so it lands where asked however busy the
machine is. Environment:

    KF_KILL_POINT   write    a temporary file is being written: cut to half its size, then killed
                             (what a kill in the middle of torch.save / a safetensors write leaves)
                    rename   the temporary file or folder is complete, nothing renamed yet (a
                             folder replacing another: before the old one is moved aside)
                    renamed  just after the rename into place (before the folder is synced)
                    between  atomic_directory moved the old folder aside, the new one is not in place
    KF_KILL_AT      k: kill at the k-th such event whose path contains KF_KILL_MATCH
    KF_KILL_MATCH   a substring of the final path (e.g. "/checkpoints/", "/ema/", "/task"); default ""

The process exits by SIGKILL at that event; if it never comes, the command runs to its end.
"""

from __future__ import annotations

import os
import re
import runpy
import signal
import sys

POINT = os.environ.get("KF_KILL_POINT", "")
AT = int(os.environ.get("KF_KILL_AT", "0"))
MATCH = os.environ.get("KF_KILL_MATCH", "")
_TEMP = re.compile(r"/\.(?P<name>[^/]+)\.(?:tmp|old)-\d+(?:-[A-Za-z0-9_.-]*)?(?P<rest>/.*)?$")
_seen = [0]
_real_replace, _real_fsync = os.replace, os.fsync


def final_path(path: str) -> str:
    """The final name a temporary (or moved-aside) path of kind_fast.atomic stands for."""
    return _TEMP.sub(lambda m: "/" + m.group("name") + (m.group("rest") or ""), str(path))


def _due(path: str) -> bool:
    if MATCH not in final_path(path):
        return False
    _seen[0] += 1
    return _seen[0] == AT


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _fsync(fd: int) -> None:
    if POINT == "write":
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if ".tmp-" in path and os.path.isfile(path) and _due(path):
            os.truncate(path, os.path.getsize(path) // 2)
            _die()
    _real_fsync(fd)


_aside: list[str] = []  # a folder moved aside by a write whose new folder's rename is the same event


def _replace(src, dst) -> None:
    src, dst = os.fspath(src), os.fspath(dst)
    if POINT == "rename":
        if ".old-" in os.path.basename(dst):  # a folder write's first rename: the old folder aside
            if _due(src):
                _die()
            _aside.append(src)
        elif ".tmp-" in os.path.basename(src):
            if dst in _aside:
                _aside.remove(dst)
            elif _due(dst):
                _die()
    _real_replace(src, dst)
    if POINT == "renamed" and ".tmp-" in os.path.basename(src) and _due(dst):
        _die()
    if POINT == "between" and ".old-" in os.path.basename(dst) and _due(src):
        _die()


os.fsync, os.replace = _fsync, _replace

if __name__ == "__main__":
    if sys.argv[1] == "-m":
        sys.argv = [sys.argv[2], *sys.argv[3:]]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
