"""backend="auto"'s decisions, in memory and in a JSON file under the user's cache directory.

The file: $RESASPP_CACHE_DIR, else $XDG_CACHE_HOME/resaspp_ops, else ~/.cache/resaspp_ops, then FILE_NAME:

    {"format": FORMAT, "environments": {environment text: {key text: decision}}}

The environment text names the package, torch, Triton and CUDA versions and a fingerprint of the kernels
(key.environment()); each key names the GPU. The file keeps the KEPT_ENVIRONMENTS most recent environments.
A process reads the file once, at its first decision, and uses only its own environment's entries. A file
that cannot be read or is not of this format is ignored with one warning (never an error): the process
then measures, and its next write replaces the file.

Writes are atomic and merge: under an exclusive lock on FILE_NAME + ".lock" (fcntl; without it, on platforms
that lack fcntl, the merge can lose a concurrent writer's entry, never corrupt the file), the file is read
again, the new decisions merged in, and the result written to a temporary file in the same directory that
os.replace puts in place. Readers never lock: they see the old file or the new one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

from resaspp_ops.autotune.decision import CACHE, Decision
from resaspp_ops.autotune.key import environment

FILE_NAME = "auto-decisions-v1.json"
FORMAT = "resaspp_ops backend=auto decisions"
# Environments the file keeps (each upgrade, or kernel edit of an editable install, starts one): the most recent.
KEPT_ENVIRONMENTS = 8


def cache_dir() -> Path:
    """Where the decisions file lives (see the module's docstring)."""
    explicit = os.environ.get("RESASPP_CACHE_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "resaspp_ops"


def cache_path() -> Path:
    return cache_dir() / FILE_NAME


class UnreadableCache(Exception):
    """The file exists but is not a decisions file of this format."""


def _read(path: Path) -> dict:
    """The file's environments ({} where there is no file); UnreadableCache for anything else."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise UnreadableCache(f"cannot read it ({exc})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UnreadableCache(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("environments"), dict):
        raise UnreadableCache(f"not a {FORMAT!r} file")
    environments = doc["environments"]
    if not all(isinstance(v, dict) for v in environments.values()):
        raise UnreadableCache("an environment's entry is not an object")
    return environments


def _parse(entries: dict, strict: bool = True) -> dict[str, Decision]:
    """{key text: Decision}; a malformed decision raises UnreadableCache (strict) or is left out."""
    decisions = {}
    for text, record in entries.items():
        try:
            decision = Decision.from_dict(record)
            if decision.key.text() != text:
                raise ValueError(f"filed under another key ({text!r})")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if strict:
                raise UnreadableCache(f"a malformed decision ({type(exc).__name__}: {exc})") from None
            continue
        decisions[text] = decision.with_source(CACHE)
    return decisions


def _newest(environments: dict, count: int) -> dict:
    """The `count` environments whose latest decision is the most recent (ISO times sort as text)."""
    def latest(entries: dict) -> str:
        return max((str(d.get("measured_at", "")) for d in entries.values() if isinstance(d, dict)), default="")

    kept = sorted(environments, key=lambda env: latest(environments[env]), reverse=True)[:count]
    return {env: environments[env] for env in environments if env in kept}


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on path + ".lock" where fcntl exists (see the module's docstring)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_merged(path: Path, decisions: dict[str, Decision]) -> None:
    """Merges `decisions` (this environment's) into the file, atomically (see the module's docstring).
    OSError where the directory cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        try:
            environments = _read(path)
        except UnreadableCache:
            environments = {}  # already warned about when it was loaded; replaced now
        # This environment's valid decisions (a malformed one would make the file unreadable), then the new ones.
        entries = environments.get(environment(), {})
        mine = {text: entries[text] for text in _parse(entries, strict=False)}
        mine.update({text: d.as_dict() for text, d in decisions.items()})
        environments[environment()] = mine
        doc = {"format": FORMAT, "environments": _newest(environments, KEPT_ENVIRONMENTS)}
        fd, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


class DecisionStore:
    """This process's decisions (made here, or received from rank 0) and its snapshot of the file's.

    Thread-safe: one lock guards both maps and the file."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        """Forgets everything; the file is read again at the next lookup (tests; a new RESASPP_CACHE_DIR)."""
        with self.lock:
            self.decided: dict[str, Decision] = {}
            self.loaded: Optional[dict[str, Decision]] = None
            self.path: Optional[Path] = None
            self.warned_write = False

    def _disk(self) -> dict[str, Decision]:
        if self.loaded is None:
            self.path = cache_path()
            try:
                self.loaded = _parse(_read(self.path).get(environment(), {}))
            except UnreadableCache as exc:
                warnings.warn(f"resaspp_ops: ignoring the backend='auto' cache file {self.path}: {exc}; "
                              "it will be replaced at the next decision", stacklevel=2)
                self.loaded = {}
        return self.loaded

    def lookup(self, text: str, disk: bool = True) -> Optional[Decision]:
        """The decision for a key text: this process's, else (disk) the file's."""
        with self.lock:
            decision = self.decided.get(text)
            if decision is None and disk:
                decision = self._disk().get(text)
            return decision

    def record(self, decision: Decision, persist: bool) -> None:
        """Keeps the decision for this process and, if persist, merges it into the file (a file that cannot be
        written is said once, then the decisions stay in memory)."""
        with self.lock:
            text = decision.key.text()
            self.decided[text] = decision
            if not persist:
                return
            self._disk()
            try:
                write_merged(self.path, {text: decision})
            except OSError as exc:
                if not self.warned_write:
                    self.warned_write = True
                    warnings.warn(f"resaspp_ops: cannot write the backend='auto' cache file {self.path} ({exc}); "
                                  "decisions stay in this process only", stacklevel=2)

    def all(self) -> list[Decision]:
        """Every decision this process knows: the file's (this environment's), then this process's over them."""
        with self.lock:
            merged = dict(self._disk())
            merged.update(self.decided)
            return list(merged.values())
