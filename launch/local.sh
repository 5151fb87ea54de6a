#!/usr/bin/env bash
# Sets up ./.venv (once) and runs jaxcond, or the tests, on this machine.
#
#   bash launch/local.sh train --config configs/demo.py --workdir runs/demo
#   bash launch/local.sh test [pytest args]
#   bash launch/local.sh setup    # only the install (multi-node jobs do it once, up front)
#
# JAXCOND_EXTRA=cuda12 (or tpu) installs the accelerator wheels of jax as well.
set -euo pipefail
self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$self")/.."

usage() { sed -n '2,8p' "$self" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
case "$1" in
  test|setup|train|masks) ;;
  -h|--help) usage ;;
  *) echo "unknown command: $1" >&2; usage ;;
esac

venv=.venv
extras="test${JAXCOND_EXTRA:+,$JAXCOND_EXTRA}"
stamp="$venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)-$extras"
if [ ! -f "$stamp" ]; then
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "jaxcond needs Python >= 3.10 (found $(python3 --version))" >&2; exit 1; }
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  echo "Installing jaxcond and its pinned dependencies into $venv ..." >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]"
  rm -f "$venv"/.installed-*; touch "$stamp"
fi

cmd=$1; shift
case "$cmd" in
  test)
    # Tests run on the CPU with 8 simulated devices (sharding tests need several).
    export JAX_PLATFORMS=cpu
    exec "$venv/bin/python" -m pytest "$@" ;;
  setup) ;;
  train|masks)
    exec "$venv/bin/jaxcond" "$cmd" "$@" ;;
esac
