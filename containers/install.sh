#!/usr/bin/env bash
# The one installer of the project's Python environment. `make setup` (and so CI), the
# Dockerfile and the Apptainer definition all run it, with the same pinned versions
# (containers/constraints.txt), so what CI tests is what the images contain.
#
# usage: containers/install.sh VENV [editable|package]
#   editable (default): `pip install -e ".[dev]"`, for a checkout you edit (make setup)
#   package:            `pip install ".[dev]"`, a copy for an image
# PYTHON picks the interpreter that creates VENV when it does not exist (default python3).
set -euo pipefail

venv=${1:?usage: containers/install.sh VENV [editable|package]}
mode=${2:-editable}
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
constraints=$here/constraints.txt

case $mode in
  editable) target=(-e "$root[dev]") ;;
  package) target=("$root[dev]") ;;
  *) echo "containers/install.sh: mode must be editable or package, got '$mode'" >&2; exit 2 ;;
esac

test -x "$venv/bin/python" || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip --no-input --quiet)
"${pip[@]}" install --constraint "$constraints" --upgrade pip
"${pip[@]}" install --constraint "$constraints" "${target[@]}"
"${pip[@]}" check  # the pins are consistent with every package's own requirements
