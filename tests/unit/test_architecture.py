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


# The runner's modules a runner on llama.cpp loads: none imports torch when it is imported
# (the engine's native loader imports it inside the functions that build a torch model).
# tests/llamacpp checks the served runner's memory maps for the whole of it.
TORCH_FREE = ["runners/llm.py", "runners/engine.py", "runners/work.py", "runners/settings.py",
              "runners/metrics.py", "runners/host_sampling.py", "runners/xgr.py",
              "runners/grammar.py", "runners/closing.py", "runners/llamacpp_model.py",
              "runners/kv_blocks.py", "runners/orphans.py"]  # fmt: skip


@pytest.mark.parametrize("module", TORCH_FREE)
def test_the_runner_on_llamacpp_imports_no_torch_at_module_level(module):
    tree = ast.parse((ROOT / module).read_text())
    top = set()
    for node in tree.body:  # module level, and under `if` (not TYPE_CHECKING's: never run)
        nodes = [node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            nodes = node.body + node.orelse
        for item in nodes:
            if isinstance(item, ast.Import):
                top |= {a.name.split(".")[0] for a in item.names}
            elif isinstance(item, ast.ImportFrom) and item.module and item.level == 0:
                top |= {item.module.split(".")[0], item.module}
    # runners.batch_model and runners.sampling are torch's own: imported where torch is used
    torch_bound = {"torch", "transformers", "vllm", "runners.batch_model", "runners.sampling"}
    assert not top & torch_bound, sorted(top & torch_bound)
