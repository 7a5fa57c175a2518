"""The TinyStories sample that ships inside the package (tinystories_cli/bundled/): the text `tslm quickstart`
learns from when the download cannot start (no network). Its licence and source note sit next to it.

The file is read through importlib.resources, so it works from a wheel or an editable install, and both its
compressed and its decompressed SHA-256 are checked on every read: a damaged install is an error, never a
silently different text.
"""

from __future__ import annotations

import hashlib
import lzma
from importlib import resources
from pathlib import Path

from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write_bytes, sha256_file

RESOURCE = "tinystories_sample.txt.xz"
LICENSE = "LICENSE-CDLA-Sharing-1.0.txt"
SOURCE_NOTE = "SOURCE.md"
XZ_SHA256 = "61fb40d1efcdd43a287c4c089675c740d9d146c2af43ba0a53b0c2b1cce64d42"
TEXT_SHA256 = "56a666d71906f8332d136880732fecc60f43d0e02b8f183c0904af34072b450c"
TEXT_SIZE = 5_150_533
FILE_NAME = "tinystories_sample.txt"   # what `extract_sample` writes


def bundled(name: str = RESOURCE):
    """The packaged file `name` (an importlib.resources Traversable)."""
    return resources.files("tinystories_cli").joinpath("bundled", name)


def read_sample() -> bytes:
    """The sample's text, decompressed and verified."""
    try:
        packed = bundled().read_bytes()
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"the bundled TinyStories sample is missing from this install ({e})",
                        "reinstall tslm (pip install --force-reinstall tslm)") from None
    if hashlib.sha256(packed).hexdigest() != XZ_SHA256:
        raise UserError("the bundled TinyStories sample is damaged (sha256 mismatch)", "reinstall tslm")
    try:
        text = lzma.decompress(packed, format=lzma.FORMAT_XZ, memlimit=32 << 20)
    except lzma.LZMAError as e:
        raise UserError(f"the bundled TinyStories sample is damaged ({e})", "reinstall tslm") from None
    if len(text) != TEXT_SIZE or hashlib.sha256(text).hexdigest() != TEXT_SHA256:
        raise UserError("the bundled TinyStories sample is damaged (text sha256 mismatch)", "reinstall tslm")
    return text


def extract_sample(dest: str | Path) -> tuple[Path, str]:
    """Write the sample's text to `dest` (atomically); skipped when `dest` already holds it.
    Returns (dest, "skipped" | "done")."""
    dest = Path(dest)
    if (dest.is_file() and not dest.is_symlink() and dest.stat().st_size == TEXT_SIZE
            and sha256_file(dest) == TEXT_SHA256):
        return dest, "skipped"
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, read_sample())
    return dest, "done"
