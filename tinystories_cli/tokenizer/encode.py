"""Whole-file encoding: text file -> `.npy` token file + JSON sidecar, streamed and in parallel.

The token file is a plain `.npy` array of shape (num_tokens,) with dtype uint16 (when every id fits)
or uint32, so `np.load(path, mmap_mode="r")` maps it without reading it. Beside it, `<name>.json`
records what training and evaluation need to trust it:

    {"format_version": 1, "dtype": "uint16", "num_tokens": 1257839, "max_id": 50256,
     "vocab_size": 50257, "fingerprint": "<sha256 of the tokenizer>", "special_tokens": [...],
     "source": "data/tinystories/train.txt", "source_bytes": 5150533, "source_sha256": "...", ...}

`source_bytes` is what bits-per-byte divides by; `fingerprint` lets `train`/`eval` refuse a token
file made by another tokenizer (`tokens.check_token_file`).

Memory stays bounded: the text is read in blocks, encoded (by the backend, see `backends`), and
packed ids are written as they come. With `workers > 1` the file is cut into chunks at places where
cutting cannot change the encoding (`chunking.split_points`); worker processes each read their own
byte ranges and encode them into part files beside the output, and the parent appends the parts in
file order with `os.copy_file_range`, so the output is byte-identical to single-process encoding.
Workers send back two integers per chunk, never ids.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from tinystories_cli import __version__
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import (
    atomic_write,
    atomic_write_text,
    check_input_file,
    check_output_path,
    check_source_outside,
    remove_stale_temps,
    sha256_file,
    temp_prefix,
)
from tinystories_cli.paths import sidecar_path
from tinystories_cli.tokenizer.backends import PackedEncoder, refused
from tinystories_cli.tokenizer.chunking import WorkerPool, encode_cuts_safe, split_points  # noqa: F401  (split_points: re-exported)
from tinystories_cli.tokenizer.tokenizer import Tokenizer
from tinystories_cli.tokens import FORMAT_VERSION  # the sidecar format, read by tokens.load_token_file

HEADER_BYTES = 128  # a .npy v1.0 header for shape (n,) is 128 bytes for every n below 10**20
BLOCK_BYTES = 1 << 20  # bytes read per block
MIN_PARALLEL_BYTES = 1 << 20  # below this, worker start-up costs more than it saves

# progress(bytes_done, tokens_done), both cumulative
Progress = Callable[[int, int], None]

# --------------------------------------------------------------------------- the .npy container


def npy_header(dtype: np.dtype, num_tokens: int) -> bytes:
    """The fixed-size (128-byte) .npy header of a 1-D array, so it can be rewritten in place at the end.

    >>> len(npy_header(np.dtype("<u2"), 0)), len(npy_header(np.dtype("<u4"), 10**15))
    (128, 128)
    """
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (int(num_tokens),)})
    header = buf.getvalue()
    if len(header) != HEADER_BYTES:  # pragma: no cover - only for absurd sizes
        raise ValueError(f"unexpected .npy header size {len(header)}")
    return header


# --------------------------------------------------------------------------- reading text


def _utf8_tail(block: bytes) -> int:
    """Index where an incomplete UTF-8 character at the end of `block` starts (len(block) if none).

    >>> _utf8_tail("aé".encode()[:-1]), _utf8_tail(b"ab")
    (1, 2)
    """
    n = len(block)
    for back in range(1, min(4, n) + 1):
        c = block[n - back]
        if c < 0x80:
            return n  # ASCII: nothing incomplete
        if c >= 0xC0:  # a lead byte: how long is its sequence?
            need = 2 if c < 0xE0 else 3 if c < 0xF0 else 4
            return n - back if need > back else n
    return n  # only continuation bytes: invalid anyway, decode reports it


def iter_text(path: Path, start: int, end: int, errors: str = "strict", block_bytes: int = BLOCK_BYTES,
              on_block: Callable[[bytes], None] | None = None) -> Iterator[str]:
    """Decoded text of bytes [start, end) of `path`, in blocks, never splitting a UTF-8 character.

    Invalid UTF-8 raises UserError naming the absolute byte offset (unless errors="replace").
    `on_block` sees each raw block (used to hash the file while reading it).
    """
    with open(path, "rb") as f:
        f.seek(start)
        pos = start  # absolute offset of `carry`'s first byte
        carry = b""
        while pos + len(carry) < end:
            block = f.read(min(block_bytes, end - pos - len(carry)))
            if not block:
                break
            if on_block is not None:
                on_block(block)
            data = carry + block
            at_end = pos + len(data) >= end
            cut = len(data) if at_end else _utf8_tail(data)
            yield _decode(data[:cut], errors, path, pos)
            pos += cut
            carry = data[cut:]
        if carry:
            yield _decode(carry, errors, path, pos)


def _decode(data: bytes, errors: str, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not valid UTF-8: bad byte 0x{data[e.start]:02x} at byte offset {offset + e.start}",
            "fix the file, or pass `errors` replace to replace bad bytes with U+FFFD",
        ) from None


# --------------------------------------------------------------------------- splitting for workers


def parallel_safe(tokenizer: Tokenizer) -> bool:
    """Whether `split_points` cuts are safe for this tokenizer (no special token holds a space or newline)."""
    return encode_cuts_safe(tokenizer.special_tokens)


# --------------------------------------------------------------------------- encoding


def _encode_range(encoder: PackedEncoder, path: Path, start: int, end: int, out, errors: str,
                  on_block: Callable[[bytes], None] | None = None,
                  on_batch: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Encode bytes [start, end) of `path`, writing packed ids to `out`; returns (num_tokens, max_id)."""
    dtype = encoder.tokenizer.dtype
    n, max_id = 0, -1
    for packed in encoder.packed_batches(iter_text(path, start, end, errors, on_block=on_block)):
        if not packed:
            continue
        out.write(packed)
        k = len(packed) // dtype.itemsize
        n += k
        max_id = max(max_id, int(np.frombuffer(packed, dtype=dtype).max()))
        if on_batch is not None:
            on_batch(k)
    return n, max_id


