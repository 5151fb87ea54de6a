#!/usr/bin/env bash
# Sets up ./.venv (once) and runs jaxcond, or the tests, on this machine.
#
#   bash launch/local.sh train --config configs/demo.py --workdir runs/demo
#   bash launch/local.sh test [pytest args]
#   bash launch/local.sh setup    # only the install (multi-node jobs do it once, up front)
#   bash launch/local.sh plan|masks|cache|shards|export|sample|verify ...   # any other jaxcond command
#
# JAXCOND_EXTRA=cuda12 (or tpu) installs the accelerator wheels of jax as well.
set -euo pipefail
self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$self")/.."

usage() { sed -n '2,9p' "$self" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
case "$1" in
  test|setup|train|plan|masks|cache|shards|export|sample|verify) ;;
  -h|--help) usage ;;
  *) echo "unknown command: $1" >&2; usage ;;
esac

venv=.venv
# The tests also need the test extra (pytest, shellcheck, datasets, CPU torch for the
# PyTorch parity checks); training never installs torch.
want=$([ "$1" = test ] && echo test || true)
want=$(echo "$want${JAXCOND_EXTRA:+,$JAXCOND_EXTRA}" | sed 's/^,//')
hash=$(sha1sum < pyproject.toml | cut -c1-12)
installed() {  # a stamp of this pyproject.toml whose extras include every wanted one
  local f have e ok
  for f in "$venv"/.installed-"$hash"-*; do
    [ -f "$f" ] || continue
    have=",${f##*/.installed-"$hash"-},"; ok=1
    for e in ${want//,/ }; do case "$have" in *",$e,"*) ;; *) ok=0 ;; esac; done
    [ "$ok" = 1 ] && return 0
  done
  return 1
}
if ! installed; then
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "jaxcond needs Python >= 3.10 (found $(python3 --version))" >&2; exit 1; }
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  echo "Installing jaxcond and its pinned dependencies into $venv ..." >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".${want:+[$want]}"
  find "$venv" -maxdepth 1 -name '.installed-*' ! -name ".installed-$hash-*" -delete
  touch "$venv/.installed-$hash-$want"
fi

cmd=$1; shift
case "$cmd" in
  test)
    # Tests run on the CPU with 8 simulated devices (sharding tests need several).
    export JAX_PLATFORMS=cpu
    # Most of the suite is single-threaded XLA compilation, so one pytest worker per core
    # (at most 4: each holds ~5 GiB) nearly divides its time; whole files go to one worker,
    # so module fixtures are built once, longest files first (tests/conftest.py orders them;
    # xdist would reorder by test count). Pass -n yourself (-n 0: none) to override.
    workers=()
    case " $* " in *" -n "*|*" -n"[0-9]*|*" --numprocesses"*|*" -p no:xdist "*) ;;
      *) n=$(nproc); workers=(-n "$(( n < 4 ? n : 4 ))" --dist loadfile --no-loadscope-reorder) ;; esac
    exec "$venv/bin/python" -m pytest "${workers[@]}" "$@" ;;
  setup) ;;
  *)
    exec "$venv/bin/jaxcond" "$cmd" "$@" ;;
esac
