"""The bundled Python FAQ chat data: reproducible from the pydocs files, well-formed chat rows."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
SCRIPT = ROOT / "tools" / "make_chat_data.py"
SPLITS = ("train", "validation")
ROLE_MARKUP = re.compile(r":[a-z]+(?::[a-z]+)?:`")
LINK_MARKUP = re.compile(r"`__?(?!\w)")  # the end of a reST hyperlink reference


def load(name: str) -> list[dict]:
    with open(DATA / f"pyfaq-chat-{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pyfaq-chat")
    subprocess.run([sys.executable, str(SCRIPT), "--data-dir", str(DATA), "--out-dir", str(out)],
                   check=True, capture_output=True, timeout=120)
    return out


@pytest.mark.parametrize("name", SPLITS)
def test_shipped_files_are_reproducible(rebuilt, name):
    shipped = (DATA / f"pyfaq-chat-{name}.jsonl").read_bytes()
    assert (rebuilt / f"pyfaq-chat-{name}.jsonl").read_bytes() == shipped


@pytest.mark.parametrize("name", SPLITS)
def test_rows_are_well_formed_conversations(name):
    rows = load(name)
    assert rows
    for row in rows:
        assert set(row) == {"messages", "source", "questions"}
        assert row["source"].startswith("faq/")
        messages = row["messages"]
        roles = [m["role"] for m in messages]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles and len(roles) % 2 == 0, roles
        assert roles == ["user", "assistant"] * (len(roles) // 2), roles
        assert 1 <= len(roles) // 2 <= 3
        assert messages[-1]["role"] == "assistant"
        assert row["questions"] == [m["content"] for m in messages if m["role"] == "user"]
        for m in messages:
            assert set(m) == {"role", "content"}
            assert isinstance(m["content"], str) and m["content"].strip(), row["questions"]
            assert not ROLE_MARKUP.search(m["content"]), m["content"]
            assert not LINK_MARKUP.search(m["content"]) and "\n.. " not in m["content"]
            if m["role"] == "assistant":
                assert len(m["content"]) <= 1500


def test_split_and_system_turns():
    train, val = load("train"), load("validation")
    # no question is in both splits ("What is Python?" is asked in two documents)
    questions = [(row["source"], q) for row in train + val for q in row["questions"]]
    assert len(questions) == len(set(questions)) == 179
    assert any(row["source"] == "faq/general.rst" for row in val)
    assert not any(row["source"] == "faq/general.rst" for row in train)
    rows = train + val
    system = [row for row in rows if row["messages"][0]["role"] == "system"]
    assert 0.1 < len(system) / len(rows) < 0.4
    assert len({row["messages"][0]["content"] for row in system}) <= 3
