"""Where a run computes: the device, the process group (torchrun), autocast, syncs and a peak-FLOPs probe.

    dist = dist_from_env()                  # Dist(rank, local_rank, world_size) from torchrun's variables
    device = pick_device("auto", dist)      # cuda > mps > cpu; each rank takes cuda:LOCAL_RANK
    init_distributed(dist, device)          # NCCL on GPUs, gloo on CPUs (a no-op for one process)
    autocast, note = autocast_factory(device, "bfloat16")
    with autocast(): ...
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from tinystories_cli.errors import UserError


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    return Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(requested: str, dist: Dist | None = None) -> torch.device:
    """`auto` = cuda > mps > cpu; under DDP each rank takes cuda:LOCAL_RANK."""
    dist = dist or Dist()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown device {requested!r}", "use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device cuda was asked for, but CUDA is not available", "use device cpu or auto")
        if dist.enabled:
            device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    elif device.type == "mps" and not mps_available():
        raise UserError("device mps was asked for, but MPS is not available", "use device cpu or auto")
    return device


@contextlib.contextmanager
def deterministic_on_cpu(requested: str) -> Iterator[None]:
    """On the CPU, run with `torch.use_deterministic_algorithms` (restored afterwards).

    With several intra-op threads some CPU kernels accumulate in an order that varies from process to
    process (measured: two fresh 40-step runs of the debug preset on 2 threads differed in the 7th
    digit of the loss at 5 of 40 steps; with one thread, or in this mode, never). The deterministic
    kernels make `N steps + resume N steps` equal `2N steps` bit for bit across processes, and the one
    that matters here (the embedding's index_put backward) is no slower. GPUs keep the fast kernels.
    """
    auto = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    try:
        kind = torch.device(auto if requested == "auto" else requested).type
    except RuntimeError:
        kind = "unknown"  # pick_device reports it
    if kind != "cpu":
        yield
        return
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


def init_distributed(dist: Dist, device: torch.device) -> None:
    """Join the process group of a torchrun job (NCCL on GPUs, gloo on CPUs); a no-op for one process."""
    if dist.enabled and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=dist.rank, world_size=dist.world_size)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (for timing); CPU work is already done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# CPU features that compute bf16 natively (dot products of bf16 pairs accumulated in fp32): there bf16
# autocast runs the matmuls at about twice the fp32 rate; without them it only adds conversions.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    r"""The feature flags of this CPU (from /proc/cpuinfo on Linux; empty elsewhere or when unreadable).

    >>> sorted(cpu_flags("processor : 0\nflags : fpu avx512f avx512_bf16\n"))
    ['avx512_bf16', 'avx512f', 'fpu']
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                cpuinfo = f.read(1 << 20)
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_native_bf16(flags: set[str] | None = None) -> bool:
    """Whether this CPU has bf16 arithmetic units (AVX512-BF16 or AMX-BF16).

    >>> cpu_native_bf16({"avx512f", "avx512_bf16"}), cpu_native_bf16({"avx512f", "avx2"})
    (True, False)
    """
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_CPU_FLAGS)


