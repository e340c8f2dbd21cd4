"""`llamaft export`: one entry over merged HF export, GGUF export + self-check, and hub upload."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LlamaftError


def _is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / "adapter").is_dir() or (path / "model").is_dir())


def _merged_dir(path: Path, dtype: str) -> Path:
    """A run directory is merged first (into RUN/merged); a model directory is used as it is."""
    if _is_run_dir(path):
        from .merge import merge

        return merge(path, path / "merged", dtype=dtype, overwrite=True)
    if (path / "config.json").is_file():
        from .merge import refuse_nonfinite_files

        refuse_nonfinite_files(path)  # before a GGUF is written from it
        return path
    if (path / "config.yaml").is_file():
        from ..model.inference import resolve_source

        resolve_source(path)  # a run without final weights: raises, saying why (stopped, interrupted)
    raise LlamaftError(f"{path}: not a run directory (config.yaml + adapter/ or model/) nor a model directory (config.json)")


def export_command(a: argparse.Namespace) -> Path:
    path = Path(a.path)
    if not path.exists():
        raise LlamaftError(f"{path}: no such run or model directory")
    if a.format == "hf":
        from .hf import export_hf

        out = Path(a.out) if a.out else path / "export-hf"
        result = Path(export_hf(path, out, dtype=a.dtype, max_shard_size=a.max_shard_size, overwrite=a.overwrite))
    else:
        from .gguf import check_gguf, export_gguf

        model_dir = _merged_dir(path, a.dtype)
        out = Path(a.out) if a.out else (path / f"model-{a.quant}.gguf")
        result = Path(export_gguf(model_dir, out, outtype=a.quant, ollama=a.ollama))
        print(f"GGUF: {result}")
        if not a.no_check:
            _self_check(result, model_dir, check_gguf)
    print(f"exported: {result}")
    if a.push_to_hub:
        push_to_hub(result, a.push_to_hub, private=a.private)
    return result


def _self_check(gguf_path: Path, model_dir: Path, check_gguf) -> None:
    """Load the GGUF in llama.cpp and compare with transformers; a failed check is an error."""
    from .gguf_check import llama_cpp_available

    if not llama_cpp_available():
        print("self-check skipped: llama-cpp-python is not installed "
              "(scripts/build_llama_cpp_wheel.sh builds it; --no-check silences this)")
        return
    report = check_gguf(gguf_path, model_dir)
    print(report.verdict())
    if not report.passed:
        raise LlamaftError(f"{gguf_path}: GGUF self-check failed ({report.verdict()}); the file is kept for inspection")


def push_to_hub(path: Path, repo_id: str, private: bool = False) -> str:
    """Upload a folder (or one file) to the Hub. The token comes from HF_TOKEN or the saved login
    (huggingface_hub reads both) and is never printed."""
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi()
    try:
        if not api.token and not _saved_token():
            raise LlamaftError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then retry --push-to-hub")
        api.create_repo(repo_id, private=private, exist_ok=True)
        if path.is_dir():
            api.upload_folder(folder_path=str(path), repo_id=repo_id)
        else:
            api.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo_id)
    except (HfHubHTTPError, LocalTokenNotFoundError) as err:
        raise LlamaftError(f"push to {repo_id} failed: {str(err).splitlines()[0]}") from None
    except (OSError, httpx.HTTPError) as err:  # connection refused / no network
        raise LlamaftError(f"push to {repo_id} failed: cannot reach the Hugging Face Hub ({type(err).__name__})") from None
    url = f"https://huggingface.co/{repo_id}"
    print(f"pushed: {url}")
    return url


def _saved_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None
