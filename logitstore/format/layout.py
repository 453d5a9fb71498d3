"""Names of things inside a store (see ``FORMAT.md``, "Layout")."""

from __future__ import annotations

INPUTS = "inputs"


def shard_dir(index: int) -> str:
    return f"shards/{index:06d}"


def teacher_part(teacher_index: int) -> str:
    return f"t{teacher_index}"


def part_dir(index: int, part: str) -> str:
    return f"{shard_dir(index)}/{part}"


def commit_path(index: int, part: str) -> str:
    return f"{shard_dir(index)}/{part}.commit.json"
