"""Where `model.name` / `model.tokenizer` point: a local directory, a .gguf file, or a hub repository.

    check_source("meta-llama/Llama-3.1-8B-Instruct", "model.name")   # None, or one-line LlamaftError

Checked before transformers is asked to load anything, because its own failures are slow and long:
a hub id with no network retries for ~50 s and prints ~20 lines; a missing local directory such as
`./models/foo` is reported as a malformed repo id. Here:

- a name that exists locally is used as it is (the loader reports what is inside);
- a name that looks like a path (`./x`, `/x`, `~/x`, `a/b/c`, `x/`) and does not exist is "directory not found";
- anything else is a hub id: offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) it must be in the local
  hub cache; online, one `model_info` request (no retries, short timeout) tells "no such repository",
  "no such revision" and "hub unreachable" apart. Any other hub answer (gated, server error) is left
  to the loader, so real hub use is unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LlamaftError

HUB_TIMEOUT_S = 10.0
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, as huggingface_hub read them at import or as set now."""
    from huggingface_hub import constants

    env = any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or env


def looks_like_path(name: str) -> bool:
    """A name no hub id can be: hub ids are `name` or `owner/name`."""
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")
            or os.path.isabs(name) or name.endswith((".gguf", ".safetensors", ".bin", ".json")))


def _missing(key: str, name: str) -> str:
    full = Path(name).expanduser()
    where = "" if full.is_absolute() else f" (looked in {Path.cwd() / full})"
    return f"{key}: no such local directory or file: {name}{where}"


def _near(name: str) -> str:
    """For `runs/x` when ./runs exists: the user most likely meant a local path."""
    p = Path(name).expanduser()
    if "/" in name and p.parent.is_dir():
        return f" ({p.parent}/ exists but holds no '{p.name}')"
    return ""


def check_source(name: str, key: str = "model.name", revision: str | None = None, filename: str | None = None) -> None:
    """Raise one line when `name` is neither a local path nor a reachable (or cached) hub repository.

    filename: the file the loader will read first (a GGUF inside the repo; default config.json).
    """
    if not name or not name.strip():
        raise LlamaftError(f"{key} is empty; give a hub id, a local model directory or a .gguf file")
    path = Path(name).expanduser()
    if path.exists():
        if filename and path.is_dir() and not (path / filename).is_file():
            raise LlamaftError(f"model.gguf_file: {filename} not found in {name}")
        return
    if name.endswith(".gguf"):
        raise LlamaftError(f"{key}: GGUF file not found: {name}")
    if looks_like_path(name):
        raise LlamaftError(_missing(key, name))
    _check_hub_id(name, key, revision, filename or "config.json")


def _check_hub_id(name: str, key: str, revision: str | None, filename: str) -> None:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise LlamaftError(f"{_missing(key, name)}; nor is it a hub id (owner/name)") from None
    cached = isinstance(try_to_load_from_cache(name, filename, revision=revision), str)
    if hub_offline():
        if cached:
            return  # offline mode loads the cached snapshot
        raise LlamaftError(
            f"{key} '{name}' is not a local directory or file{_near(name)} and the hub is offline (HF_HUB_OFFLINE=1), "
            "with no cached copy; give a local model directory or .gguf file, or download it online first"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(name, revision=revision, timeout=HUB_TIMEOUT_S)
    except RevisionNotFoundError:
        raise LlamaftError(f"model.revision '{revision}' does not exist in hub repository '{name}'") from None
    except GatedRepoError:
        return  # the loader explains access to gated models (log in, accept the license)
    except RepositoryNotFoundError:
        raise LlamaftError(
            f"{_missing(key, name)}{_near(name)}, and the hub has no repository '{name}' "
            "(private? log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    except HfHubHTTPError:
        return  # the hub answered (e.g. a server error): the loader reports it with its own retries
    except Exception as err:  # noqa: BLE001 - connection refused, DNS, timeouts, proxies: no network
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if cached:
            raise LlamaftError(f"{key} '{name}': the hub is unreachable ({first}); a cached copy exists: "
                               "set HF_HUB_OFFLINE=1 to use it") from None
        raise LlamaftError(f"{key} '{name}' is not a local directory or file{_near(name)} and the hub is unreachable "
                           f"({type(err).__name__}: {first}); give a local model directory or .gguf file") from None


def model_source(model_cfg) -> tuple[str, str | None]:
    """(directory or hub id, GGUF file name or None), as the loaders take them."""
    name, gguf = model_cfg.name, model_cfg.gguf_file
    if gguf is None and name.endswith(".gguf"):
        p = Path(name)
        name, gguf = str(p.parent), p.name
    return name, gguf
