"""Output paths: checked before the work, written through a staging sibling, OS errors as one line.

    out = check_output_dir("runs/x/merged", "--out")      # before any model loads
    with staged_dir(out) as tmp:                           # .merged.tmp-<pid>, renamed into place
        write_everything_into(tmp)

Every command that writes (train, data --dump, merge, export) calls `check_output_dir` or
`check_output_file` first, so a path that is a file, under a file, or not writable fails in
milliseconds, not after a model load. The write itself goes to a hidden sibling named after the
target and this process's id (`.NAME.tmp-PID`, `.NAME.PID.tmp`) and is renamed into place when
complete: an existing good output is only ever replaced by a complete new one. A killed process
leaves its sibling behind (model-sized); `clean_stale` removes those whose process is gone at the
start of the next write. OS errors during the write (full disk, read-only, permission) become a
`LlamaftError` that names the target and the reason, after the staging copy is removed.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import LlamaftError

# Errors of the machine, not of llamaft: the message is the path and the reason.
ENVIRONMENT_ERRNOS = frozenset(
    e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG) if e is not None
)


def label(path: Path | str, name: str | None) -> str:
    """How a message names the path: `--out /x`, `train.output_dir=/x`, or just `/x`."""
    if not name:
        return str(path)
    return f"{name} {path}" if name.startswith("-") else f"{name}={path}"


def reason(err: OSError) -> str:
    """`No space left on device`, `Read-only file system`, ... (the errno's text, not the repr)."""
    return os.strerror(err.errno) if err.errno else (str(err) or type(err).__name__)


def _existing_ancestor(p: Path) -> Path:
    a = p
    while not a.exists() and a != a.parent:  # exists() follows links; a dangling link counts as missing
        a = a.parent
    return a


def _probe_writable(directory: Path, what: str) -> None:
    """Create and delete a file in `directory`: the only test that also catches read-only mounts,
    full disks of inodes, ACLs, and root's view of permissions (os.access is not enough)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".llamaft-write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise LlamaftError(f"{what}: cannot write in {directory} ({reason(err)})") from None


def _check_parents(p: Path, what: str) -> None:
    anc = _existing_ancestor(p)
    if not anc.is_dir():
        raise LlamaftError(f"{what}: {anc} is a file, not a directory")
    _probe_writable(anc, what)


def check_output_dir(path: str | Path, name: str | None = None) -> Path:
    """`path` is (or can be created as) a directory this process can write; returns it (~ expanded)."""
    p = Path(path).expanduser()
    what = label(p, name)
    if p.exists() and not p.is_dir():
        raise LlamaftError(f"{what}: exists and is not a directory")
    _check_parents(p, what)
    return p


def check_output_file(path: str | Path, name: str | None = None, example: str = "out.jsonl") -> Path:
    """`path` can be written as a file (replaced if it exists): not a directory, its folder writable."""
    p = Path(path).expanduser()
    what = label(p, name)
    if p.is_dir():
        raise LlamaftError(f"{what}: is a directory; give a file name such as {p / example}")
    if p.exists() and not p.is_file():
        raise LlamaftError(f"{what}: exists and is not a regular file")
    _check_parents(p.parent, what)
    return p


@contextmanager
def write_errors(target: Path | str, name: str | None = None, cleanup: tuple[Path, ...] = ()) -> Iterator[None]:
    """OSError inside (or a Rust writer's I/O error, see as_os_error) → LlamaftError naming `target`
    and the reason; `cleanup` paths are removed first (files or directories), so nothing
    half-written stays behind."""
    try:
        yield
    except Exception as exc:
        err = as_os_error(exc)
        if err is None:
            raise
        for c in cleanup:
            remove(c)
        raise LlamaftError(f"{label(target, name)}: write failed: {reason(err)}; nothing was written") from None


def as_os_error(exc: BaseException) -> OSError | None:
    """`exc` as an OSError: itself, or the errno that Rust writers (safetensors, tokenizers) put in
    their message as "(os error 28)" while raising their own exception type; else None."""
    if isinstance(exc, OSError):
        return exc
    m = re.search(r"\(os error (\d+)\)", str(exc))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else None


def remove(p: Path) -> None:
    """Delete a file or directory tree if it is there; never raises."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


# Staging siblings of a target NAME, tagged with the writer's pid:
#   .NAME.tmp-PID  .NAME.old-PID  (directories: merge / export hf)
#   .NAME.PID.tmp  .NAME.PID.f16.tmp  (files: GGUF, --dump, Modelfile)
def tmp_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def old_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.old-{os.getpid()}"


def tmp_file(out: Path, tag: str = "") -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}{'.' + tag if tag else ''}.tmp")


def _staging_re(name: str) -> re.Pattern:
    n = re.escape(name)
    return re.compile(rf"^\.{n}\.(?:(?P<kind>tmp|old)-(?P<pid>\d+)|(?P<fpid>\d+)(?:\.[a-z0-9_]+)?\.tmp)$")


def pid_alive(pid: int) -> bool:
    """Another process with this id exists (ours counts as gone: our own earlier attempt has ended)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove staging siblings of `out` left by processes that no longer run; returns what went.

    A stale `.NAME.old-PID` while `out` itself is missing is the previous complete output (the
    writer died between its two renames): it is put back, not deleted.
    """
    parent = out.parent
    if not parent.is_dir():
        return []
    pattern = _staging_re(out.name)
    removed = []
    try:
        siblings = sorted(parent.iterdir())
    except OSError:
        return []
    for sib in siblings:
        m = pattern.match(sib.name)
        if not m or pid_alive(int(m.group("pid") or m.group("fpid"))):
            continue
        if m.group("kind") == "old" and not out.exists():
            try:
                sib.rename(out)
                continue
            except OSError:
                pass
        remove(sib)
        removed.append(sib)
    return removed


def publish_dir(tmp: Path, out: Path, name: str | None = None) -> Path:
    """Rename the complete staging directory `tmp` into `out`, replacing an existing `out` by a swap
    (old aside, new in, old deleted): at every moment either the old or the new complete directory
    is at `out`. On failure the old one is put back and `tmp` removed."""
    if not out.exists():
        with write_errors(out, name, cleanup=(tmp,)):
            tmp.rename(out)
        return out
    old = old_dir(out)
    remove(old)
    with write_errors(out, name, cleanup=(tmp,)):
        out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            old.rename(out)
            raise
    remove(old)
    return out


def publish_file(tmp: Path, out: Path, name: str | None = None) -> Path:
    """os.replace `tmp` → `out` (atomic on one filesystem); `tmp` is removed if that fails."""
    with write_errors(out, name, cleanup=(tmp,)):
        os.replace(tmp, out)
    return out


def write_text_atomic(out: Path | str, text: str, name: str | None = None) -> Path:
    """Write `text` to `out` through a temporary sibling and one rename: a reader sees the old file or
    the whole new one, never half of it; an OS error (full disk, read-only) is one LlamaftError."""
    out = Path(out)
    tmp = tmp_file(out)
    with write_errors(out, name, cleanup=(tmp,)):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return publish_file(tmp, out, name)