def bf16_supported(device: torch.device) -> bool:
    """bf16 that pays: a CUDA GPU with bf16, or a CPU with native bf16 units (`cpu_native_bf16`)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_native_bf16()


def choose_dtype(requested: str, device: torch.device) -> str:
    """The compute dtype a run uses: `auto` is bfloat16 autocast where bf16 is native (a CUDA GPU with
    bf16, nanoGPT's default; a CPU with AVX512-BF16 or AMX), float32 elsewhere (MPS and older CPUs stay
    exact unless asked); explicit choices stand. Weights, optimizer state and the loss stay float32."""
    if requested != "auto":
        return requested
    return "bfloat16" if bf16_supported(device) else "float32"


# torch.compile on a CPU: measured on the reference model (d_model 128 x 4, batch 16 x 256, 2 cores,
# tests/benchmarks/RESULTS.md "torch.compile on this CPU") a cold compile costs about 21 s and then runs
# 1.40x eager, so it pays back after about 21 / (1 - 1 / 1.4) = 73 s of training. Below this much expected
# training time `auto` stays eager (test-sized runs never wait for a compiler).
COMPILE_PAYS_AFTER_S = 90.0


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would use ($CXX, else c++, g++ or clang++), or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def choose_compile(requested: bool | None, device: torch.device, expected_seconds: float | None = None) -> bool:
    """Whether to torch.compile: explicit choices stand; `auto` (None) compiles on CUDA (a failure falls
    back to eager), on a CPU only where a C++ compiler is found and the run is expected to train at least
    `COMPILE_PAYS_AFTER_S` seconds (the compile pays back), and never on MPS.

    >>> cpu = torch.device("cpu")
    >>> choose_compile(None, cpu), choose_compile(True, cpu), choose_compile(None, cpu, expected_seconds=10)
    (False, True, False)
    """
    if requested is not None:
        return requested
    if device.type == "cuda":
        return True
    return (device.type == "cpu" and expected_seconds is not None and expected_seconds >= COMPILE_PAYS_AFTER_S
            and cxx_compiler() is not None)


def use_fast_fp32_matmul(device: torch.device) -> str:
    """On CUDA, what stays float32 runs its matmuls as TF32 ("high" precision); returns the precision in effect."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    return torch.get_float32_matmul_precision()


# glibc's mallopt() parameters (<malloc.h>)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP_FREED_APPLIED = False


def keep_freed_cpu_memory(device: torch.device) -> bool:
    """On a CPU under glibc, keep the memory a training step frees for the next step; returns whether it applies.

    Every step allocates and frees the same activation buffers. glibc hands out blocks over its mmap
    threshold (32 MiB at most) as fresh mmap()s and unmaps them on free, and trims the heap's top, so
    each step faults in and zero-fills its largest buffers again: at tinystories-17m's batch of 64 x 256
    that was a third of the step. With mmap off for malloc (M_MMAP_MAX 0: a block that cannot come from
    the heap still falls back to mmap) and no trimming, freed blocks are reused. The cost: the process
    keeps its peak memory until it exits, as a caching allocator does. Process-wide; applied once.
    """
    global _KEEP_FREED_APPLIED
    if device.type != "cpu" or os.name != "posix" or platform.libc_ver()[0] != "glibc":
        return False
    if not _KEEP_FREED_APPLIED:
        libc = ctypes.CDLL(None)
        _KEEP_FREED_APPLIED = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _KEEP_FREED_APPLIED


def autocast_factory(device: torch.device, dtype: str) -> tuple[Callable, str | None]:
    """A context-manager factory for the chosen compute dtype, and a note when it falls back."""
    if dtype == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return contextlib.nullcontext, "this GPU has no bfloat16: training in float32"
        if device.type in ("cuda", "cpu", "mps"):
            return (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)), None
    if dtype == "float16" and device.type in ("cuda", "cpu", "mps"):
        return (lambda: torch.autocast(device_type=device.type, dtype=torch.float16)), None
    return contextlib.nullcontext, None


def measure_peak_tflops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """A measured stand-in for the hardware peak: the best of a few large matmuls (TFLOP/s)."""
    n = 4096 if device.type == "cuda" else 1024
    # Values do not matter for timing; a private generator keeps the training RNG stream untouched.
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.rand(n, n, device=device, generator=g).to(dtype)
    b = torch.rand(n, n, device=device, generator=g).to(dtype)
    best = float("inf")
    for _ in range(4):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def broadcast_str(text: str, device: torch.device, max_bytes: int = 4096) -> str:
    """Rank 0's string on every rank (as a byte tensor: no pickling)."""
    data = text.encode("utf-8")[:max_bytes]
    buf = torch.zeros(max_bytes, dtype=torch.uint8)
    buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else buf[:0]
    packed = torch.cat([torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8), buf]).to(device)
    torch.distributed.broadcast(packed, src=0)
    packed = packed.cpu()
    n = int(packed[:8].view(torch.int64).item())
    return bytes(packed[8:8 + n].tolist()).decode("utf-8")
