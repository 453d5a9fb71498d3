"""Helpers for tests that inspect or tamper with a store's shard index (version 2 keeps it in
``index/*.parquet``, named with checksums by ``manifest.json``)."""

import json
from pathlib import Path

import numpy as np

import logitstore
from logitstore.format.index_files import write_index
from logitstore.format.manifest import dumps
from logitstore.storage.fsio import StoreFS


def entries(url) -> list[dict]:
    """Every shard of the store with its parts' files, as a list of dicts (see ShardIndex.entries)."""
    return logitstore.open(str(url)).index.entries()


def rewrite(store_dir, shards: list[dict], manifest: dict | None = None, sequences=None) -> dict:
    """Write ``shards`` (entries as :func:`entries` returns them, possibly changed) as the store's
    index files and a manifest naming them, bypassing every check a writer makes; return the manifest."""
    store_dir = Path(store_dir)
    m = manifest if manifest is not None else json.loads((store_dir / "manifest.json").read_text())
    if sequences is None:
        s = logitstore.open(str(store_dir))
        sequences = s.sequences()
    fs = StoreFS(str(store_dir))
    m = {**m, **write_index(fs, m, shards, *sequences)}
    (store_dir / "manifest.json").write_bytes(dumps(m))
    return m


def part_files(url, shard: int = 0, part: str = "inputs") -> dict[str, dict]:
    return logitstore.open(str(url)).index.files(shard, part)


__all__ = ["entries", "rewrite", "part_files", "np"]


def unzip_part(part_dir) -> None:
    """Unpack a zarr part's ``part.zip`` into its directory (the zarr group's files), so a test can
    edit them; :func:`resign` packs them again."""
    from logitstore.format.backends.container import PART_ZIP, unpack

    part_dir = Path(part_dir)
    z = part_dir / PART_ZIP
    if z.exists():
        for rel, data in unpack(z.read_bytes(), str(z)).items():
            (part_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (part_dir / rel).write_bytes(data)
        z.unlink()


def resign(store_dir, shard_path: str, part: str, pack_zarr: bool = True) -> None:
    """Record one part's files as they are on disk in the index (sizes and sha256), as a hostile
    store would: every checksum matches, only the content is crafted. A zarr part unpacked by
    :func:`unzip_part` is packed into ``part.zip`` again first (``pack_zarr``)."""
    import hashlib
    import shutil

    from logitstore.format.backends.container import PART_ZIP, pack

    store_dir = Path(store_dir)
    m = json.loads((store_dir / "manifest.json").read_text())
    part_dir = store_dir / shard_path / part
    on_disk = sorted(p for p in part_dir.rglob("*") if p.is_file())
    if pack_zarr and m["backend"] == "zarr" and not (part_dir / PART_ZIP).exists():
        data = pack({str(f.relative_to(part_dir)): f.read_bytes() for f in on_disk})
        shutil.rmtree(part_dir)
        part_dir.mkdir()
        (part_dir / PART_ZIP).write_bytes(data)
        on_disk = [part_dir / PART_ZIP]
    shards = entries(store_dir) if "shards" not in m else m["shards"]
    entry = next(s for s in shards if s["path"] == shard_path)
    entry["parts"][part]["files"] = {
        str(f.relative_to(part_dir)): {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
        for f in on_disk}
    if "shards" in m:  # a version-1 store
        (store_dir / "manifest.json").write_text(json.dumps(m))
    else:
        rewrite(store_dir, shards, m)


def rewrite_arrays(store_dir, shard: int, part: str, edit) -> None:
    """Decode one part's stored arrays, let ``edit(arrays)`` change them in place, encode them again
    with the store's backend and re-sign the part (checksums match; the content is crafted)."""
    import shutil

    s = logitstore.open(str(store_dir))
    arrays = s.read_part(shard, part)
    arrays = {k: np.array(v) for k, v in arrays.items()}
    edit(arrays)
    files = s.backend.encode_part(arrays, 4)
    path = s.index.path(shard)
    part_dir = Path(store_dir) / path / part
    shutil.rmtree(part_dir)
    for rel, data in files.items():
        (part_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (part_dir / rel).write_bytes(data)
    resign(store_dir, path, part)
