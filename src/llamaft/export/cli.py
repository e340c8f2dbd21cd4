"""`llamaft export`: one entry over merged HF export, GGUF export + self-check, and hub upload.

Everything that can be checked without a model is checked first: the output path (writable, not a
directory for a .gguf), the GGUF type and its quantizer, and for --push-to-hub the repository id,
offline mode and a token. A run directory is merged into RUN/merged's staging sibling and the GGUF
converted from there; RUN/merged is replaced only once the GGUF was written, so a failed export
leaves every earlier output as it was.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import LlamaftError
from ..model.inference import is_run_dir as _is_run_dir
from ..paths import publish_dir, reason, remove


def export_command(a: argparse.Namespace) -> Path:
    path = Path(a.path)
    if not path.exists():
        raise LlamaftError(f"{path}: no such run or model directory")
    if a.push_to_hub:
        check_hub_push(a.push_to_hub)
    if a.format == "hf":
        from .hf import export_hf

        out = Path(a.out) if a.out else path / "export-hf"
        result = Path(export_hf(path, out, dtype=a.dtype, max_shard_size=a.max_shard_size, overwrite=a.overwrite))
        uploads = [result]
    else:
        result = _export_gguf(path, a)
        uploads = [result] + ([result.with_name("Modelfile")] if a.ollama else [])
    print(f"exported: {result}")
    if a.push_to_hub:
        push_to_hub(uploads, a.push_to_hub, private=a.private)
    return result


def _export_gguf(path: Path, a: argparse.Namespace) -> Path:
    from . import gguf

    run = _is_run_dir(path)
    if not run and not (path / "config.json").is_file():
        if (path / "config.yaml").is_file():
            from ..model.inference import resolve_source

            resolve_source(path)  # a run without final weights: raises, saying why (stopped, interrupted)
        raise LlamaftError(f"{path}: not a run directory (config.yaml + adapter/ or model/) nor a model directory (config.json)")
    if not run:
        from .merge import refuse_nonfinite_files

        refuse_nonfinite_files(path)  # before a GGUF is written from it
    name = "merged" if run else path.resolve().name
    # Before the merge: a bad --quant, a missing llama-quantize or an unusable --out costs nothing.
    out = gguf.check_target(a.out or path / f"model-{a.quant}.gguf", a.quant, name, a.ollama)
    if run:
        from .merge import check_out_dir, merge_staged

        merged = check_out_dir(path / "merged", overwrite=True).resolve()
        staged = merge_staged(path, merged, a.dtype)
        try:
            result = gguf.export_gguf(staged, out, outtype=a.quant, ollama=a.ollama, name=name)
        except BaseException:
            remove(staged)  # RUN/merged keeps what it held before this export
            raise
        model_dir = publish_dir(staged, merged)
    else:
        model_dir = path
        result = gguf.export_gguf(path, out, outtype=a.quant, ollama=a.ollama, name=name)
    print(f"GGUF: {result}")
    if not a.no_check:
        _self_check(result, model_dir, gguf.check_gguf)
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


# ---------------------------------------------------------------------------------------------
# Hub upload. The token comes from HF_TOKEN or the saved login (huggingface_hub reads both) and is
# never printed: error texts pass through _scrub.


def check_hub_push(repo_id: str) -> None:
    """Before any export work: a valid repository id, not in offline mode, a token to upload with."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise LlamaftError(f"--push-to-hub {repo_id}: not a repository id like OWNER/NAME "
                           "(letters, digits, '-', '_', '.')") from None
    offline = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
    if offline:
        raise LlamaftError(f"--push-to-hub {repo_id}: the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE=1); "
                           "unset HF_HUB_OFFLINE to upload, or leave out --push-to-hub")
    if get_token() is None:
        raise LlamaftError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then retry --push-to-hub")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The base errors of the HTTP client huggingface_hub uses (2.x: httpx2, 1.x: httpx, 0.x:
    requests): connection refused, DNS, TLS, timeouts. Read from sys.modules: the hub has imported
    its client by the time an upload fails, and the others need not be installed."""
    found = []
    for module, attr in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        cls = getattr(sys.modules.get(module), attr, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def _scrub(text: str) -> str:
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text


def push_to_hub(paths: Path | list[Path], repo_id: str, private: bool = False) -> str:
    """Upload a folder (its contents) or files (at the repository root) to `repo_id` in one commit.
    Errors are one line naming the repository; the local export is kept either way."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    paths = [paths] if isinstance(paths, Path) else list(paths)
    check_hub_push(repo_id)
    api = HfApi()
    kept = f"; the export in {paths[0]} is kept"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if len(paths) == 1 and paths[0].is_dir():
            api.upload_folder(folder_path=str(paths[0]), repo_id=repo_id, commit_message="Upload with llamaft")
        else:
            ops = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in paths]
            api.create_commit(repo_id, operations=ops, commit_message="Upload with llamaft")
    except OfflineModeIsEnabled:
        raise LlamaftError(f"push to {repo_id} failed: offline mode is on (HF_HUB_OFFLINE=1){kept}") from None
    except (HfHubHTTPError, LocalTokenNotFoundError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        server = (getattr(err, "server_message", None) or "").strip().splitlines()  # the Hub's own reason
        detail = f"{first}: {server[0]}" if server and server[0] not in first else first
        raise LlamaftError(_scrub(f"push to {repo_id} failed: {detail}{kept}")) from None
    except OSError as err:
        if getattr(err, "filename", None) is None:
            raise _unreachable(repo_id, api.endpoint, err, kept) from None
        raise LlamaftError(f"push to {repo_id} failed: cannot read {err.filename} ({reason(err)}){kept}") from None
    except _transport_errors() as err:  # connection refused, DNS, TLS, timeout
        raise _unreachable(repo_id, api.endpoint, err, kept) from None
    url = f"{api.endpoint}/{repo_id}"
    print(f"pushed: {url}")
    return url


def _unreachable(repo_id: str, endpoint: str, err: BaseException, kept: str) -> LlamaftError:
    detail = (str(err).strip().splitlines() or [""])[0]
    return LlamaftError(_scrub(f"push to {repo_id} failed: cannot reach the Hugging Face Hub at {endpoint} "
                               f"({type(err).__name__}{': ' + detail if detail else ''}){kept}"))

