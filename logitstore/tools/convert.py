"""``logitstore convert``: the same store in the other backend (zarr <-> arrow), or in the current
format version (a version-1 store to version 2, same backend or not).

Every part is read (checked against the manifest's checksums), its encoded arrays are stored with
the chosen backend in the current version's layout, and nothing else changes: the encoding, the
values and the store id stay the same.
"""

from __future__ import annotations

from logitstore.format.backends import BACKENDS
from logitstore.tools.derive import ShardJob, check_out, header_of, source_ref, write_derived
from logitstore.errors import ConfigError
from logitstore.format.manifest import written_version
from logitstore.format.reader import Store


def convert(src: str, out: str, to: str, *, progress: bool = True) -> dict:
    """Write ``src`` with backend ``to`` into ``out``; return the new manifest."""
    if to not in BACKENDS:
        raise ConfigError(f"--to: expected one of {', '.join(BACKENDS)}, got {to!r}")
    store = Store(src)
    if store.manifest["backend"] == to and store.format_version == written_version(store.manifest):
        raise ConfigError(f"--to {to}: {src} is already a {to} store of format version {store.format_version}")
    check_out(out, [src])
    header = {**header_of(store.manifest), "backend": to, "derived": {"op": "convert", "sources": [source_ref(src, store.manifest)]}}
    ix = store.index
    jobs = [ShardJob(int(ix.starts[j]), int(ix.sizes[j]), int(ix.tokens[j]), lambda part, j=j: ("arrays", store.read_part(j, part), None))
            for j in range(len(ix))]
    return write_derived(out, header, jobs, progress=progress, desc="convert")
