"""One file per part: the files of a zarr part packed into a zip archive, uncompressed.

Zarr's own :class:`zarr.storage.ZipStore` reads such an archive (``zarr.open_group(ZipStore(path,
mode="r"))``), so a part stays readable by any zarr v3 implementation; we pack and unpack it in
memory. Entries are ``ZIP_STORED`` (the arrays inside are already compressed, and a stored entry
cannot expand), so unpacking a hostile archive allocates at most its own size per entry; anything
else (compressed or encrypted entries, names outside the part, repeated names, more than
:data:`MAX_ENTRIES` entries, sizes past the archive) is refused with the archive's name.
"""

from __future__ import annotations

import io
import zipfile

from logitstore.errors import FormatError

PART_ZIP = "part.zip"
MAX_ENTRIES = 256


def pack(files: dict[str, bytes]) -> bytes:
    """``{relative path: bytes}`` -> one zip archive (entries stored, in sorted order, fixed timestamps)."""
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as z:
        for rel in sorted(files):
            info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            z.writestr(info, files[rel])
    return sink.getvalue()


def unpack(data: bytes, where: str) -> dict[str, bytes]:
    """The files of a zip archive written by :func:`pack` (or any zip of stored entries)."""
    from logitstore.format.manifest import check_relpath

    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        infos = z.infolist()
        if len(infos) > MAX_ENTRIES:
            raise FormatError(f"{where}: {len(infos)} entries, more than the {MAX_ENTRIES} a part may hold")
        out: dict[str, bytes] = {}
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                raise FormatError(f"{where}: entry {info.filename!r} is compressed or encrypted; parts store entries uncompressed")
            if info.file_size > len(data) or info.compress_size != info.file_size:
                raise FormatError(f"{where}: entry {info.filename!r} claims {info.file_size} bytes, more than the archive holds")
            name = check_relpath(info.filename, f"{where}: entry")
            if name in out:
                raise FormatError(f"{where}: entry {name!r} appears twice")
            out[name] = z.read(info)
        return out
    except FormatError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise FormatError(f"{where}: not a valid zip archive ({type(e).__name__}: {e})") from None
