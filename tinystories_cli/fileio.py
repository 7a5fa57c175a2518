"""Small file helpers shared by every command: atomic writes and output-path checks.

Every file tslm writes goes through `atomic_write`: the bytes land in a temporary file in the
same directory, are flushed and fsynced, and only then renamed over the destination (a symlink there is
replaced, never written through), and the directory is fsynced so the rename itself is durable. A crash
or Ctrl-C at any point leaves either the old file or the new one, never half of one; a full disk leaves no
temporary file behind (the OSError names the file; the CLI reports it in one line).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tinystories_cli.errors import UserError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; rename it to `path` on success.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_write(d / "x.txt", "w") as f:
    ...     _ = f.write("hello")
    >>> (d / "x.txt").read_text()
    'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give them normal permissions
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in DISK_FULL and e.filename is None:
            e.filename = str(path)  # so the one-line report can name the file
        raise


def temp_prefix(name: str) -> str:
    """The start of a temporary file's or directory's name: hidden, the name it stands for, and the owner's
    PID, so that a later run can tell a temp whose writer is dead (`remove_stale_temps`).

    >>> temp_prefix("vocab.json") == f".vocab.json.p{os.getpid()}."
    True
    """
    return f".{name}.p{os.getpid()}."


# .NAME.p<pid>.<8 random characters>[.tmp|.old|.txt]: what tempfile.mkstemp/mkdtemp make from `temp_prefix`
_TEMP_RE = re.compile(r"^\..+\.p(\d{1,10})\.[a-z0-9_]{8}(?:\.tmp|\.old|\.txt)?$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike) -> int:
    """Remove what a killed tslm writer left in `directory`: temporary files and directories named by
    `temp_prefix` whose owner process is no longer alive (a live one's, and anything else, stay; links are
    never followed). Returns how many were removed."""
    n = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for e in entries:
        m = _TEMP_RE.match(e.name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            n += 1
        except OSError:
            pass
    return n


# Out of space, over quota, or over the file-size limit (RLIMIT_FSIZE): the CLI reports these in one line.
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or unlink in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def check_output_path(path: str | os.PathLike, force: bool) -> Path:
    """Refuse to overwrite an existing output unless `force` is set."""
    path = Path(path)
    if path.is_dir():  # checked first: a directory is never replaced by a file, --force or not
        raise UserError(f"output {path} is a directory", "pass the path of a file")
    parent = next((p for p in path.parents if p.exists() or p.is_symlink()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"output {path} cannot be written: {parent} is not a directory", "choose another path")
    if path.exists() and not force:
        raise UserError(f"output already exists: {path}", "pass `force` to overwrite it, or choose another `out`")
    return path


def check_input_file(path: str | os.PathLike, what: str = "input file", hint: str | None = None) -> Path:
    """Check that `path` is an existing, non-empty regular file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} not found: {path}", hint or "check the path")
    if path.is_dir():
        raise UserError(f"{what} is a directory, not a file: {path}", "pass the path of a file")
    if path.stat().st_size == 0:
        raise UserError(f"{what} is empty: {path}", "pass a file with content")
    return path


def read_json(path: str | os.PathLike, what: str, fix: str | None = None) -> Any:
    """Parse a JSON file; a syntax or encoding problem is a `UserError` naming `what` and the path."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"malformed {what} {path}: {e}", fix) from None
    except RecursionError:
        raise UserError(f"malformed {what} {path}: nested too deeply", fix) from None


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def is_within(path: str | os.PathLike, target: str | os.PathLike) -> bool:
    """Whether `path` is `target` or lies inside it, once both are resolved (symlinks followed, `..` folded).

    >>> is_within("/a/b/c.txt", "/a/b"), is_within("/a/b", "/a/b"), is_within("/a/bc", "/a/b")
    (True, True, False)
    """
    p, t = os.path.realpath(path), os.path.realpath(target)
    return p == t or p.startswith(t.rstrip(os.sep) + os.sep)


def check_source_outside(source: str | os.PathLike, targets, what: str = "the input",
                         action: str = "overwrite") -> None:
    """The one rule for every command that clears, overwrites or moves something: its input (a file or a
    directory it reads, or keeps) must not be, or lie inside, any of `targets`. Paths are compared once
    resolved, links included. Refuses in one line naming both paths.

    >>> check_source_outside("/data/a.txt", ["/data/out"])
    >>> check_source_outside("/data/out/train.txt", ["/data/out"])
    Traceback (most recent call last):
    tinystories_cli.errors.UserError: this command would overwrite the input /data/out/train.txt (the input): it lies inside /data/out (move the input elsewhere first, or choose another output)
    """  # noqa: E501 (a doctest's expected one-line output)
    if source is None:
        return
    for target in targets:
        if target is not None and is_within(source, target):
            where = "is" if os.path.realpath(source) == os.path.realpath(target) else "lies inside"
            raise UserError(f"this command would {action} the input {source} ({what}): it {where} {target}",
                            "move the input elsewhere first, or choose another output")


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None (JSON's null), recursively; tuples become lists.

    >>> json_safe({"loss": float("nan"), "xs": (1.0, float("inf")), "n": 3})
    {'loss': None, 'xs': [1.0, None], 'n': 3}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def strict_json(obj: Any, **kwargs) -> str:
    """JSON that every parser reads: non-finite numbers as null (`json_safe`), never bare NaN/Infinity.

    >>> strict_json({"ppl": float("inf")})
    '{"ppl": null}'
    """
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)
