"""The example configs: every configs/*.yaml loads, and every config the docs name exists."""

import itertools
import re
from pathlib import Path

import pytest

from llamaft.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_example_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.name and cfg.data.train


def _expand(name: str) -> list[str]:
    """`configs/llama-3.1-8b-{lora,qlora,full}.yaml` -> the three names (shell brace expansion)."""
    parts = re.split(r"\{([^{}]*)\}", name)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _named_configs() -> dict[str, set[str]]:
    """configs/*.yaml named in the package's sources and the user docs -> the files naming them."""
    named: dict[str, set[str]] = {}
    docs = [*(ROOT / "src").rglob("*.py"), ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    for f in docs:
        for m in re.finditer(r"configs/[\w.{},-]+\.yaml", f.read_text(encoding="utf-8")):
            for name in _expand(m.group(0)):
                named.setdefault(name, set()).add(str(f.relative_to(ROOT)))
    return named


def test_every_config_named_in_docstrings_and_docs_exists():
    named = _named_configs()
    assert "configs/llama-3.1-8b-lora.yaml" in named  # the scan itself finds the ones we know of
    assert len(_expand("configs/x-{a,b}.yaml")) == 2
    missing = {name: sorted(where) for name, where in named.items() if not (ROOT / name).is_file()}
    assert not missing, f"configs named but not in configs/: {missing}"


def test_the_70b_configs_are_one_gpu_qlora_and_sharded_lora():
    from llamaft.train.distributed import per_process

    qlora = load_config(ROOT / "configs/llama-3.1-70b-qlora.yaml")
    assert (qlora.model.method, qlora.distributed.strategy) == ("qlora", "auto")
    lora = load_config(ROOT / "configs/llama-3.1-70b-lora-fsdp.yaml")
    assert (lora.model.method, lora.distributed.strategy) == ("lora", "fsdp")
    assert lora.distributed.fsdp.activation_checkpointing and lora.distributed.fsdp.sharding == "full"
    for n in (1, 2, 4, 8):  # the global batch divides among the GPUs of one host
        assert per_process(lora, n).train.gradient_accumulation * n == lora.train.gradient_accumulation
