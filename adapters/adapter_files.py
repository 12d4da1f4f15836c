"""Where adapter files may be read from, and reading them without leaving that place.

In: a client- or operator-given adapter path and, for runtime loading, the adapter root. Out: an
`AdapterDir` (the resolved directory plus how to name it to clients) and the bytes of its files.
With a root, the directory *and every file read from it* must resolve (after symlinks) inside the
root, else `AdapterError` 403; a file is resolved, checked, then opened by its resolved path with
O_NOFOLLOW, and on Linux the opened descriptor's real path is checked again, so swapping a symlink
in between cannot redirect the read. Messages name paths relative to the root, never an absolute
server path. Without a root (`--lora-modules`, operator-given) paths are trusted and shown as given.
This module does not parse what it reads (adapters/peft_format.py does).
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import AdapterError, bad_adapter

OUTSIDE_ROOT = "lora_path must be inside the adapter root"
_MAX_SHOWN = 200  # characters of a client-given path echoed back in a message
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class AdapterDir:
    """A resolved adapter directory; `root` is the resolved adapter root, or None (trusted path)."""

    path: Path
    root: Path | None
    shown: str  # how messages name the directory: relative to the root, or the path as given

    def show(self, name: str) -> str:
        """How messages name file `name` of this directory."""
        return name if self.shown == "." else f"{self.shown}/{name}"

    def read(self, name: str, max_bytes: int | None = None) -> bytes | None:
        """The bytes of file `name` of the directory, or None if there is no such entry.

        Raises:
            AdapterError: 403 if the file resolves outside the root; 400 if it is not a readable
                regular file (a directory, a FIFO, a symlink loop, ...) or is over `max_bytes`.
        """
        target, shown = self.path / name, self.show(name)
        if not os.path.lexists(target):
            return None
        resolved = _confine(self.root, target, shown) if self.root is not None else _resolve(target, shown)
        try:
            fd = os.open(resolved, _OPEN_FLAGS)
        except OSError as exc:
            raise bad_adapter(f"{shown}: cannot open ({_reason(exc)})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise bad_adapter(f"{shown}: is not a regular file")
            if self.root is not None and not _inside(self.root, _opened_path(fd, resolved)):
                raise AdapterError(f"{OUTSIDE_ROOT} ({shown} changed while it was opened)", 403, "lora_path")
            if max_bytes is not None and info.st_size > max_bytes:
                raise bad_adapter(f"{shown}: {info.st_size} bytes is over the {max_bytes}-byte limit")
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read()
        except OSError as exc:
            raise bad_adapter(f"{shown}: cannot read ({_reason(exc)})") from None
        finally:
            os.close(fd)


def open_adapter_dir(path: str | Path, root: Path | None = None) -> AdapterDir:
    """Resolve an adapter directory; with `root`, a relative `path` is taken from the root.

    Raises:
        AdapterError: 403 if it resolves outside `root` (or the root is gone); 400 if it does not
            exist, is not a directory, or cannot be resolved (NUL byte, name too long, symlink loop).
    """
    if "\x00" in str(path):
        raise bad_adapter("lora_path contains a NUL byte")
    given = Path(path)
    if root is None:
        real_root, shown = None, str(given)
        resolved = _resolve(given, shown, kind="adapter directory")
    else:
        real_root = resolve_root(root)
        candidate = given if given.is_absolute() else real_root / given
        resolved = _confine(real_root, candidate, None, kind="adapter directory")
        shown = _relative(real_root, resolved)
    if not resolved.is_dir():
        raise bad_adapter(f"adapter directory {shown} is not a directory")
    return AdapterDir(resolved, real_root, shown)


def resolve_root(root: Path) -> Path:
    """The adapter root, resolved; an unusable root is the server's problem, not the client's."""
    try:
        real = root.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        real = None
    if real is None or not real.is_dir():
        raise AdapterError("the server's adapter root is not an existing directory", 503, "lora_path")
    return real


def _confine(root: Path, candidate: Path, shown: str | None, kind: str = "") -> Path:
    """`candidate` resolved, refusing (403) anything outside `root` before saying whether it exists.

    NOTE: containment is checked before existence, so a client cannot probe which paths exist
    outside the root by comparing 403s with 400s.
    """
    try:
        loose = candidate.resolve()
    except (OSError, RuntimeError, ValueError):  # loops (RuntimeError on 3.11), overlong names
        loose = Path(os.path.normpath(candidate))
    if not _inside(root, loose):
        raise AdapterError(OUTSIDE_ROOT, 403, "lora_path")
    resolved = _resolve(candidate, shown or _relative(root, loose), kind)
    if not _inside(root, resolved):
        raise AdapterError(OUTSIDE_ROOT, 403, "lora_path")
    return resolved


def _resolve(path: Path, shown: str, kind: str = "") -> Path:
    shown = shown if len(shown) <= _MAX_SHOWN else shown[:_MAX_SHOWN] + "..."
    label = f"{kind} {shown}" if kind else shown
    try:
        return path.resolve(strict=True)
    except FileNotFoundError:
        raise bad_adapter(f"{label} does not exist") from None
    except OSError as exc:
        raise bad_adapter(f"{label}: cannot resolve ({_reason(exc)})") from None
    except (RuntimeError, ValueError):  # 3.11 reports some symlink loops as RuntimeError
        raise bad_adapter(f"{label}: cannot resolve (symlink loop or invalid path)") from None


def _inside(root: Path, path: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _relative(root: Path, path: Path) -> str:
    """`path` (inside `root`) as clients see it."""
    return "." if path == root else str(path.relative_to(root))


def _opened_path(fd: int, fallback: Path) -> Path:
    """What `fd` really refers to (Linux /proc); elsewhere the path it was opened by."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return fallback


def _reason(exc: OSError) -> str:
    """The OS reason without the path: str(OSError) names the absolute path, which must not leak."""
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    return os.strerror(exc.errno) if exc.errno else type(exc).__name__
