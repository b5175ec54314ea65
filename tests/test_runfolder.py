"""Crash-safe writes and the run folder's layout and lock, with real SIGKILLed processes."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from evonas.search import runfolder
from evonas.errors import EvonasError
from evonas.search.runfolder import RunFolder, atomic_write_json, atomic_write_text, read_json

REPO = Path(__file__).resolve().parents[1]

# Rewrites one file as fast as it can; every version holds its own number and a padding
# whose length follows from it, so a torn or mixed file cannot pass for a whole one.
WRITER = textwrap.dedent("""
    import sys
    from evonas.search.runfolder import atomic_write_json
    i = 0
    while True:
        atomic_write_json(sys.argv[1], {"i": i, "pad": "x" * (50_000 * (i % 5))})
        if i == 3:
            print("writing", flush=True)
        i += 1
""")

HOLDER = textwrap.dedent("""
    import sys, time
    from evonas.search.runfolder import RunFolder
    folder = RunFolder.open(sys.argv[1])  # kept: the lock lives as long as the object
    print("locked", flush=True)
    time.sleep(120)
""")


def _spawn(script: str, *args: str, ready: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script, *args], env=env,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line == ready, f"child said {line!r}"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


# --- atomic writes --------------------------------------------------------------------


def test_sigkill_mid_write_loop_never_leaves_a_torn_file(tmp_path):
    target = tmp_path / "state.json"
    rng = random.Random(0)
    for _ in range(8):
        proc = _spawn(WRITER, str(target), ready="writing")
        time.sleep(rng.uniform(0.0, 0.1))
        _kill(proc)
        data = read_json(target)
        assert data["i"] >= 3
        assert data["pad"] == "x" * (50_000 * (data["i"] % 5))


def test_failed_replace_keeps_old_content_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"v": 1})

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(runfolder.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_json(target, {"v": 2})
    assert read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_write_text_round_trip_and_mode(tmp_path):
    target = tmp_path / "notes.txt"
    atomic_write_text(target, "première\n")
    atomic_write_text(target, "second\n")
    assert target.read_text(encoding="utf-8") == "second\n"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"loss": float("nan")})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, detail", [
    ('{"a": 1,', "line 1"),
    ('{"a": NaN}', "NaN"),
    (b"\xff\xfe{}", "UTF-8"),
])
def test_read_json_malformed_is_one_line_naming_the_file(tmp_path, content, detail):
    path = tmp_path / "state.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(EvonasError) as info:
        read_json(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and detail in message
    assert "restore" in message


def test_read_json_missing_file(tmp_path):
    with pytest.raises(EvonasError, match="not found"):
        read_json(tmp_path / "nope.json")


# --- layout, create, open -------------------------------------------------------------


def test_create_lays_out_the_folder(tmp_path):
    path = tmp_path / "runs" / "s1"
    with RunFolder.create(path, {"space": "norm_act", "budget": "200gpu-h"}) as folder:
        assert folder.locked
        assert folder.read_config() == {"space": "norm_act", "budget": "200gpu-h"}
        assert folder.artifacts_dir.is_dir()
        assert folder.read_state() is None
        assert folder.lock_path.read_text().strip() == str(os.getpid())
        assert folder.tracking_uri == f"sqlite:///{path.absolute()}/mlflow.db"
        assert folder.tracking_uri.startswith("sqlite:////")
        folder.write_state({"generation": 3})
        assert folder.read_state() == {"generation": 3}
    assert not folder.locked
    assert sorted(p.name for p in path.iterdir()) == ["artifacts", "config.json", "lock",
                                                       "state.json"]


def test_create_refuses_an_existing_run_and_suggests_resume(tmp_path):
    path = tmp_path / "s1"
    RunFolder.create(path, {"a": 1}).release()
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    with pytest.raises(EvonasError, match="already holds a run; pass --resume") as info:
        RunFolder.create(path, {"a": 2})
    assert "\n" not in str(info.value)
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before
    assert RunFolder.open(path, lock=False).read_config() == {"a": 1}


def test_create_writes_nothing_when_config_is_not_json(tmp_path):
    path = tmp_path / "runs" / "s1"
    with pytest.raises(EvonasError, match="cannot be stored as JSON"):
        RunFolder.create(path, {"lr": float("nan")})
    with pytest.raises(EvonasError, match="cannot be stored as JSON"):
        RunFolder.create(path, {"space": object()})
    assert not (tmp_path / "runs").exists()


def test_create_refuses_a_folder_with_other_files(tmp_path):
    path = tmp_path / "s1"
    path.mkdir()
    (path / "thesis.tex").write_text("precious")
    with pytest.raises(EvonasError, match=r"not empty.*thesis\.tex"):
        RunFolder.create(path, {"a": 1})
    assert [p.name for p in path.iterdir()] == ["thesis.tex"]


def test_create_refuses_a_file(tmp_path):
    path = tmp_path / "s1"
    path.write_text("x")
    with pytest.raises(EvonasError, match="a file"):
        RunFolder.create(path, {"a": 1})


def test_create_over_the_leftovers_of_a_killed_creation(tmp_path):
    path = tmp_path / "s1"
    (path / "artifacts").mkdir(parents=True)
    (path / "lock").write_text("12345\n")
    (path / ".config.json.12345.deadbeef.tmp").write_text('{"a"')
    with RunFolder.create(path, {"a": 1}) as folder:
        assert folder.read_config() == {"a": 1}
    assert not list(path.glob(".*.tmp"))


def test_open_missing_folder(tmp_path):
    with pytest.raises(EvonasError, match="no such run folder"):
        RunFolder.open(tmp_path / "nope")


def test_open_names_what_is_missing(tmp_path):
    with pytest.raises(EvonasError, match=r"config\.json and artifacts/ missing"):
        RunFolder.open(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EvonasError, match=r"\(artifacts/ missing\)"):
        RunFolder.open(tmp_path)


def test_a_run_kept_without_its_artifacts_folder_opens_and_gets_it_back(tmp_path):
    # What a clone of a run committed to git holds: git keeps no empty folder.
    with RunFolder.create(tmp_path / "s1", {"a": 1}) as folder:
        folder.write_state({"step": 3})
    (tmp_path / "s1" / "artifacts").rmdir()
    with RunFolder.open(tmp_path / "s1", lock=False) as folder:  # a reader writes nothing
        assert folder.read_state() == {"step": 3}
    assert not (tmp_path / "s1" / "artifacts").exists()
    with RunFolder.open(tmp_path / "s1") as folder:
        assert folder.artifacts_dir.is_dir() and folder.read_config() == {"a": 1}


def test_open_removes_temp_files_of_interrupted_writes(tmp_path):
    RunFolder.create(tmp_path / "s1", {"a": 1}).release()
    stale = tmp_path / "s1" / ".state.json.999.0badf00d.tmp"
    stale.write_text('{"half')
    with RunFolder.open(tmp_path / "s1"):
        assert not stale.exists()


def test_malformed_state_file_is_reported(tmp_path):
    with RunFolder.create(tmp_path / "s1", {"a": 1}) as folder:
        folder.state_path.write_text("[1, 2]")
        with pytest.raises(EvonasError, match="expected a JSON object"):
            folder.read_state()


def test_write_state_needs_the_lock(tmp_path):
    RunFolder.create(tmp_path / "s1", {"a": 1}).release()
    reader = RunFolder.open(tmp_path / "s1", lock=False)
    with pytest.raises(RuntimeError, match="needs the lock"):
        reader.write_state({"x": 1})


# --- the lock -------------------------------------------------------------------------


def test_lock_of_a_live_process_blocks_and_of_a_killed_one_does_not(tmp_path):
    path = tmp_path / "s1"
    RunFolder.create(path, {"a": 1}).release()
    holder = _spawn(HOLDER, str(path), ready="locked")
    try:
        with pytest.raises(EvonasError, match=rf"in use by another search \(pid {holder.pid}\)"):
            RunFolder.open(path)
        # Read-only tools still open it.
        assert RunFolder.open(path, lock=False).read_config() == {"a": 1}
    finally:
        _kill(holder)
    # The kernel dropped the dead process's lock; its pid is still in the file.
    assert (path / "lock").read_text().strip() == str(holder.pid)
    with RunFolder.open(path) as folder:
        assert folder.locked
        assert folder.lock_path.read_text().strip() == str(os.getpid())


def test_two_searches_in_one_process_conflict(tmp_path):
    with RunFolder.create(tmp_path / "s1", {"a": 1}) as first:
        with pytest.raises(EvonasError, match="in use"):
            RunFolder.open(tmp_path / "s1")
        first.lock()  # taking it again on the same object is a no-op
        assert first.locked
    with RunFolder.open(tmp_path / "s1"):
        pass
