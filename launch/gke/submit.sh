#!/usr/bin/env bash
# Fills launch/gke/jobset.yaml from the environment and applies it with kubectl.
#
#   IMAGE=REGISTRY/jaxcond:TAG TPU_TYPE=tpu-v5-lite-podslice TOPOLOGY=4x4 NUM_HOSTS=4 \
#   CHIPS_PER_HOST=4 WORKDIR=gs://YOUR_BUCKET/runs/sdxl \
#   ARGS='--config configs/sdxl.py --compilation_cache=gs://YOUR_BUCKET/jax_cache' \
#   launch/gke/submit.sh [--dry-run]
#
# WORKDIR is gs://BUCKET/path, written by the pods' Kubernetes service account
# (SERVICE_ACCOUNT, default "default"; grant it roles/storage.objectAdmin on the bucket
# through Workload Identity), or a path under /runs with PVC=CLAIM, a ReadWriteMany claim
# mounted at /runs in every pod. ARGS are further `jaxcond train` arguments, as bash
# words; config paths are inside IMAGE. JOB_NAME defaults to jaxcond-MMDD-HHMMSS.
# --dry-run prints the YAML instead of applying it.
set -euo pipefail
template=$(dirname "$0")/jobset.yaml

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "submit.sh: $*" >&2; usage >&2; exit 2; }

dry_run=''
case ${1-} in
  --dry-run) dry_run=1; shift ;;
  -h|--help) usage; exit 0 ;;
esac
[ $# -eq 0 ] || die "unknown argument: $1"

export JOB_NAME=${JOB_NAME:-jaxcond-$(date +%m%d-%H%M%S)}
export SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-default}
required=(JOB_NAME IMAGE TPU_TYPE TOPOLOGY NUM_HOSTS CHIPS_PER_HOST WORKDIR ARGS)
missing=''
for v in "${required[@]}"; do [ -n "${!v:-}" ] || missing+=" $v"; done
[ -z "$missing" ] || die "set these variables:$missing"
[[ $NUM_HOSTS =~ ^[1-9][0-9]*$ && $CHIPS_PER_HOST =~ ^[1-9][0-9]*$ ]] \
  || die "NUM_HOSTS and CHIPS_PER_HOST must be positive integers"
# Kubernetes names: also what keeps these values from changing the YAML around them.
name='^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'
[[ $SERVICE_ACCOUNT =~ $name ]] || die "SERVICE_ACCOUNT=$SERVICE_ACCOUNT: not a Kubernetes service account name"
[[ -z ${PVC:-} || $PVC =~ $name ]] || die "PVC=$PVC: not a Kubernetes claim name"
if [[ $WORKDIR =~ ^gs://[a-z0-9][-a-z0-9_.]*[a-z0-9](/[^[:space:]]*)?$ ]]; then
  :  # the bucket is written directly; a PVC, if given, is still mounted at /runs
elif [[ $WORKDIR =~ ^/runs/[^[:space:]]+$ ]]; then
  [ -n "${PVC:-}" ] || die "WORKDIR=$WORKDIR: set PVC, the claim mounted at /runs (or use a gs:// WORKDIR)"
else
  die "WORKDIR=$WORKDIR: must be gs://BUCKET/path or a path under /runs (the PVC)"
fi
# Flow-style YAML lists, so that one template serves a run with or without the claim.
if [ -n "${PVC:-}" ]; then
  export VOLUMES="[{name: runs, persistentVolumeClaim: {claimName: $PVC}}]"
  export VOLUME_MOUNTS="[{name: runs, mountPath: /runs}]"
else
  export VOLUMES="[]" VOLUME_MOUNTS="[]"
fi
vars=("${required[@]}" SERVICE_ACCOUNT VOLUMES VOLUME_MOUNTS)

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
