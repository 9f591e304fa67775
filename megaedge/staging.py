"""Staged output: work happens in a hidden folder beside the target and only a finished result is renamed in.

Staging folders are named ``.NAME.partial-<pid>-<random>`` and folders moved aside during a replacement
``.NAME.old-<pid>-<random>``, so a later run can tell the leftovers of a dead run (SIGKILL, power loss) from the work
of a live one and clear them: a 1.7B export leaves ~10 GB behind otherwise.

Also here: the ``--force`` rules (which directories may be replaced at all) and the one-line error for an output
folder that cannot be written.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

from megaedge.errors import MegaedgeError

log = logging.getLogger("megaedge.staging")

PARTIAL = "partial"
OLD = "old"
# Signals held back while two renames swap a result in: between them neither the old nor the new one is in place.
_CRITICAL_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.({PARTIAL}|{OLD})-(\d+)-[^/]+$")


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (on this machine). Unknown counts as alive: never clear a live run."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) terminates the process on Windows; leave leftovers to the user there
    if pid == os.getpid():
        # Our own pid on a leftover found before this run made its staging folder: a dead earlier process that had
        # the same pid (containers restart their entry point as pid 1 every time). This assumes one run per target
        # at a time within a process, which the CLI guarantees.
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: it exists, owned by another user
    return True


def clear_stale(parent: Path, name: str) -> list[Path]:
    """Remove the staging folders of dead runs for target ``parent / name``; returns what was removed.

    A moved-aside ``.old-`` folder whose run died before the new result was renamed in is renamed back instead,
    so the user's previous result is never lost to an interruption.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    pattern = _pattern(name)
    removed = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink() or _process_alive(int(match.group(2))):
            continue
        target = parent / name
        if match.group(1) == OLD and not os.path.lexists(target):
            try:
                os.rename(entry, target)
            except OSError as exc:
                log.warning("could not restore %s from %s (%s); it is kept", target, entry.name, exc)
                continue
            log.warning("restored %s from %s (left by an interrupted run, pid %s)", target, entry.name, match.group(2))
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            log.warning("removed %s, left behind by an interrupted run (pid %s)", entry, match.group(2))
            removed.append(entry)
    return removed


def make_staging(parent: Path, name: str, kind: str = PARTIAL) -> Path:
    """A fresh hidden folder ``parent/.NAME.<kind>-<pid>-<random>`` (mode 0755: results are meant to be shared)."""
    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=parent))
        path.chmod(0o755)  # mkdtemp makes 0700
    except OSError as exc:
        raise not_writable(parent, exc) from exc
    return path


def not_writable(folder: Path, exc: OSError, option: str = "--out") -> MegaedgeError:
    """The one-line error for an output folder that cannot be created or written."""
    reason = exc.strerror or type(exc).__name__
    probe = Path(folder)
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    if os.path.lexists(probe) and not probe.is_dir():  # mkdir says "File exists" or "Not a directory" here
        if probe == Path(folder):
            return MegaedgeError(f"{folder}: is a file, not a folder; choose another {option}")
        return MegaedgeError(f"{folder}: {probe} is a file, so the folder cannot be created; choose another {option}")
    if exc.errno == errno.ENOSPC:
        return MegaedgeError(f"{folder}: disk full; nothing was left behind; free space or choose another {option}")
    return MegaedgeError(f"{folder}: cannot write there ({reason}); choose a writable {option} folder")


@contextlib.contextmanager
def signals_held():
    """Defer SIGINT/SIGTERM/SIGHUP for a few renames: they are delivered right after the block."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _CRITICAL_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def replace_dir(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` folder to ``target``, replacing a directory there.

    The old directory is moved aside first and deleted only once the new one is in place, so a failure at any point
    leaves one of the two at ``target``, never neither.
    """
    if os.path.islink(target) and os.path.isdir(target):
        target = Path(os.path.realpath(target))  # a link to a bundle: the bundle is replaced and the link kept
    aside = None
    with signals_held():
        if os.path.lexists(target):
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.{OLD}-{os.getpid()}-", dir=target.parent))
            aside.rmdir()  # only the unique name was wanted: rename needs the destination absent (or empty)
            os.rename(target, aside)
        try:
            os.rename(staging, target)
        except BaseException:
            if aside is not None:
                os.rename(aside, target)
            raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


# --------------------------------------------------------------------------------------------- --force rules
def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def refuse_to_replace(out: Path, what: str, protected=(), marker: str | None = None) -> None:
    """Raise a one-line MegaedgeError unless the existing directory ``out`` may be replaced by --force.

    Never replaced: the working directory or one of its ancestors, the filesystem root, the home directory, a
    directory holding any ``protected`` input (the checkpoint, calibration data...), and a non-empty directory
    without ``marker`` (the file that says megaedge wrote it).
    """
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, real):
        where = "the working directory" if real == cwd else "an ancestor of the working directory"
        raise MegaedgeError(f"--out {out}: is {where}; --force never replaces it; choose a new folder, "
                            f"e.g. --out {out / what}")
    if real == Path(real.anchor) or real == Path.home().resolve():
        raise MegaedgeError(f"--out {out}: is the {'filesystem root' if real == Path(real.anchor) else 'home directory'}"
                            f"; --force never replaces it; choose a new folder, e.g. --out {out / what}")
    for item in protected:
        if item is None:
            continue
        source = Path(item).expanduser()
        if source.exists() and _is_within(source.resolve(), real):
            raise MegaedgeError(f"--out {out}: holds the input {item}; --force would delete it; choose another --out")
    if marker is not None and any(real.iterdir()) and not (real / marker).is_file():
        raise MegaedgeError(f"--out {out}: is not empty and has no {marker}, so it is not a megaedge {what}; "
                            f"--force only replaces one; choose a new folder or empty this one yourself")
