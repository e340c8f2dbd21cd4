"""The dependency policy holds: key libraries have upper bounds, constraints.txt pins a set inside the
ranges, and the drift report names what moved (src/llamaft/versions.py)."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement

from llamaft.versions import KEY_PACKAGES, drift, normalize, read_pins, report

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def test_key_libraries_have_an_upper_bound():
    """A new major of a library whose internals we use must not install untested."""
    keys = {normalize(k) for k in KEY_PACKAGES}
    for req in _requirements():
        if normalize(req.name) in keys and not any(s.operator in ("<", "==", "~=") for s in req.specifier):
            raise AssertionError(f"{req}: no upper bound (README 'Dependencies')")


def test_constraints_pin_every_dependency_inside_its_range():
    pins = read_pins(ROOT / "constraints.txt")
    for req in _requirements():
        name = normalize(req.name)
        if name in ("bitsandbytes", "torchao", "llama-cpp-python"):  # GPU / optional native builds: not in CI's set
            continue
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req.specifier}"


def test_read_pins_and_drift(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("# comment\nTorch==2.13.0  # cpu\nTransformers_X==5.24.0\nsome-lib>=1\n", encoding="utf-8")
    pins = read_pins(f)
    assert pins == {"torch": "2.13.0", "transformers-x": "5.24.0"}
    have = {"torch": "2.13.0+cpu", "transformers-x": "5.25.1"}.get
    assert drift(pins, have=have) == [("transformers-x", "5.24.0", "5.25.1")]
    assert drift({"gone": "1.0"}, have=lambda _n: None) == [("gone", "1.0", None)]


def test_report_names_installed_versions_and_drift(tmp_path):
    import transformers

    f = tmp_path / "c.txt"
    f.write_text("transformers==0.0.1\n", encoding="utf-8")
    text = report(str(f))
    assert f"transformers {transformers.__version__}" in text.splitlines()
    assert f"  transformers: pinned 0.0.1, installed {transformers.__version__}" in text
