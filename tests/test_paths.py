"""paths.py: output checks before the work, staging siblings, stale-staging cleanup, OS errors as one line."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from llamaft.errors import LlamaftError
from llamaft.paths import (check_output_dir, check_output_file, clean_stale, publish_dir, tmp_dir, tmp_file,
                           write_errors)
from path_helpers import readonly_dir


def _dead_pid() -> int:
    """The id of a process that has exited (and was reaped), so no process has it now."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_output_dir_checks_name_the_path_and_the_problem(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(LlamaftError, match=rf"^--out {f}: exists and is not a directory$"):
        check_output_dir(f, "--out")
    with pytest.raises(LlamaftError, match=rf"^train.output_dir={f / 'run'}: {f} is a file, not a directory$"):
        check_output_dir(f / "run", "train.output_dir")
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # a check creates nothing
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # and its probe file is gone


def test_output_file_checks(tmp_path):
    with pytest.raises(LlamaftError, match=rf"^--dump {tmp_path}: is a directory; give a file name such as {tmp_path}/train.jsonl$"):
        check_output_file(tmp_path, "--dump", example="train.jsonl")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(LlamaftError, match=rf"^--dump {f / 'x.jsonl'}: {f} is a file, not a directory$"):
        check_output_file(f / "x.jsonl", "--dump")
    assert check_output_file(f) == f  # an existing file is replaced, not refused


def test_unwritable_place_is_refused_before_any_work(tmp_path):
    with readonly_dir(tmp_path) as ro:
        with pytest.raises(LlamaftError) as e:
            check_output_dir(ro / "out", "--out")
        assert str(e.value).startswith(f"--out {ro / 'out'}: cannot write in {ro} (")
        assert os.strerror(errno.EROFS) in str(e.value) or os.strerror(errno.EACCES) in str(e.value)
        with pytest.raises(LlamaftError, match="cannot write in"):
            check_output_file(ro / "x.jsonl", "--dump")


def test_write_errors_clean_up_and_name_the_target(tmp_path):
    target, partial = tmp_path / "model", tmp_path / ".model.tmp-1"
    partial.mkdir()
    (partial / "w.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(LlamaftError) as e:
        with write_errors(target, "--out", cleanup=(partial,)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial / "w.safetensors"))
    assert str(e.value) == f"--out {target}: write failed: No space left on device; nothing was written"
    assert not partial.exists()
    with pytest.raises(ValueError):  # not an OS error: not ours to reword
        with write_errors(target):
            raise ValueError("bug")


def test_clean_stale_removes_dead_writers_only(tmp_path):
    out = tmp_path / "merged"
    dead, alive = _dead_pid(), os.getppid()
    stale = [tmp_path / f".merged.tmp-{dead}", tmp_path / f".merged.{dead}.tmp", tmp_path / f".merged.{dead}.f16.tmp"]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"\0" * 100)
    stale[1].write_bytes(b"x")
    stale[2].write_bytes(b"x")
    live = tmp_path / f".merged.tmp-{alive}"  # a merge running right now in another process
    live.mkdir()
    other = tmp_path / f".merged-other.tmp-{dead}"  # another target's staging: not ours to touch
    other.mkdir()
    assert sorted(clean_stale(out)) == sorted(stale)
    assert not any(p.exists() for p in stale)
    assert live.is_dir() and other.is_dir()


def test_clean_stale_restores_an_old_output_caught_between_renames(tmp_path):
    """A writer killed after moving the old output aside and before moving the new one in: the old
    copy is the only complete output, so it is put back."""
    out = tmp_path / "merged"
    old = tmp_path / f".merged.old-{_dead_pid()}"
    old.mkdir()
    (old / "config.json").write_text("{}")
    clean_stale(out)
    assert (out / "config.json").read_text() == "{}" and not old.exists()


def test_publish_dir_swaps_and_rolls_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "v").write_text("old")
    tmp = tmp_dir(out)
    tmp.mkdir()
    (tmp / "v").write_text("new")
    assert publish_dir(tmp, out) == out and (out / "v").read_text() == "new"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # the second rename fails (e.g. the disk went read-only): the old output is put back
    tmp.mkdir()
    (tmp / "v").write_text("newer")
    real_rename = type(tmp).rename

    def rename(self, target):
        if self == tmp:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_rename(self, target)

    monkeypatch.setattr(type(tmp), "rename", rename)
    with pytest.raises(LlamaftError, match=rf"^{out}: write failed: Read-only file system"):
        publish_dir(tmp, out)
    assert (out / "v").read_text() == "new"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_staging_names(tmp_path):
    out = tmp_path / "m.gguf"
    assert tmp_file(out).name == f".m.gguf.{os.getpid()}.tmp"
    assert tmp_file(out, "f16").name == f".m.gguf.{os.getpid()}.f16.tmp"
    assert tmp_dir(tmp_path / "merged").name == f".merged.tmp-{os.getpid()}"


def test_cli_reports_an_unanticipated_machine_error_in_one_line(monkeypatch, capsys):
    """A full disk deep inside a command that has no check of its own: one line, exit 2; an OSError
    that is not about the machine (a bug, a missing file we should have checked) stays a traceback."""
    import llamaft.cli as cli

    def full(a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/eval/predictions.jsonl")

    monkeypatch.setattr(cli, "_cmd_eval", full)
    assert cli.main(["eval", "runs/x"]) == 2
    assert capsys.readouterr().err == "llamaft eval: error: /runs/x/eval/predictions.jsonl: No space left on device\n"

    def missing(a):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/some/internal/file")

    monkeypatch.setattr(cli, "_cmd_eval", missing)
    with pytest.raises(FileNotFoundError):
        cli.main(["eval", "runs/x"])


def test_write_text_atomic_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    import errno

    from llamaft import paths
    from llamaft.errors import LlamaftError

    out = tmp_path / "summary.json"
    assert paths.write_text_atomic(out, "old") == out and out.read_text() == "old"
    real_open = open

    def full_disk(path, *a, **k):
        f = real_open(path, *a, **k)
        f.write = lambda _text: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return f

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(LlamaftError, match="summary.json.*[Nn]o space left"):
        paths.write_text_atomic(out, "new")
    monkeypatch.undo()
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
