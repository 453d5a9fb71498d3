"""Bad and hostile inputs: run every case of the reliability table and count how many are rejected
as they should be (one line naming the file/field, non-zero exit, nothing that looks complete).

    .venv/bin/python tools/hostile_inputs.py [--out runs/hostile_inputs.json]

Each row of the table is one or more tests of the suite (``tests/``), which build the bad input
(tiny teachers saved with ``save_pretrained``, damaged stores, bad flags) and assert the exact
behaviour; this tool runs them by node id with pytest and reports rejected / tried per row.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from common import ROOT, machine, print_table, write_json

ROWS = {
    "empty corpus": ["tests/test_errors.py::test_empty_corpus"],
    "non-UTF-8 bytes in the corpus": ["tests/test_errors.py::test_non_utf8_corpus"],
    "document longer than seq_len (split, nothing lost)": ["tests/test_errors.py::test_document_longer_than_seq_len_is_split_without_losing_tokens"],
    "missing --text-field": ["tests/test_errors.py::test_missing_text_field"],
    "teacher path that does not exist": ["tests/test_errors.py::test_missing_teacher_path"],
    "two teachers with different tokenizers": ["tests/test_errors.py::test_mismatched_tokenizers_refused_before_work"],
    "student vocab smaller than the store's": ["tests/test_fit.py::test_student_vocab_too_small"],
    "store of a newer format version": ["tests/test_errors.py::test_newer_format_version_refused"],
    "truncated manifest.json": ["tests/test_errors.py::test_truncated_manifest_refused"],
    "--top-k larger than the vocab or <= 0": ["tests/test_errors.py::test_bad_flags[--top-k-0---top-k]",
                                              "tests/test_errors.py::test_bad_flags[--top-k-100000-larger than the vocabulary]"],
    "--seq-len <= 0": ["tests/test_errors.py::test_bad_flags[--seq-len-0---seq-len]",
                       "tests/test_errors.py::test_bad_flags[--seq-len--5---seq-len]"],
    "--weights count != teachers, negative, or summing to 0": [
        "tests/test_fit.py::test_bad_fit_inputs[extra0-1 weight(s) for 2 teacher(s)]",
        "tests/test_fit.py::test_bad_fit_inputs[extra1-must be >= 0]", "tests/test_fit.py::test_bad_fit_inputs[extra2-sum to 0]"],
    "NaN/inf logits from an fp16 overflow in the teacher": ["tests/test_errors.py::test_fp16_overflow_in_the_teacher_is_one_clear_line"],
    "output path that holds a different store": ["tests/test_errors.py::test_other_store_at_output",
                                                 "tests/test_resume.py::test_different_settings_into_existing_store_is_refused"],
    "shard paths outside the store (.., absolute, URL)": [
        f"tests/test_errors.py::test_paths_outside_store_refused[{p}]" for p in ("../../etc/passwd", "/etc/passwd", "s3://elsewhere/x", "a/./b")],
    "declared sizes of 10^12 tokens (no allocation)": ["tests/test_errors.py::test_huge_declared_sizes_refused_without_allocating"],
    "unknown encodings / codecs": ["tests/test_codec.py::test_unknown_encodings_are_refused",
                                   "tests/test_backends.py::test_zarr_codecs_outside_the_allowed_set_are_refused"],
    "ids >= vocab in a shard": ["tests/test_codec.py::test_compact_detects_ids_outside_vocab"],
    "correctly signed shards with NaN, tail > 1, ids >= vocab, length 0": [
        "tests/test_errors.py::test_well_signed_but_invalid_values_are_named"],
    "damaged compressed chunk read with checksums off": ["tests/test_backends.py::test_zarr_fast_path_reports_damaged_compressed_bytes"],
    "store without a manifest (crashed dump)": ["tests/test_errors.py::test_unfinished_store_is_not_readable"],
    "store failing its checksums given to trainer fit": ["tests/test_faults.py::test_fit_refuses_a_damaged_store_by_default"],
    "store files that are a FIFO, /dev/zero or a link out of the root (reader, verify, cache)": [
        "tests/test_hostile_files.py::test_non_regular_or_outside_shard_file_is_refused",
        "tests/test_hostile_files.py::test_manifest_that_is_not_a_regular_file_is_refused",
        "tests/test_hostile_files.py::test_cache_entry_that_is_a_fifo_is_a_miss"],
    "well-signed Parquet decompression bomb (rows, list sizes)": [
        "tests/test_hostile_files.py::test_parquet_bomb_is_refused_from_the_footer_before_decoding"],
    "well-signed zarr chunk shapes of 0, < 0 or beyond the array": [
        "tests/test_hostile_files.py::test_zarr_chunk_shapes_are_checked_before_opening"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "hostile_inputs.json"))
    args = ap.parse_args()
    ids = [i for v in ROWS.values() for i in v]
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *ids], cwd=ROOT)
        root = ET.parse(xml).getroot()
    status = {}
    for case in root.iter("testcase"):
        node = f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}"
        status[node] = not any(child.tag in ("failure", "error", "skipped") for child in case)
    rows = []
    for name, nodes in ROWS.items():
        # a parametrised test named without its parameters stands for all of its cases
        expanded = [c for n in nodes for c in ([n] if n in status or "[" in n else sorted(k for k in status if k.startswith(n + "[")) or [n])]
        found = [status.get(n) for n in expanded]
        rows.append({"input": name, "tried": len(expanded), "rejected as specified": sum(bool(f) for f in found),
                     "missing": sum(f is None for f in found)})
    print()
    print_table(rows)
    tried, ok = sum(r["tried"] for r in rows), sum(r["rejected as specified"] for r in rows)
    print(f"\n{ok} of {tried} bad inputs rejected as specified ({len(rows)} kinds)")
    write_json(Path(args.out), {"machine": machine(), "rows": rows, "tried": tried, "rejected": ok})
    if ok != tried:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
