#!/usr/bin/env bash
# Trains on one machine with several GPUs: a single process drives all of them.
#
#   launch/gpu_local.sh [--gpus 0,1,2,3] [--dry-run] --config F --workdir D [--config.x=y ...]
#
# --gpus restricts the run to those GPUs (CUDA_VISIBLE_DEVICES); default: all of them.
# --dry-run prints the command instead of running it.
set -euo pipefail

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_local.sh: $*" >&2; usage >&2; exit 2; }

cmd=(env JAXCOND_EXTRA=cuda12)
dry_run=''
while [ $# -gt 0 ]; do
  case $1 in
    --gpus=*) set -- --gpus "${1#--gpus=}" "${@:2}"; continue ;;
    --gpus)
      [[ ${2-} =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus needs a list like 0,1,2,3"
      cmd+=("CUDA_VISIBLE_DEVICES=$2"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --*) break ;;
    *) die "unknown argument: $1" ;;
  esac
done
[ $# -gt 0 ] || die "no jaxcond train arguments"

# off: one process per machine even inside a multi-task SLURM allocation, which
# --distributed=auto would take for a multi-host job.
cmd+=(bash "$(dirname "$0")/local.sh" train --distributed=off "$@")
if [ -n "$dry_run" ]; then printf '%q' "${cmd[0]}"; printf ' %q' "${cmd[@]:1}"; echo; else exec "${cmd[@]}"; fi
