"""The agent's durable state: queued and applied releases, written atomically to the state dir.

Everything the agent keeps (command results hold `docker.inspect` output, registries hold
passwords) is for the agent alone: files mode 0600, directories 0700.
"""
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_FILE = 0o600
PRIVATE_DIRECTORY = 0o700


def private_directory(path: Path) -> Path:
    """Create `path` (mode 0700), or tighten it to 0700 if it exists more open; returns it."""
    path = Path(path)
    path.mkdir(mode=PRIVATE_DIRECTORY, parents=True, exist_ok=True)
    try:
        if path.stat().st_mode & 0o777 != PRIVATE_DIRECTORY:
            os.chmod(path, PRIVATE_DIRECTORY)
    except OSError as exc:  # not ours to change (a directory given by the operator): say so, go on
        log.warning("cannot make %s private (mode 0700): %s", path, exc)
    return path


def open_private_append(path: Path):
    """`path` opened for appending in binary, created mode 0600 (and tightened to it if it exists)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE)
    try:
        os.fchmod(descriptor, PRIVATE_FILE)
        return os.fdopen(descriptor, "ab")
    except BaseException:
        os.close(descriptor)
        raise


def create_private_file(path: Path):
    """Make sure `path` exists with mode 0600 (before a library such as SQLite creates it with its own)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE))
    os.chmod(path, PRIVATE_FILE)


def write_atomically(path: Path, data: bytes, mode: int = PRIVATE_FILE):
    """Write tmp, fsync, rename, fsync the directory: after a power loss the file is old or new, never torn."""
    path.parent.mkdir(mode=PRIVATE_DIRECTORY, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_json(path: Path):
    """The JSON in `path`, or None when it is missing or unreadable (logged, never fatal)."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("ignoring unreadable state file %s: %s", path, exc)
        return None


class ReleaseQueue:
    """Per project: the release message waiting to be applied, and the release last applied.

    Layout: `<state_dir>/projects/<project_id>/queued.json` and `applied.json`, and `seq.json`:
    the highest release seq accepted for the project.
    """

    def __init__(self, state_dir: Path):
        private_directory(state_dir)
        self.root = private_directory(Path(state_dir) / "projects")
        self._lock = threading.Lock()

    def _path(self, project_id: int, name: str) -> Path:
        return self.root / str(int(project_id)) / name

    def put(self, message: dict) -> bool:
        """Queue a release message (a newer one replaces the queued one). False if nothing changed."""
        project_id = message["project_id"]
        with self._lock:
            if self.queued(project_id) == message:
                return False
            if message["release"] is not None and _same_release(self.applied(project_id), message["release"]):
                # Already running it: drop any older queued release, nothing to apply.
                self._path(project_id, "queued.json").unlink(missing_ok=True)
                return False
            write_atomically(self._path(project_id, "queued.json"), json.dumps(message).encode())
            return True

    def queued(self, project_id: int) -> dict | None:
        return read_json(self._path(project_id, "queued.json"))

    def applied(self, project_id: int) -> dict | None:
        return read_json(self._path(project_id, "applied.json"))

    def pending(self) -> list[dict]:
        """Every queued message, by project id."""
        messages = []
        for directory in sorted(self.root.iterdir(), key=lambda p: (len(p.name), p.name)):
            message = read_json(directory / "queued.json")
            if message is not None:
                messages.append(message)
        return messages

    def mark_applied(self, message: dict, succeeded: bool):
        """Record the outcome and drop the queued message, unless a newer one arrived meanwhile."""
        project_id = message["project_id"]
        with self._lock:
            if succeeded:
                applied = self._path(project_id, "applied.json")
                if message["release"] is None:
                    applied.unlink(missing_ok=True)
                else:
                    write_atomically(applied, json.dumps(message["release"]).encode())
            if self.queued(project_id) == message:
                self._path(project_id, "queued.json").unlink(missing_ok=True)

    def highest_seq(self, project_id: int) -> int | None:
        """The highest release `seq` accepted for the project, None before the first document carrying one."""
        stored = read_json(self._path(project_id, "seq.json"))
        seq = stored.get("seq") if isinstance(stored, dict) else None
        return seq if isinstance(seq, int) else None

    def accept_seq(self, project_id: int, seq: int | None) -> bool:
        """Whether a release document with this seq may be handled; records a higher one first (atomically).

        Lower than the highest seen: an older document (a broker restored from an old snapshot),
        refused. Equal: the same document again, handled as before (queueing it is idempotent).
        None: from a server older than seq, accepted as always.
        """
        if seq is None:
            return True
        with self._lock:
            highest = self.highest_seq(project_id)
            if highest is not None and seq < highest:
                return False
            if highest is None or seq > highest:
                write_atomically(self._path(project_id, "seq.json"), json.dumps({"seq": seq}).encode())
            return True

    def applied_releases(self) -> dict[int, dict]:
        result = {}
        for directory in self.root.iterdir():
            release = read_json(directory / "applied.json")
            if release is not None and directory.name.isdigit():
                result[int(directory.name)] = release
        return result


def _same_release(applied: dict | None, release: dict) -> bool:
    return applied is not None and applied.get("id") == release["id"] and (
        applied.get("version_hash") == release["version_hash"]
    )


class RegistryStore:
    """The private registries the device has been given, so it can log in at start-up.

    `<state_dir>/registries.json`, mode 0600: it holds passwords, readable by the agent only.
    """

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "registries.json"
        self._lock = threading.Lock()

    def all(self) -> dict[int, dict]:
        stored = read_json(self.path)
        if not isinstance(stored, list):
            return {}
        return {r["id"]: r for r in stored if isinstance(r, dict) and isinstance(r.get("id"), int) and r.get("url")}

    def remember(self, registries: list[dict]) -> dict[int, dict]:
        """Add or update registries (by id); returns every registry known afterwards."""
        with self._lock:
            known = self.all()
            merged = {**known, **{r["id"]: dict(r) for r in registries}}
            if merged != known:
                write_atomically(self.path, json.dumps(sorted(merged.values(), key=lambda r: r["id"])).encode())
            return merged
