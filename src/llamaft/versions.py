"""Which versions of the libraries llamaft leans on are installed, and how they differ from the pins.

    python -m llamaft.versions                          # the key libraries and their versions
    python -m llamaft.versions --against constraints.txt  # + every one that differs from the pins

Why: a fresh install gets the newest versions our ranges allow (pyproject.toml), so a new
transformers release can change behaviour overnight. CI prints this drift before the tests, so a
failing test can be traced to the library that moved; `constraints.txt` pins the exact set CI last
passed with, for users who want that environment (README: "Dependencies").
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

# The libraries whose behaviour our code depends on (their private names are guarded by
# tests/test_library_contracts.py); shown by `llamaft --version` for bug reports.
KEY_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "gguf",
                "huggingface_hub", "bitsandbytes", "trl", "gradio", "llama_cpp_python")


def normalize(name: str) -> str:
    """PEP 503 name: `Llama_CPP.python` and `llama-cpp-python` are the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def read_pins(path: str | Path) -> dict[str, str]:
    """`name==version` lines of a pip constraints file (comments and other specifiers ignored)."""
    pins = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = (part.strip() for part in line.split("==", 1))
            pins[normalize(name)] = version
    return pins


def drift(pins: dict[str, str], have=installed) -> list[tuple[str, str, str | None]]:
    """(name, pinned, installed) for every pinned package whose installed version differs; local
    build labels (`2.13.0+cpu`) do not count as a difference."""
    out = []
    for name, pinned in sorted(pins.items()):
        got = have(name)
        if got is None or got.split("+", 1)[0] != pinned.split("+", 1)[0]:
            out.append((name, pinned, got))
    return out


def report(constraints: str | None = None) -> str:
    lines = [f"{name} {installed(name) or '-'}" for name in KEY_PACKAGES]
    if constraints:
        moved = drift(read_pins(constraints))
        if moved:
            lines.append(f"differs from {constraints} (the set CI last passed with):")
            lines += [f"  {name}: pinned {pinned}, installed {got or 'missing'}" for name, pinned, got in moved]
        else:
            lines.append(f"every package matches {constraints}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    args = sys.argv[1:]
    print(report(args[1] if args[:1] == ["--against"] and len(args) == 2 else None))
