#!/usr/bin/env bash
# Trains on every worker of a Cloud TPU VM (one host or a pod slice), from this checkout.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--workdir DIR] [--dry-run] \
#       -- --config configs/demo.py [--workdir DIR] [--config.x=y ...]
#   e.g. --workdir gs://YOUR_BUCKET/runs/sdxl -- --config configs/sdxl.py \
#       --compilation_cache=gs://YOUR_BUCKET/jax_cache
#
# Copies the files git knows (tracked and untracked, not ignored) to ~/jaxcond on all
# workers, then runs `JAXCOND_EXTRA=tpu bash launch/local.sh train --distributed=on ARGS`
# on all of them. The run directory (--workdir, before or after --) is one every worker
# reaches: gs://BUCKET/path (the TPU VM's service account needs write access), or an
# absolute path mounted on every worker (NFS/Filestore, GCS FUSE).
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail
root=$(dirname "$0")/..

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_pod.sh: $*" >&2; usage >&2; exit 2; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }

tpu='' zone='' project='' workdir='' dry_run=''
while [ $# -gt 0 ]; do
  case $1 in
    --tpu=*|--zone=*|--project=*|--workdir=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --tpu) need "$@"; tpu=$2; shift 2 ;;
    --zone) need "$@"; zone=$2; shift 2 ;;
    --project) need "$@"; project=$2; shift 2 ;;
    --workdir) need "$@"; workdir=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument: $1 (jaxcond train arguments go after --)" ;;
  esac
done
[ -n "$tpu" ] && [ -n "$zone" ] || die "--tpu and --zone are required"
[ $# -gt 0 ] || die "no jaxcond train arguments after --"
[ -z "$workdir" ] || set -- "$@" --workdir "$workdir"

# Each worker has its own ~/jaxcond, so a relative run directory would split the run
# (checkpoint shards, logs) across the workers' local disks. absl keeps the last --workdir.
# Nothing is made here: train creates the folder, or proves the bucket writable, itself.
run_dir='' prev=''
for arg in "$@"; do
  case $prev,$arg in
    --workdir,*) run_dir=$arg ;;
    *,--workdir=*) run_dir=${arg#--workdir=} ;;
  esac
  prev=$arg
done
case $run_dir in
  /*|gs://[!/]*) ;;
  '') die "no --workdir: give the run directory, gs://BUCKET/path or a path every worker sees" ;;
  gs://*) die "--workdir $run_dir names no bucket: use gs://BUCKET/path" ;;
  *://*) die "--workdir $run_dir: only gs:// URLs are supported (gs://BUCKET/path)" ;;
  *) die "--workdir $run_dir: give gs://BUCKET/path or an absolute path that every worker sees" ;;
esac

run() {
  if [ -n "$dry_run" ]; then printf '%q' "$1"; shift; printf ' %q' "$@"; echo; else "$@"; fi
}

where=(--zone "$zone")
[ -z "$project" ] || where+=(--project "$project")
tarball=$(mktemp "${TMPDIR:-/tmp}/jaxcond.XXXXXX")
trap 'rm -f "$tarball"' EXIT
git -C "$root" ls-files -z --cached --others --exclude-standard | tar -C "$root" --null -T - -czf "$tarball"

# Unpacking over the old copy keeps the workers' .venv, so only the first run installs.
remote="mkdir -p ~/jaxcond && tar -xzf ~/jaxcond.tgz -C ~/jaxcond && cd ~/jaxcond"
remote+=" && JAXCOND_EXTRA=tpu bash launch/local.sh train --distributed=on$(printf ' %q' "$@")"
run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:jaxcond.tgz" --worker=all "${where[@]}"
run gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${where[@]}" --command "$remote"
