"""Size checks for NumPy ``.npy``/``.npz`` inputs before NumPy allocates anything.

``np.load`` allocates the array an ``.npy`` header declares and only then reads
the data. Inside an ``.npz`` (a zip) the data are deflated, so a few MB can
declare, and inflate to, gigabytes (a decompression bomb). These checks read
only the headers (the zip directory and each member's ``.npy`` header) and
refuse, naming the file and the member:

* object dtypes (they hold pickles; ``allow_pickle=False`` refuses them too);
* a header declaring more bytes than the file or zip member holds (truncated
  or forged: NumPy would allocate the declared size first);
* more than :func:`max_bytes` in all (``MOE_ATLAS_MAX_NPZ_BYTES``, default 4 GiB);
* a member that inflates more than :data:`MAX_RATIO` times its compressed size
  beyond :data:`RATIO_FLOOR` bytes: routing ids compress about 2-10x, a bomb of
  zeros ~1000x.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..env import env_number
from ._core import TraceError

MAX_RATIO = 100
RATIO_FLOOR = 64 << 20  # below this, any compression ratio is harmless
_DEFAULT_MAX = 4 << 30


def max_bytes() -> int:
    """The limit on the bytes an ``.npy``/``.npz`` may declare (env ``MOE_ATLAS_MAX_NPZ_BYTES``)."""
    return env_number("MOE_ATLAS_MAX_NPZ_BYTES", _DEFAULT_MAX, unit="bytes", minimum=1, parse=int)


def _size(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} bytes"


def _read_header(f, where: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length in bytes) of the ``.npy`` stream ``f`` positioned at its start."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:  # (3, 0): utf-8 field names; same layout as 2.0
            shape, _, dtype = fmt._read_array_header(f, version)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise TraceError(f"{where}: not a valid .npy header ({exc})") from None
    return tuple(int(d) for d in shape), dtype, f.tell()


def _declared(shape, dtype: np.dtype, where: str) -> int:
    if dtype.hasobject:
        raise TraceError(f"{where}: dtype {dtype} holds Python objects (pickles); they are never loaded")
    return int(np.prod(shape, dtype=object)) * dtype.itemsize


def check_npy(path: str | Path) -> None:
    """Refuse an ``.npy`` whose header declares more data than the file holds, or more than :func:`max_bytes`."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        shape, dtype, header = _read_header(f, str(path))
    need = _declared(shape, dtype, str(path))
    if need > size - header:
        raise TraceError(f"{path}: header declares {_size(need)} (shape {list(shape)}, {dtype}) but the file holds "
                         f"{_size(size - header)} of data (truncated or forged)")
    limit = max_bytes()
    if need > limit:
        raise TraceError(f"{path}: array of {_size(need)} (shape {list(shape)}, {dtype}) is over the limit of "
                         f"{_size(limit)}; raise MOE_ATLAS_MAX_NPZ_BYTES to load it")


def check_npz(path: str | Path, members: list[str] | None = None) -> None:
    """Refuse an ``.npz`` whose members (all, or the arrays named in ``members``) would inflate too far.

    Reads the zip directory and each member's ``.npy`` header only; nothing is
    decompressed beyond the header's first bytes.
    """
    path = Path(path)
    limit = max_bytes()
    total = 0
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise TraceError(f"{path}: not a readable .npz (zip) archive ({exc})") from None
    with zf:
        for info in zf.infolist():
            key = info.filename.removesuffix(".npy")
            if members is not None and key not in members:
                continue
            where = f"{path}: member '{info.filename}'"
            try:
                with zf.open(info) as f:
                    shape, dtype, header = _read_header(f, where)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise TraceError(f"{where}: cannot read it ({exc})") from None
            need = _declared(shape, dtype, where)
            if need > info.file_size - header:
                raise TraceError(f"{where}: header declares {_size(need)} (shape {list(shape)}, {dtype}) but the "
                                 f"member holds {_size(max(info.file_size - header, 0))} (truncated or forged)")
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > RATIO_FLOOR and ratio > MAX_RATIO:
                raise TraceError(f"{where}: {_size(info.compress_size)} compressed inflates to "
                                 f"{_size(info.file_size)} ({ratio:.0f}:1, limit {MAX_RATIO}:1): refused as a "
                                 f"decompression bomb")
            total += need
            if total > limit:
                raise TraceError(f"{where}: the archive's arrays declare {_size(total)} so far, over the limit of "
                                 f"{_size(limit)}; raise MOE_ATLAS_MAX_NPZ_BYTES to load it")
