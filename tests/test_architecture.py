"""Imports follow the flow: config → data → model (+ fast, generate) → eval → train → export → chat → sweep → cli.

A module may import its own layer or any layer below it, never one above (data never imports model,
eval never imports chat, ...). Imports inside functions count too: a late import that runs back up
is still a dependency. docs/ARCHITECTURE.md draws the same picture.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llamaft"

# Bottom to top. Modules not named sit in the layer of their first dotted part.
LAYERS = [
    {"errors", "versions", "assets", "paths", "console"},  # shared leaves: user errors, versions, bundled assets, output paths, console policy
    {"config"},
    {"data"},
    {"model"},
    {"eval"},
    {"train"},
    {"export"},
    {"chat"},
    {"sweep"},  # calls train and eval; only the CLI imports it
    {"demo", "demo_data", "demo_dpo", "cli", "__main__", "__init__"},
]


def _layer(module: str) -> int:
    head = module.split(".")[1] if "." in module else "__init__"
    for rank, names in enumerate(LAYERS):
        if head in names:
            return rank
    raise AssertionError(f"llamaft.{head} is in no layer of tests/test_architecture.py: add it where it belongs")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every llamaft module `path` imports, absolute or relative, at any depth of the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("llamaft"):
                found.add(target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("llamaft")}
    return found


def test_no_module_imports_a_layer_above_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _module_name(path)
        for target in _imports(path):
            if target != "llamaft" and _layer(target) > _layer(me):
                upward.append(f"{me} imports {target}")
    assert not upward, "imports that run back up the flow:\n" + "\n".join(upward)


def test_the_walker_sees_relative_and_late_imports(tmp_path):
    """The check itself can fail: a late relative import from data into model is found."""
    global PACKAGE
    pkg = tmp_path / "llamaft"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    bad = pkg / "data" / "x.py"
    bad.write_text("def f():\n    from ..model.tokenizer import load\n")
    saved, PACKAGE = PACKAGE, pkg
    try:
        assert _imports(bad) == {"llamaft.model.tokenizer"}
        assert _layer("llamaft.model.tokenizer") > _layer(_module_name(bad))
    finally:
        PACKAGE = saved


def test_tests_mirror_the_source_tree():
    """tests/data/ tests data/, tests/model/fast/ tests model/fast/, ...: every folder of tests has
    its package in src/llamaft (shared helpers live in tests/ itself)."""
    tests = Path(__file__).resolve().parent
    folders = [d for d in tests.rglob("*") if d.is_dir() and not d.name.startswith((".", "__")) and d.name != "artifacts"]
    assert folders, "no mirrored test folders"
    orphans = [str(d.relative_to(tests)) for d in folders if not (PACKAGE / d.relative_to(tests)).is_dir()]
    assert not orphans, f"test folders without a package in src/llamaft: {orphans}"


MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def test_files_and_functions_stay_small():
    """A file past ~400 lines usually holds two modules, a function past ~60 lines does two jobs
    (DESIGN.md). A longer function is allowed where its `def` line says why in a `# long: ...` comment."""
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        if len(lines) > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(PACKAGE)}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and "# long:" not in lines[node.lineno - 1]:
                    too_long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}(): {n} lines")
    assert not too_long, "split these (or say why on the def line with `# long: ...`):\n" + "\n".join(too_long)
