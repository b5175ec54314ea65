"""The run folder of a search (e.g. runs/s1): its layout, its lock and crash-safe writes.

`evonas search` creates the folder with RunFolder.create before the first evaluation;
`--resume` reopens it with RunFolder.open. The controller rewrites state.json after every
finished evaluation, so a search killed at any moment, SIGKILL included, resumes from
the last finished one. Layout:

    config.json   the search's configuration, written once at creation; its presence is
                  what makes a folder a run folder
    state.json    controller state (population, ledger, ...), absent until the first
                  evaluation finishes
    journal.jsonl the finished candidates, one line each (state.py says how the two
                  files commit together)
    mlflow.db     the SQLite MLflow store (tracking_uri), created by MLflow
    artifacts/    files the evaluations keep
    lock          holds the pid of the search using the folder

Every file here is written with atomic_write_*: a temp file in the same directory, fsync,
os.replace over the target, fsync of the directory. A reader sees the old file or the new
one, never a torn one, and after a power loss the rename itself is on disk.

The lock is an fcntl.flock on the open lock file. The kernel drops it when the process
dies however it dies, so a SIGKILLed search never leaves a stale lock behind; the pid in
the file only serves the error message.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from evonas.errors import EvonasError

STATE = "state.json"
JOURNAL = "journal.jsonl"
CONFIG = "config.json"
MLFLOW_DB = "mlflow.db"
ARTIFACTS = "artifacts"
LOCK = "lock"

_TEMP_SUFFIX = ".tmp"


# --- crash-safe files ---------------------------------------------------------------


def atomic_write_text(path: str | os.PathLike[str], text: str, *, durable: bool = True) -> None:
    """Replace the file at `path` with `text` (UTF-8) so that no crash leaves it torn.
    durable=False skips the fsyncs (milliseconds each): the replacement is still atomic
    and survives a kill of this process, but a power loss may undo it."""
    target = Path(path)
    # Same directory as the target: os.replace is atomic only within one filesystem.
    temp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
    # Mode 0o666 through the umask, as open() would give the target; O_EXCL never
    # follows or reuses an existing file.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            if durable:
                os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    if durable:
        _fsync_directory(target.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, durable: bool = True,
                      indent: int | None = 2) -> None:
    """atomic_write_text of obj as strict JSON (NaN and infinities raise ValueError).
    indent=None writes one line, with json's C encoder: several times faster."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    atomic_write_text(path, text + "\n", durable=durable)


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON value in `path`; EvonasError with one line naming the file and the fix."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvonasError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise EvonasError(f"{path}: not UTF-8 text, so not JSON; restore the file "
                          f"from a copy or start a new run folder") from None
    except OSError as err:
        raise EvonasError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as err:
        where = (f" at line {err.lineno}, column {err.colno}"
                 if isinstance(err, json.JSONDecodeError) else "")
        msg = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
        raise EvonasError(f"{path}: malformed JSON ({msg}{where}); fix it by hand or "
                          f"restore it from a copy") from None


def _reject_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which are not JSON and which we never write.
    raise ValueError(f"{name} is not a JSON value")


def _fsync_directory(directory: Path) -> None:
    # Makes the rename durable; some filesystems cannot fsync a directory and say EINVAL.
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(_TEMP_SUFFIX)


# --- the run folder -----------------------------------------------------------------


