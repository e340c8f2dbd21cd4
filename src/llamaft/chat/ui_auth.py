"""Who may open the web UI: the login (user:password) and the warning for an exposed server.

    auth = resolve_auth(args.auth, args.auth_file)   # --auth, else --auth-file, else $LLAMAFT_UI_AUTH
    warning = exposure_warning("0.0.0.0", auth)      # None on loopback or with a login

No gradio import here (tested without a browser). Errors and warnings never contain the password.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import LlamaftError

AUTH_ENV = "LLAMAFT_UI_AUTH"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def parse_auth(auth: str | tuple[str, str] | None, source: str = "--auth") -> tuple[str, str] | None:
    """'user:password' → (user, password); the password may contain ':'. Never echoes the value."""
    if auth is None or isinstance(auth, tuple):
        return auth
    user, sep, password = auth.strip("\r\n").partition(":")
    if not sep or not user or not password:
        raise LlamaftError(f"{source} must look like user:password (both non-empty)")
    return user, password


def resolve_auth(auth: str | None = None, auth_file: str | Path | None = None,
                 env: dict | None = None, warn=None) -> tuple[str, str] | None:
    """The UI's login from, in this order: --auth user:pass (visible to every user in `ps`, so a
    warning is printed), --auth-file PATH (one user:pass line), the LLAMAFT_UI_AUTH environment
    variable; None when none is given. Errors and warnings never contain the password."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    env = os.environ if env is None else env
    if auth is not None and auth_file is not None:
        raise LlamaftError("give --auth or --auth-file, not both")
    if auth is not None:
        warn(f"warning: --auth puts the password in the process list (any user can read it with `ps`); "
             f"use {AUTH_ENV}=user:password or --auth-file FILE instead")
        return parse_auth(auth)
    if auth_file is not None:
        return parse_auth(_read_auth_file(Path(auth_file).expanduser(), warn), f"--auth-file {auth_file}")
    if env.get(AUTH_ENV):
        return parse_auth(env[AUTH_ENV], AUTH_ENV)
    return None


def _read_auth_file(path: Path, warn) -> str:
    """The one non-empty line of an auth file; warns when others may read it (chmod 600)."""
    if path.is_dir():
        raise LlamaftError(f"--auth-file {path}: is a directory, not a file holding user:password")
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise LlamaftError(f"--auth-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        why = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else "not UTF-8 text"
        raise LlamaftError(f"--auth-file {path}: cannot read it ({why})") from None
    if len(lines) != 1:
        raise LlamaftError(f"--auth-file {path}: must hold exactly one user:password line (found {len(lines)} non-empty lines)")
    if mode & 0o077:
        warn(f"warning: --auth-file {path} can be read by other users (mode {mode & 0o777:03o}); chmod 600 {path}")
    return lines[0].strip()


def exposure_warning(host: str, auth) -> str | None:
    """The warning for a server reachable from other machines without a password, else None."""
    if host in LOOPBACK or auth:
        return None
    return (f"warning: serving on {host} without --auth: anyone who can reach this machine can use the model; "
            f"set {AUTH_ENV}=user:password (or --auth-file FILE), or keep the default --host 127.0.0.1")
