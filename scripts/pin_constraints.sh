#!/usr/bin/env bash
# Write constraints.txt from the active environment, after the suite passed in it (CI's fresh venv
# gets the newest versions pyproject.toml allows; this records that set). Usage, from the repo root:
#   bash .ci/run                      # or: install as the README says, then the README's test command
#   bash scripts/pin_constraints.sh   # in that same venv
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
{
  echo "# Exact versions the test suite last passed with (Python $py, $(uname -m), CPU torch), written by"
  echo "# scripts/pin_constraints.sh on $(date -u +%Y-%m-%d). Reproduce that environment:"
  echo "#   pip install -c constraints.txt torch==2.13.0 \".[dev]\"   (or PIP_CONSTRAINT=constraints.txt)"
  echo "# A CUDA torch build of the same version satisfies torch==X (local labels such as +cu130 are ignored)."
  python -m pip freeze --exclude-editable --all | grep -viE '^(llamaft|pip|setuptools|wheel)==' | grep '==' | sed -E 's/\+[A-Za-z0-9.]+$//'
} > constraints.txt
echo "wrote constraints.txt ($(grep -c '==' constraints.txt) pins)"