_WORKER_ENCODER: PackedEncoder | None = None


def _worker_init(encoder: PackedEncoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _worker(task: tuple[str, int, int, str, str]) -> tuple[int, int]:
    """Encode one chunk into its part file (runs in a worker process); returns (num_tokens, max_id)."""
    path, start, end, part, errors = task
    assert _WORKER_ENCODER is not None
    with open(part, "wb") as out:
        return _encode_range(_WORKER_ENCODER, Path(path), start, end, out, errors)


def append_file(dst, src_path: str | os.PathLike) -> None:
    """Append the file at `src_path` to the open file `dst`, in the kernel (copy_file_range) where possible."""
    dst.flush()
    dst.seek(0, os.SEEK_END)
    with open(src_path, "rb", buffering=0) as s:  # unbuffered: its offset is the kernel's
        left = os.fstat(s.fileno()).st_size
        try:
            while left > 0:
                k = os.copy_file_range(s.fileno(), dst.fileno(), left)
                if k == 0:
                    break
                left -= k
        except (AttributeError, OSError) as e:  # no copy_file_range here (old kernel, other OS, other FS)
            if isinstance(e, OSError) and e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        dst.seek(0, os.SEEK_END)  # resynchronize the buffered file with the kernel's offset
        shutil.copyfileobj(s, dst, 1 << 22)  # whatever copy_file_range did not copy


def encode_file(
    src: str | os.PathLike,
    out: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    workers: int = 1,
    errors: str = "strict",
    force: bool = False,
    progress: Progress | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    chunks_per_worker: int = 8,
    backend: str = "auto",
) -> dict:
    """Encode the UTF-8 text file `src` into the token file `out` (.npy) and its JSON sidecar.

    Returns the sidecar dict. `workers > 1` encodes chunks in parallel processes (same output).
    `backend` is "auto" (tiktoken when installed and it gives the same ids, else the from-scratch
    encoder), "python" or "tiktoken" (see `backends`); every backend writes the same file.
    Refuses to overwrite `out` or its sidecar unless `force`.
    """
    src, out, side = _check_paths(src, out, errors, tokenizer_dir, force)
    size = src.stat().st_size
    points = [0, size]
    if workers > 1 and size >= MIN_PARALLEL_BYTES and parallel_safe(tokenizer):
        points = split_points(src, workers * max(1, chunks_per_worker))
    used = 1 if len(points) <= 2 else min(workers, len(points) - 1)
    # ValueError for an unknown or unusable backend. In parallel, tiktoken starts on the quick conditions
    # while the parent runs the costly one beside the workers (`backends.tiktoken_unfit`); its verdict
    # decides at the end. (In one process a thread would not help: the GIL hand-offs cost more.)
    encoder = PackedEncoder(tokenizer, backend, defer_check=used > 1)
    t0 = time.perf_counter()
    with atomic_write(out, "wb") as f:
        f.write(npy_header(tokenizer.dtype, 0))  # placeholder; rewritten once the count is known
        num_tokens, max_id, digest, unfit = _encode(encoder, src, points, f, out.parent, errors, used, progress)
        if unfit is not None:  # tiktoken would not give our ids after all
            if backend == "tiktoken":
                raise refused(unfit)
            encoder = PackedEncoder(tokenizer, "python")  # start over with the reference encoder
            f.seek(HEADER_BYTES)
            f.truncate()
            num_tokens, max_id, digest, unfit = _encode(encoder, src, points, f, out.parent, errors, used, progress)
        f.seek(0)
        f.write(npy_header(tokenizer.dtype, num_tokens))
        f.seek(0, os.SEEK_END)
        # The sidecar marks the pair complete: an old one goes just before the new tokens take the name, so
        # a kill in between leaves a token file without a sidecar (refused by every reader), never new
        # tokens described by the old sidecar.
        side.unlink(missing_ok=True)
    meta = {
        **_token_meta(tokenizer, num_tokens, max_id, tokenizer_dir), "source": str(src), "source_bytes": size,
        "source_sha256": digest, "errors": errors, "bytes_per_token": size / num_tokens if num_tokens else None,
        "workers": used, "backend": encoder.backend, "chunks": len(points) - 1,
        "seconds": round(time.perf_counter() - t0, 3), "tslm_version": __version__,
    }
    atomic_write_text(side, json.dumps(meta, indent=2) + "\n")
    return meta


def _check_paths(src, out, errors: str, tokenizer_dir, force: bool) -> tuple[Path, Path, Path]:
    """(text file, token file, its sidecar), checked before anything is read or written; removes the temporary
    files a killed encode left beside the output."""
    if errors not in ("strict", "replace"):
        raise UserError(f"`errors` must be strict or replace, got {errors!r}")
    src = check_input_file(src, "text file", "check the path, or run `tslm download` first")
    out = Path(out)
    side = sidecar_path(out)
    if out.suffix != ".npy":
        raise UserError(f"token file must end in .npy: {out}", "choose an `out` path ending in .npy")
    check_source_outside(src, [out, side], "the text to encode")
    if tokenizer_dir is not None:
        check_source_outside(tokenizer_dir, [out, side], "the tokenizer")
    check_output_path(out, force)
    check_output_path(side, force)
    remove_stale_temps(out.parent)  # what a killed encode left beside its output
    return src, out, side


def _token_meta(tokenizer: Tokenizer, num_tokens: int, max_id: int, tokenizer_dir) -> dict:
    """The sidecar's description of the tokens (the keys before "source")."""
    return {
        "format_version": FORMAT_VERSION,
        "dtype": tokenizer.dtype.name,
        "num_tokens": num_tokens,
        "max_id": max_id,
        "vocab_size": tokenizer.vocab_size,
        "fingerprint": tokenizer.fingerprint,
        "special_tokens": tokenizer.special_tokens,
        "eot_id": tokenizer.eot_id,
        "tokenizer_dir": str(tokenizer_dir) if tokenizer_dir is not None else None,
    }


def _encode(encoder: PackedEncoder, src: Path, points: list[int], f, tmp_parent: Path, errors: str, workers: int,
            progress: Progress | None) -> tuple[int, int, str, str | None]:
    """(num_tokens, max_id, sha256 of the source, `encoder.verify()`) after writing the ids of `src` to `f`."""
    if len(points) <= 2:
        return _encode_serial(encoder, src, points[-1], f, errors, progress)
    return _encode_parallel(encoder, src, points, f, tmp_parent, errors, workers, progress)


def _encode_serial(encoder: PackedEncoder, src: Path, size: int, f, errors: str,
                   progress: Progress | None) -> tuple[int, int, str, str | None]:
    """One process: read, hash and encode in blocks."""
    h = hashlib.sha256()
    done = {"bytes": 0, "tokens": 0}

    def on_block(block: bytes) -> None:
        h.update(block)
        done["bytes"] += len(block)

    def on_batch(k: int) -> None:
        done["tokens"] += k
        if progress is not None:
            progress(done["bytes"], done["tokens"])

    n, max_id = _encode_range(encoder, src, 0, size, f, errors, on_block=on_block, on_batch=on_batch)
    if progress is not None:
        progress(size, n)
    return n, max_id, h.hexdigest(), encoder.verify()


def _encode_parallel(
    encoder: PackedEncoder,
    src: Path,
    points: list[int],
    f,
    tmp_parent: Path,
    errors: str,
    workers: int,
    progress: Progress | None,
) -> tuple[int, int, str, str | None]:
    """`workers` processes encode the chunks [points[i], points[i+1]) into part files, in file order;
    the parent appends each finished part to `f` in order (in the kernel) and deletes it, and hashes
    the source meanwhile. Workers return two integers per chunk, never ids; the parent encodes nothing
    (so no cache is warmed twice). With fork, what the encoder prepared (tiktoken's tables) is shared.
    The last value returned is `encoder.verify()`, also run beside the workers.
    """
    tmpdir = tempfile.mkdtemp(prefix=temp_prefix("encode-parts"), dir=tmp_parent)  # same disk as the output
    digest: dict[str, str] = {}
    verdict: dict[str, str | None] = {"unfit": "the full check did not finish"}

    def hash_source() -> None:
        digest["sha"] = sha256_file(src)
        _ = encoder.tokenizer.fingerprint  # the sidecar needs it: computed while the workers encode
        verdict["unfit"] = encoder.verify()

    try:
        encoder.prepare()
        tasks = [(str(src), a, b, os.path.join(tmpdir, f"{i:06d}.bin"), errors)
                 for i, (a, b) in enumerate(zip(points[:-1], points[1:]))]
        num_tokens, max_id, done_bytes = 0, -1, 0
        with WorkerPool(workers, _worker_init, (encoder,)) as pool:
            hasher = threading.Thread(target=hash_source, daemon=True)
            hasher.start()  # after the workers exist (fork), overlapping with encoding
            for (_path, a, b, part, _), (n, m) in zip(tasks, pool.imap(_worker, tasks)):
                append_file(f, part)
                os.unlink(part)
                num_tokens += n
                max_id = max(max_id, m)
                done_bytes += b - a
                if progress is not None:
                    progress(done_bytes, num_tokens)
            hasher.join()
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return num_tokens, max_id, digest["sha"], verdict["unfit"]


# --------------------------------------------------------------------------- reading token files







