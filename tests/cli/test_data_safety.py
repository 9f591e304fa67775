"""Issue 28, data loss: what --force may replace, staged replacement, stale staging folders, SIGTERM/SIGHUP, and
unwritable output folders (export and stream; calibrate's side is in tests/calibration/test_builder.py)."""

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from megaedge import staging
from megaedge.cli.signals import Terminated, stop_like_ctrl_c
from megaedge.errors import MegaedgeError
from megaedge.export.bundle import ExportOptions, _check_output, export_bundle
from tests.conftest import REPO, speechlike

CLI = "import sys\nfrom megaedge.cli.main import main\nsys.exit(main(sys.argv[1:]))"


def _cli(*args, cwd=REPO, **popen):
    return subprocess.Popen([sys.executable, "-c", CLI, "--no-progress", *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: the pid names no process now
    return child.pid


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # The plain Qwen layout (no LoRA, no router): the fastest checkpoint to export, and all these tests need.
    from megaedge.export.factory import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", "original", seed=0)


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory):
    return export_bundle(checkpoint, tmp_path_factory.mktemp("bundle") / "b", ExportOptions(validate=False))


# ------------------------------------------------------------------------------------------------ --force rules
def test_export_out_dot_force_deletes_nothing(checkpoint, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("keep me")
    proc = _cli("export", checkpoint, "--out", ".", "--force", "--no-validate", cwd=work)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert stderr.strip().splitlines() == [
        f"megaedge export: error: --out {work}: is the working directory; --force never replaces it; choose a new "
        f"folder, e.g. --out {work / 'bundle'}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert sorted(p.name for p in work.iterdir()) == ["precious.txt"] and (work / "precious.txt").read_text() == "keep me"


def test_force_rules(tmp_path, monkeypatch):
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "megaedge.json").write_text("{}")  # even a bundle is not replaced when it is the working directory
    monkeypatch.chdir(deep)
    with pytest.raises(MegaedgeError, match=r"^--out .*/a/b: is the working directory; --force never replaces it"):
        _check_output(deep, True)
    with pytest.raises(MegaedgeError, match=r"^--out .*/a: is an ancestor of the working directory; --force never"):
        _check_output(tmp_path / "a", True)
    with pytest.raises(MegaedgeError, match=r"^--out /: is an ancestor of the working directory"):
        _check_output(Path("/"), True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    home = tmp_path / "home"
    home.mkdir()
    (home / "megaedge.json").write_text("{}")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(MegaedgeError, match=r"^--out .*/home: is the home directory; --force never replaces it"):
        _check_output(home, True)
    # A bundle that holds an input of this export (the checkpoint, calibration data): never deleted.
    holder = tmp_path / "holder"
    (holder / "ckpt").mkdir(parents=True)
    (holder / "megaedge.json").write_text("{}")
    with pytest.raises(MegaedgeError, match=r"^--out .*/holder: holds the input .*/holder/ckpt; --force would delete"):
        _check_output(holder, True, protected=(holder / "ckpt",))
    with pytest.raises(MegaedgeError, match=r"^--out .*/holder: holds the input .*/holder; --force would delete"):
        _check_output(holder, True, protected=(holder,))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    with pytest.raises(MegaedgeError, match=r"^--out .*/mine: is not empty and has no megaedge.json, so it is not a "
                                            r"megaedge bundle; --force only replaces one"):
        _check_output(mine, True)
    with pytest.raises(MegaedgeError, match=r"mine: directory is not empty; choose a new directory or pass --force"):
        _check_output(mine, False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MegaedgeError, match=r"afile: exists and is not a directory"):
        _check_output(tmp_path / "afile", True)
    # What may be replaced: a bundle, an empty folder, nothing at all.
    _check_output(holder, True, protected=(tmp_path / "elsewhere",))
    empty = tmp_path / "empty"
    empty.mkdir()
    _check_output(empty, False)
    _check_output(tmp_path / "new", False)
    assert (thesis := mine / "thesis.tex").read_text() == "x" and thesis.is_file()


def test_force_replaces_a_bundle_and_clears_dead_runs(checkpoint, bundle, tmp_path, caplog):
    out = tmp_path / "b"
    export_bundle(checkpoint, out, ExportOptions(validate=False))
    (out / "prepared").mkdir()  # what megaedge makes beside a bundle goes with it
    dead = _dead_pid()
    stale = tmp_path / f".b.partial-{dead}-abcdefgh"
    stale.mkdir()
    (stale / "encoder.onnx").write_bytes(b"half")
    live = tmp_path / f".b.partial-{os.getppid()}-abcdefgh"  # pytest's parent is alive: its work is kept
    live.mkdir()
    other = tmp_path / f".c.partial-{dead}-abcdefgh"  # another target's: not ours to clear
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="megaedge.staging"):
        export_bundle(checkpoint, out, ExportOptions(validate=False, force=True))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in bundle.iterdir())
    assert _hidden(tmp_path) == sorted([live.name, other.name])
    assert f"removed {stale}, left behind by an interrupted run (pid {dead})" in caplog.messages


def test_force_keeps_a_users_file_in_the_bundle_folder(checkpoint, tmp_path):
    """--force replaced the folder with whatever a user had put in it (a new user's probe lost notes.txt)."""
    out = tmp_path / "b"
    export_bundle(checkpoint, out, ExportOptions(validate=False))
    (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(MegaedgeError, match="notes.txt is not part of the bundle there and --force would delete it"):
        export_bundle(checkpoint, out, ExportOptions(validate=False, force=True))
    assert sorted(p.name for p in out.iterdir()) == before and (out / "notes.txt").read_text() == "mine"


def test_replace_dir_never_leaves_neither(tmp_path, monkeypatch):
    target, new = tmp_path / "b", tmp_path / ".b.partial-1-x"
    target.mkdir()
    (target / "megaedge.json").write_text("old")
    new.mkdir()
    (new / "megaedge.json").write_text("new")
    real_rename = os.rename

    def failing(src, dst):
        if Path(src) == new:
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError):
        staging.replace_dir(new, target)
    assert (target / "megaedge.json").read_text() == "old"
    assert _hidden(tmp_path) == [new.name]  # the old one is back in place, nothing moved aside is left
    monkeypatch.undo()
    staging.replace_dir(new, target)
    assert (target / "megaedge.json").read_text() == "new" and _hidden(tmp_path) == []


def test_stale_old_bundle_of_a_dead_run_is_restored(tmp_path, caplog):
    # A run killed (SIGKILL) between moving the old bundle aside and renaming the new one in.
    dead = _dead_pid()
    aside = tmp_path / f".b.old-{dead}-abcdefgh"
    aside.mkdir()
    (aside / "megaedge.json").write_text("old")
    with caplog.at_level(logging.WARNING, logger="megaedge.staging"):
        assert staging.clear_stale(tmp_path, "b") == []
    assert (tmp_path / "b" / "megaedge.json").read_text() == "old" and _hidden(tmp_path) == []
    assert caplog.messages == [f"restored {tmp_path / 'b'} from {aside.name} (left by an interrupted run, pid {dead})"]
    # Once the new bundle is in, a dead run's moved-aside one is what --force asked to delete.
    aside.mkdir()
    assert staging.clear_stale(tmp_path, "b") == [aside] and (tmp_path / "b" / "megaedge.json").is_file()


# ------------------------------------------------------------------------------------------------ signals
def test_sigterm_and_sighup_raise_like_ctrl_c():
    before = signal.getsignal(signal.SIGTERM)
    with stop_like_ctrl_c() as guard:
        with pytest.raises(Terminated) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted: the handler raises at once
        assert isinstance(stop.value, KeyboardInterrupt) and stop.value.exit_status == 143
        os.kill(os.getpid(), signal.SIGTERM)  # a second one while cleaning up: ignored
        assert guard.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    with stop_like_ctrl_c() as guard:
        done = []
        with pytest.raises(Terminated) as stop:
            with guard.deferred():
                os.kill(os.getpid(), signal.SIGHUP)
                done.append("the block finished")
        assert done == ["the block finished"] and stop.value.name == "SIGHUP" and stop.value.exit_status == 129
    with stop_like_ctrl_c() as guard:
        guard.hold()
        os.kill(os.getpid(), signal.SIGTERM)  # recorded only
        assert guard.received == signal.SIGTERM


def test_a_signal_during_an_import_waits_for_the_import(tmp_path, monkeypatch):
    # A KeyboardInterrupt raised inside a C extension's module init can end in std::terminate (nanobind's onnx did):
    # the signal must be raised only once the import is over, and the module must be complete.
    (tmp_path / "slow_import_mod.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\n"
        "for _ in range(20):\n    time.sleep(0.01)\nDONE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with stop_like_ctrl_c() as guard:
        with pytest.raises(Terminated):
            import slow_import_mod  # noqa: F401
            time.sleep(5)  # the retried signal arrives here
        assert guard.received == signal.SIGTERM
    assert sys.modules["slow_import_mod"].DONE is True
    del sys.modules["slow_import_mod"]


def _wait_for(predicate, proc, seconds=240):
    deadline = time.monotonic() + seconds
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"gave up waiting: {proc.communicate()}")
        time.sleep(0.05)


def test_sigterm_during_export_removes_its_staging(checkpoint, tmp_path):
    proc = _cli("export", checkpoint, "--out", tmp_path / "b", "--no-validate")
    _wait_for(lambda: list(tmp_path.glob(".b.partial-*")), proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "megaedge export: stopped by SIGTERM; nothing partial was left behind"
    assert stdout == "" and list(tmp_path.iterdir()) == []


def test_sigterm_ends_a_stream_with_its_final_event(bundle, tmp_path):
    import soundfile as sf

    wav = tmp_path / "long.wav"
    sf.write(wav, speechlike(30.0, seed=3), 16000)
    events = tmp_path / "events.jsonl"
    with events.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", CLI, "--no-progress", "stream", str(bundle), "--file", str(wav),
                                 "--realtime", "--json"], cwd=REPO, text=True, stdout=out, stderr=subprocess.PIPE)
        _wait_for(lambda: events.read_text().count("\n") >= 1, proc)  # streaming: a first event is out
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    lines = events.read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["kind"] == "final" and last["reason"] == "flush"
    assert last["end"] < 29.0  # stopped early, not at the end of the file
    assert len(lines) >= 2  # the event(s) before the signal, then the flush


