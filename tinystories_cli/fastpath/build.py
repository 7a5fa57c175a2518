"""Compile decode.c once per machine and load it with ctypes.

The shared library is cached under `$TSLM_KERNEL_CACHE`, else `$XDG_CACHE_HOME/tslm/kernels`, else
`~/.cache/tslm/kernels`, named by a hash of the source, the compiler's version, the flags and the
CPU's feature flags (the build targets `-march=native`, so another CPU gets its own build). The
compiler writes a temporary file that is renamed into place, so concurrent first uses never load a
half-written library. Any failure (no compiler, a compile error, a library that does not load) is
reported as `KernelUnavailable` with one line saying why; callers then fall back to torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

SOURCE = Path(__file__).with_name("decode.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
ABI_VERSION = 3

_loaded: dict[str, ctypes.CDLL] = {}
# seconds the last build took in this process (0.0 when the cached library was used); for benchmarks
last_build_seconds: float | None = None


class KernelUnavailable(RuntimeError):
    """The C decode kernel cannot be built or loaded here (the message says why, in one line)."""


def cache_dir() -> Path:
    if os.environ.get("TSLM_KERNEL_CACHE"):
        return Path(os.environ["TSLM_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tslm" / "kernels"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _build_key(cc: str) -> str:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"the C compiler {cc} does not run: {e}") from None
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(FLAGS).encode(),
                 " ".join(sorted(cpu_flags())).encode(), platform.machine().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def library_path() -> Path:
    """Where the library for this source/compiler/CPU lives (built or not)."""
    cc = compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler found (install gcc or clang, or set CC)")
    return cache_dir() / f"tslm_decode_{_build_key(cc)}.so"


def build() -> Path:
    """The compiled library's path, compiling it first if the cache does not hold it."""
    global last_build_seconds
    path = library_path()
    if path.is_file():
        last_build_seconds = 0.0
        return path
    cc = compiler()
    assert cc is not None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelUnavailable(f"cannot create the kernel cache {path.parent}: {e}") from None
    t0 = time.perf_counter()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=300)
        if r.returncode:
            first = (r.stderr.strip().splitlines() or ["(no output)"])[0]
            raise KernelUnavailable(f"compiling the decode kernel with {cc} failed: {first}")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"compiling the decode kernel with {cc} failed: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    last_build_seconds = time.perf_counter() - t0
    return path


def load() -> ctypes.CDLL:
    """The kernel library, built if needed and loaded once per process."""
    path = str(build())
    lib = _loaded.get(path)
    if lib is None:
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            raise KernelUnavailable(f"the decode kernel {path} does not load: {e}") from None
        if lib.tslm_abi_version() != ABI_VERSION:
            raise KernelUnavailable(f"the decode kernel {path} has ABI {lib.tslm_abi_version()}, expected "
                                    f"{ABI_VERSION}; delete it")
        _loaded[path] = lib
    return lib
