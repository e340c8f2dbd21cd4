"""`llamaft sweep` (cli.py's command table calls `sweep_command` with the parsed arguments).

    llamaft sweep CFG.yaml SWEEP.yaml [key=value ...] [--out DIR] [--workers N]
    llamaft sweep CFG.yaml [key=value ...]            # CFG.yaml has a sweep: section
    llamaft sweep --resume DIR
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LlamaftError


def sweep_command(a) -> None:
    from ..assets import resolve_model_name
    from .run import resume_sweep, run_sweep

    words = [a.config, *a.overrides] if a.config else list(a.overrides)
    files, overrides = [w for w in words if "=" not in w], [w for w in words if "=" in w]
    if a.resume:
        if files or overrides:
            raise LlamaftError(f"--resume continues {a.resume} as it was started; give no config, spec or key=value")
        print(f"sweep directory: {resume_sweep(a.resume, a.workers)}")
        return
    if not files or len(files) > 2:
        raise LlamaftError("give CFG.yaml [SWEEP.yaml] (or --resume DIR); the spec is SWEEP.yaml or a sweep: section of CFG.yaml")
    cfg, inline = load_base(files[0], overrides)
    spec, source = (read_spec_file(files[1]), files[1]) if len(files) == 2 else (inline, files[0])
    if spec is None:
        raise LlamaftError(f"{files[0]}: no sweep: section; give the spec as a second file (llamaft sweep CFG.yaml SWEEP.yaml)")
    cfg.model.name = resolve_model_name(cfg.model.name)
    print(f"sweep directory: {run_sweep(cfg, spec, source, out=a.out, workers=a.workers)}")


def read_spec_file(path: str | Path) -> Any:
    """The spec mapping of SWEEP.yaml (its `sweep:` section, or the whole file when it has none)."""
    from ..config.load import read_yaml_file

    raw = read_yaml_file(Path(path))
    return raw.get("sweep", raw) if isinstance(raw, dict) else raw


def load_base(path: str | Path, overrides: list[str]):
    """(run config, its `sweep:` section or None): a run config may carry its sweep spec with it."""
    from ..config import load_config
    from ..config.load import read_yaml_file

    raw = read_yaml_file(Path(path)) or {}  # read once: load_config takes it as read
    spec = raw.pop("sweep", None) if isinstance(raw, dict) else None
    return load_config(path, overrides, raw=raw), spec