# ------------------------------------------------------------------------------------------------ unwritable --out
def test_unwritable_output_folder_is_one_line(checkpoint, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MegaedgeError) as err:
        export_bundle(checkpoint, tmp_path / "file" / "b", ExportOptions(validate=False))
    assert str(err.value) == f"{tmp_path / 'file'}: is a file, not a folder; choose another --out"
    proc = _cli("export", checkpoint, "--out", tmp_path / "file" / "b", "--no-validate")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1 and len(stderr.strip().splitlines()) == 1 and str(tmp_path / "file") in stderr
    # Read-only folders: root writes through chmod 555, so refuse where the staging folder is made.

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(MegaedgeError) as err:
        export_bundle(checkpoint, tmp_path / "ro" / "b", ExportOptions(validate=False))
    assert str(err.value) == f"{tmp_path / 'ro'}: cannot write there (Permission denied); choose a writable --out folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ro"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 folder; simulated in the test above")
def test_read_only_output_folder_is_one_line(checkpoint, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(MegaedgeError, match=r"ro: cannot write there \(Permission denied\); choose a writable"):
            export_bundle(checkpoint, ro / "b", ExportOptions(validate=False))
    finally:
        ro.chmod(0o755)


def test_interrupted_int8_export_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    from megaedge.export import int8

    def stop(*args, **kwargs):
        raise Terminated(signal.SIGTERM)  # what megaedge.cli.signals raises when SIGTERM arrives mid-quantization

    monkeypatch.setattr(int8, "int8_from_fp32", stop)
    with pytest.raises(Terminated):
        int8.export_int8(checkpoint, tmp_path / "q", ExportOptions(validate=False), int8.Int8Options(report=False))
    assert list(tmp_path.iterdir()) == []  # neither the FP32 bundle nor any INT8 remains
    # --force never deletes a calibration cache (or clips) kept inside the bundle folder.
    (tmp_path / "q" / "cache").mkdir(parents=True)
    (tmp_path / "q" / "megaedge.json").write_text("{}")
    with pytest.raises(MegaedgeError, match=r"^--out .*/q: holds the input .*/q/cache; --force would delete it"):
        int8.export_int8(checkpoint, tmp_path / "q", ExportOptions(validate=False, force=True),
                         int8.Int8Options(report=False, calib_cache=str(tmp_path / "q" / "cache")))
