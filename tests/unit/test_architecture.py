"""The rooms of the code and what each may import (docs/architecture.md): read from the
source, every import counted, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"api", "bench", "contract", "glue", "logic", "runners", "service", "tests"}
HEAVY = {"torch", "transformers", "vllm", "xgrammar", "safetensors"}
# room: (our rooms it may import, third-party packages it must not import)
RULES: dict[str, tuple[set[str], set[str]]] = {
    "contract": (set(), HEAVY | {"bentoml", "starlette", "aiohttp"}),
    "logic": ({"contract"}, HEAVY | {"bentoml", "aiohttp"}),
    "api": ({"contract"}, HEAVY | {"bentoml"}),
    "glue": ({"contract"}, HEAVY),
    "runners": ({"contract", "glue"}, set()),
}


def imported_roots(path: Path) -> set[str]:
    """The top-level package of every import in a file (relative imports stay in the room)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_reader_sees_every_kind_of_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import a.b\nfrom c.d import e\ndef f():\n    import g\nfrom . import h\n")
    assert imported_roots(sample) == {"a", "c", "g"}


@pytest.mark.parametrize("room", sorted(RULES))
def test_each_room_imports_only_what_it_may(room):
    allowed, banned = RULES[room]
    files = sorted((ROOT / room).rglob("*.py"))
    assert files, f"{room}/ has no modules"
    wrong = {}
    for path in files:
        roots = imported_roots(path)
        bad = (roots & OURS - allowed - {room}) | (roots & banned)
        if bad:
            wrong[path.relative_to(ROOT).as_posix()] = sorted(bad)
    assert not wrong, f"imports across the rules of docs/architecture.md: {wrong}"


def test_the_architecture_page_states_the_rules_this_test_enforces():
    page = (ROOT / "docs" / "architecture.md").read_text()
    for room, (allowed, _) in RULES.items():
        line = next((row for row in page.splitlines() if row.startswith(f"| `{room}/`")), None)
        assert line is not None, f"docs/architecture.md has no row for {room}/"
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        may = {word.strip("`/ ") for word in cells[2].split(",") if word.strip("`/ —-")}
        assert may == allowed, (room, may)
