"""Write docs/configuration.md from the settings classes: every ``LLM_`` variable the services
read, by owner, with its type, default and description.

    python docs/generate_configuration.py            # rewrite docs/configuration.md
    python docs/generate_configuration.py --check    # exit 1 if it is stale (make test runs it)

(``make config-docs`` runs the first.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configuration.md"
sys.path.insert(0, str(ROOT))

from pydantic.fields import FieldInfo  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402


def owners() -> list[tuple[str, type, str]]:
    from contract.settings import CommonSettings
    from glue.settings import BuildSettings
    from logic.settings import APISettings
    from runners.settings import (
        LlamaCppSettings,
        NativeEngineSettings,
        RunnerSettings,
        VLLMSettings,
    )

    return [
        ("Both services", CommonSettings, "contract/settings.py"),
        ("The API service", APISettings, "logic/settings.py"),
        ("The runner (every engine)", RunnerSettings, "runners/settings.py"),
        ("Our engine (`LLM_ENGINE=native`)", NativeEngineSettings, "runners/settings.py"),
        ("vLLM (`LLM_ENGINE=vllm`)", VLLMSettings, "runners/settings.py"),
        ("llama.cpp (`LLM_ENGINE=llamacpp`)", LlamaCppSettings, "runners/settings.py"),
        ("Building the Bentos (`bentoml build`)", BuildSettings, "glue/settings.py"),
    ]


def _type(field: FieldInfo) -> str:
    text = str(field.annotation).replace("typing.", "").replace("pydantic.types.", "")
    text = text.replace("<class '", "").replace("'>", "").replace("NoneType", "None")
    return text.replace("Literal", "one of ").replace("|", "or")


def _default(field: FieldInfo) -> str:
    value = field.default
    if value is PydanticUndefined or value is None:
        return "(unset)"
    if value == "":
        return '`""`'
    return f"`{value}`"


def render() -> str:
    lines = [
        "# Configuration",
        "",
        "Every setting of the bundle, read from the environment as `LLM_<NAME>` when a service",
        "starts (and when `bentoml build` imports the services, which records the resources and",
        "the model). Generated from the settings classes by `make config-docs`",
        "(`docs/generate_configuration.py`); `make test` fails when this page is stale.",
        "Each class is one owner's; what both services read is in the first.",
        "",
    ]
    seen: set[str] = set()
    for title, cls, module in owners():
        fields = {n: f for n, f in cls.model_fields.items() if n not in seen}
        if cls.__name__ != "CommonSettings":
            fields = {n: f for n, f in fields.items() if n not in owners()[0][1].model_fields}
        seen |= set(fields)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines += [f"## {title}", "", f"`{cls.__name__}` ({module}): {doc}", ""]
        lines += ["| variable | type | default | what it does |", "|---|---|---|---|"]
        for name, field in fields.items():
            description = (field.description or "").replace("|", "\\|")
            lines.append(
                f"| `LLM_{name.upper()}` | {_type(field)} | {_default(field)} | {description} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run `make config-docs`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
