"""The dependency floors in pyproject.toml are versions that have every version-dependent API the
code calls, and the installed packages satisfy them. (What the floors themselves run is only
shown by a CI job that installs exactly the floors; this keeps the reasoning and the code in step.)"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

#: package -> [(oldest version with the API, file that uses it, regex of the use)]
API_FLOORS = {
    # FSDP2's public names (torch.distributed._composable.fsdp before 2.6)
    "torch": [("2.6", "trainer/sharding.py", r"from torch\.distributed\.fsdp import [^\n]*\bfully_shard\b"),
              ("2.6", "trainer/sharding.py", r"from torch\.distributed\.fsdp import [^\n]*\bMixedPrecisionPolicy\b")],
    "transformers": [("4.56", "logitstore/capture/teacher.py", r"from_pretrained\([^)]*\bdtype="),
                     ("4.56", "trainer/student.py", r"from_pretrained\([^)]*\bdtype=")],
    "pyarrow": [("16", "logitstore/format/backends/arrow_backend.py", r"use_byte_stream_split=")],
}


def floors() -> dict[str, Version]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for d in deps:
        r = Requirement(d)
        lows = [Version(s.version) for s in r.specifier if s.operator == ">="]
        out[r.name] = max(lows) if lows else None
    return out


def test_every_dependency_has_a_floor_that_is_installed():
    for name, floor in floors().items():
        assert floor is not None, f"{name}: no >= floor in pyproject.toml"
        installed = Version(importlib.metadata.version(name))
        assert installed >= floor, f"{name} {installed} is below the declared floor {floor}"


@pytest.mark.parametrize("package", sorted(API_FLOORS))
def test_floors_cover_the_version_dependent_apis_the_code_uses(package):
    floor = floors()[package]
    for need, rel, pattern in API_FLOORS[package]:
        src = (ROOT / rel).read_text()
        assert re.search(pattern, src, re.S), f"{rel} no longer matches {pattern!r}: update API_FLOORS"
        assert floor >= Version(need), f"{package}>={floor} in pyproject.toml, but {rel} needs {need} ({pattern})"


def test_fsdp2_is_public_in_the_installed_torch():
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401


def test_no_torch_load_unpickles_objects():
    """Every torch.load in the code passes weights_only=True (no arbitrary unpickling)."""
    for path in list((ROOT / "logitstore").rglob("*.py")) + list((ROOT / "trainer").rglob("*.py")):
        for m in re.finditer(r"torch\.load\(([^\n]*)", path.read_text()):
            assert "weights_only=True" in m.group(1), f"{path.relative_to(ROOT)}: torch.load({m.group(1)}"


def test_scheduler_state_loads_with_weights_only(tmp_path):
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        opt.step()
        sched.step()
    torch.save(sched.state_dict(), tmp_path / "scheduler.pt")
    again = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), lambda s: 0.5 ** s)
    again.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=True))
    assert again.last_epoch == 3 and again.get_last_lr() == sched.get_last_lr()
