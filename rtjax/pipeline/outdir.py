"""The output folder of a case: checked before any work, locked, written atomically.

- :func:`check_out_dir`: an existing ``--out`` that is not a folder, not writable, or not
  empty is refused (a finished rtjax case output, with ``done.json``, is replaced with
  ``overwrite``; any other non-empty folder is never replaced); a folder that cannot be
  created (permission) is refused. All before any heavy work.
- :class:`OutputLock`: the lock file ``<out>.lock`` beside the output keeps two processes
  from running into the same output; a lock left by a process that is gone (same host,
  no such pid) is taken over.
- :func:`fresh_partial` / :func:`commit`: everything is written into ``<out>.partial``,
  renamed to ``<out>`` only when complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
from pathlib import Path

from rtjax.errors import InputError

__all__ = ["DONE", "OutputLocked", "OutputLock", "check_out_dir", "commit", "fresh_partial",
           "lock_path"]

#: The marker file of a complete case output.
DONE = "done.json"


class OutputLocked(InputError):
    """Another process holds the lock of this output."""


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _read_only(folder: Path) -> bool:
    """No write permission for this process, or no write bit at all (``chmod a-w``: read-only
    by intent, which even root's writes should respect)."""
    return not os.access(folder, os.W_OK | os.X_OK) or not folder.stat().st_mode & 0o222


def check_out_dir(out_dir, *, overwrite: bool = False) -> Path:
    """Refuse an output folder that cannot (or must not) be written; returns it.

    Raises:
        InputError: ``out_dir`` is a file; exists and is not writable; exists, is not empty
            and either is not an rtjax case output or ``overwrite`` is off; or cannot be
            created (its nearest existing parent is not a writable folder).
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError(out_dir, "--out exists and is not a folder")
        if _read_only(out_dir) or not os.access(out_dir.parent, os.W_OK):
            raise InputError(out_dir, "--out is not writable (permission denied); choose "
                             "another --out")
        if any(out_dir.iterdir()):
            if not (out_dir / DONE).is_file():
                raise InputError(out_dir, f"--out exists, is not empty and is not an rtjax case "
                                 f"output (no {DONE}); it is never replaced: choose another --out")
            if not overwrite:
                raise InputError(out_dir, "--out holds an earlier rtjax output; pass "
                                 "--overwrite to replace it, or choose another --out")
        return out_dir
    parent = _nearest_existing(out_dir.parent)
    if not parent.is_dir():
        raise InputError(parent, f"cannot create --out {out_dir}: {parent} is not a folder")
    if _read_only(parent):
        raise InputError(out_dir, f"cannot create --out: no permission to write in {parent}")
    return out_dir


def lock_path(out_dir) -> Path:
    """``<out>.lock``, beside the output folder (which is replaced as a whole)."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".lock")


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _gone(holder: dict | None) -> bool:
    """Whether the lock's process is known to be gone (same host, no such pid)."""
    if not holder or holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError, ValueError, OverflowError):
        return False
    return False


class OutputLock:
    """``with OutputLock(out_dir):`` holds ``<out>.lock`` (created exclusively) while a case
    runs into ``out_dir``; released (removed) on exit.

    Raises:
        OutputLocked: another live process holds the lock (it names the pid and host).
    """

    def __init__(self, out_dir) -> None:
        self.path = lock_path(out_dir)
        self.out_dir = Path(out_dir)
        self._held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _holder(self.path)
                if _gone(holder):
                    self.path.unlink(missing_ok=True)
                    continue
                who = (f"pid {holder.get('pid')} on {holder.get('host')}, since "
                       f"{holder.get('started')}") if holder else "unknown process"
                raise OutputLocked(self.out_dir, f"another rtjax process ({who}) is writing this "
                                   f"output; wait for it, or delete {self.path} if it is gone") from None
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            self._held = True
            return
        raise OutputLocked(self.out_dir, f"cannot take the lock {self.path}")

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def fresh_partial(out_dir) -> Path:
    """A fresh, empty ``<out>.partial`` (a stale one, of an interrupted run, is deleted)."""
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def commit(partial: Path, out_dir: Path) -> None:
    """Rename the complete ``partial`` folder to ``out_dir`` (replacing an earlier output,
    which :func:`check_out_dir` allowed)."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
        os.replace(partial, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(partial, out_dir)
