"""Unusable output places for the path tests: a read-only directory, a nearly full disk, an injected
ENOSPC, and the check that a failed command printed one line and left nothing behind."""

from __future__ import annotations

import errno
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount_tmpfs(where: Path, options: str) -> None:
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip()[:80]})")


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@contextmanager
def readonly_dir(parent: Path):
    """A directory nobody (root included) can create files in: chmod 555 for a normal user, a
    read-only tmpfs for root (skipped where mounting is not permitted)."""
    d = parent / "readonly"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        try:
            yield d
        finally:
            d.chmod(0o755)
        return
    _mount_tmpfs(d, "ro,size=64k")
    try:
        yield d
    finally:
        _umount(d)


@contextmanager
def tiny_disk(parent: Path, size: str = "64k"):
    """A real filesystem of `size` bytes (tmpfs): big enough to pass the write probe, too small for a
    model. Skipped where mounting is not permitted."""
    d = parent / "tinydisk"
    d.mkdir()
    _mount_tmpfs(d, f"size={size}")
    try:
        yield d
    finally:
        _umount(d)


def enospc_after_partial_write(path, *_args, **_kwargs):
    """Stand-in for a writer: leaves a partial file at `path`, then the disk is full."""
    Path(path).write_bytes(b"\0" * 1000)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


PROGRESS = re.compile(r"^\s*(?:[\w ]+:\s+)?\d+%\|")  # tqdm bars: "Loading weights: 100%|███| 21/21 [...]", " 50%|█ | 3/6"


def one_error_line(err: str, command: str, *names: str) -> str:
    """The stderr of a failed command: exactly one `llamaft CMD: error:` line (progress bars of
    transformers' loaders and writers may precede it), naming every one of `names`, and no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith(f"llamaft {command}: error:")]
    assert len(lines) == 1, err
    others = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not PROGRESS.match(ln)]
    assert others == lines, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def hidden(parent: Path) -> list[str]:
    """Staging leftovers (.NAME.tmp-PID, .NAME.PID.tmp, ...) in `parent`."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))
