#!/usr/bin/env bash
# Fills launch/gke/jobset.yaml from the environment and applies it with kubectl.
#
#   IMAGE=REGISTRY/jaxcond:TAG TPU_TYPE=tpu-v5-lite-podslice TOPOLOGY=4x4 NUM_HOSTS=4 \
#   CHIPS_PER_HOST=4 PVC=jaxcond-runs WORKDIR=/runs/demo ARGS='--config configs/demo.py' \
#   launch/gke/submit.sh [--dry-run]
#
# PVC is a ReadWriteMany claim mounted at /runs in every pod; WORKDIR must lie under it.
# ARGS are further `jaxcond train` arguments, as bash words; config paths are inside IMAGE.
# JOB_NAME defaults to jaxcond-MMDD-HHMMSS. --dry-run prints the YAML instead of applying it.
set -euo pipefail
template=$(dirname "$0")/jobset.yaml

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "submit.sh: $*" >&2; usage >&2; exit 2; }

dry_run=''
case ${1-} in
  --dry-run) dry_run=1; shift ;;
  -h|--help) usage; exit 0 ;;
esac
[ $# -eq 0 ] || die "unknown argument: $1"

export JOB_NAME=${JOB_NAME:-jaxcond-$(date +%m%d-%H%M%S)}
vars=(JOB_NAME IMAGE TPU_TYPE TOPOLOGY NUM_HOSTS CHIPS_PER_HOST PVC WORKDIR ARGS)
missing=''
for v in "${vars[@]}"; do [ -n "${!v:-}" ] || missing+=" $v"; done
[ -z "$missing" ] || die "set these variables:$missing"
[[ $NUM_HOSTS =~ ^[1-9][0-9]*$ && $CHIPS_PER_HOST =~ ^[1-9][0-9]*$ ]] \
  || die "NUM_HOSTS and CHIPS_PER_HOST must be positive integers"
[[ $WORKDIR =~ ^/runs/[^[:space:]]+$ ]] || die "WORKDIR=$WORKDIR: must be a path under /runs (the PVC)"

render() {
  if command -v envsubst >/dev/null; then
    # Only our variables: anything else that looks like $X in the template or ARGS stays.
    envsubst "$(printf "\${%s} " "${vars[@]}")" <"$template"
  else
    python3 -c 'import os, re, sys
names = "|".join(sys.argv[1:])
sys.stdout.write(re.sub(r"\$\{(%s)\}" % names, lambda m: os.environ[m.group(1)], sys.stdin.read()))' \
      "${vars[@]}" <"$template"
  fi
}

if [ -n "$dry_run" ]; then render; else render | kubectl apply -f -; fi