class RunFolder:
    """The layout of one run folder, and the lock of the search that uses it.

    RunFolder(path) only names the paths; create() and open() check the folder and take
    the lock. Use it as a context manager, or call release(), to give the lock back.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).absolute()
        self._lock_file: IO[str] | None = None

    # --- layout ---------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.path / STATE

    @property
    def journal_path(self) -> Path:
        return self.path / JOURNAL

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def mlflow_db_path(self) -> Path:
        return self.path / MLFLOW_DB

    @property
    def artifacts_dir(self) -> Path:
        return self.path / ARTIFACTS

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI of the folder's SQLite store (four slashes: absolute)."""
        return f"sqlite:///{self.mlflow_db_path}"

    # --- creating and opening -------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], config: dict[str, Any]) -> RunFolder:
        """Make a new run folder holding `config`, locked by this process.

        The path may be missing, or a folder left empty (or with only a lock and an
        empty artifacts/) by an earlier creation that was killed. Every check runs
        before anything is written, and again under the lock in case another search
        created the same folder meanwhile.
        """
        folder = cls(path)
        text = _config_text(config, folder.path)
        folder._check_creatable()
        try:
            folder.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise EvonasError(f"{folder.path}: cannot create the run folder "
                              f"({err.strerror}); choose another folder") from None
        folder.lock()
        try:
            folder._check_creatable()
            folder.artifacts_dir.mkdir(exist_ok=True)
            # Last: config.json is what marks the folder as a run, so it comes after the rest.
            atomic_write_text(folder.config_path, text)
        except BaseException:
            folder.release()
            raise
        return folder

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, lock: bool = True) -> RunFolder:
        """An existing run folder, locked unless lock=False (for read-only tools)."""
        folder = cls(path)
        if not folder.path.exists():
            raise EvonasError(f"{folder.path}: no such run folder; "
                              f"check the path, or start a new search without --resume")
        if not folder.path.is_dir():
            raise EvonasError(f"{folder.path}: a file, not a run folder; check the path")
        # A run's state kept without its artifacts/ (git keeps no empty folder: a run
        # committed to a repository and cloned) is still a run; its writer remakes it.
        copied_state = folder.state_path.is_file() and not folder.artifacts_dir.exists()
        missing = [name for name, present in ((CONFIG, folder.config_path.is_file()),
                                              (ARTIFACTS + "/", folder.artifacts_dir.is_dir()
                                               or copied_state))
                   if not present]
        if missing:
            raise EvonasError(f"{folder.path}: not a run folder ({' and '.join(missing)} "
                              f"missing); check the path, or start a new search without --resume")
        if lock:
            folder.lock()
            folder.artifacts_dir.mkdir(exist_ok=True)
        return folder

    def _check_creatable(self) -> None:
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise EvonasError(f"{self.path}: a file, not a folder; choose another run folder")
        if self.config_path.exists() or self.state_path.exists():
            raise EvonasError(f"{self.path}: already holds a run; pass --resume to continue "
                              f"it, or choose a new run folder")
        others = sorted(p.name for p in self.path.iterdir() if not self._leftover(p))
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise EvonasError(f"{self.path}: not empty and not a run ({shown}); choose a new "
                              f"run folder or empty this one")

    def _leftover(self, entry: Path) -> bool:
        # What a creation killed before writing config.json can leave behind.
        if entry.name == LOCK or _is_temp(entry.name):
            return True
        return entry.name == ARTIFACTS and entry.is_dir() and not any(entry.iterdir())

    # --- the lock -------------------------------------------------------------------

    @property
    def locked(self) -> bool:
        """Whether this object holds the folder's lock."""
        return self._lock_file is not None

    def lock(self) -> None:
        """Take the folder's lock, or raise EvonasError naming the search that holds it.

        The lock belongs to this open file, so two searches in one process conflict too.
        Processes forked while it is held (not spawned) share it until they exit.
        """
        if self._lock_file is not None:
            return
        try:
            f = open(self.lock_path, "a+", encoding="utf-8")
        except OSError as err:
            raise EvonasError(f"{self.lock_path}: cannot open the lock file ({err.strerror}); "
                              f"check the folder's permissions") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise EvonasError(f"{self.path}: in use by another search (pid {holder}); wait for "
                              f"it to end or stop it, then resume") from None
        except OSError as err:
            f.close()
            raise EvonasError(f"{self.lock_path}: cannot lock ({err.strerror}); keep run "
                              f"folders on a local filesystem") from None
        # The lock file is never deleted: a new file under the same name would let a second
        # search lock a different inode than the first one holds.
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock_file = f
        self._remove_temp_files()

    def release(self) -> None:
        """Give the lock back; no-op if not held."""
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def _remove_temp_files(self) -> None:
        # Temp files of writes a kill interrupted; with the lock held nobody else writes here.
        for entry in self.path.iterdir():
            if _is_temp(entry.name) and entry.is_file():
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()

    # --- contents -------------------------------------------------------------------

    def read_config(self) -> dict[str, Any]:
        return _json_object(self.config_path)

    def read_state(self) -> dict[str, Any] | None:
        """The controller state, or None before the first evaluation finished."""
        if not self.state_path.exists():
            return None
        return _json_object(self.state_path)

    def write_state(self, state: dict[str, Any], *, durable: bool = True) -> None:
        """Replace state.json atomically; only the search holding the lock may."""
        if self._lock_file is None:
            raise RuntimeError(f"{self.path}: write_state needs the lock (open with lock=True)")
        # One line: state.json is rewritten after every finished candidate, and indenting
        # takes json's pure-Python encoder, milliseconds a write.
        atomic_write_json(self.state_path, state, durable=durable, indent=None)


def _config_text(config: dict[str, Any], path: Path) -> str:
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, not {type(config).__name__}")
    try:
        return json.dumps(config, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise EvonasError(f"{path}: the configuration cannot be stored as JSON ({err}); "
                          f"check the search options") from None


def _json_object(path: Path) -> dict[str, Any]:
    value = read_json(path)
    if not isinstance(value, dict):
        raise EvonasError(f"{path}: expected a JSON object, found {type(value).__name__}; "
                          f"restore the file from a copy or start a new run folder")
    return value
