"""docs/configuration.md is generated from the settings classes and names every LLM_ setting."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.served import ROOT

SERVICE_CODE = ["service.py", "api", "contract", "glue", "logic", "runners"]


def test_the_configuration_page_is_what_the_settings_classes_generate():
    result = subprocess.run(
        [sys.executable, "docs/generate_configuration.py", "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_every_llm_variable_the_services_name_is_documented():
    page = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `(LLM_[A-Z0-9_]+)`", page, re.M))
    files = [ROOT / "service.py"] + [
        p for room in SERVICE_CODE[1:] for p in (ROOT / room).rglob("*.py")
    ]
    named = {v for path in files for v in re.findall(r"\bLLM_[A-Z][A-Z0-9_]*", path.read_text())}
    assert len(documented) > 40
    assert named <= documented, sorted(named - documented)


def test_each_class_documents_its_own_fields_once():
    sys.path.insert(0, str(ROOT / "docs"))
    from generate_configuration import owners

    page = (ROOT / "docs" / "configuration.md").read_text()
    for _, cls, _ in owners():
        for name in cls.model_fields:
            assert page.count(f"| `LLM_{name.upper()}` |") == 1, name
