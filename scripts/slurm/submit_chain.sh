#!/usr/bin/env bash
# Submit N training jobs that run one after another and resume each other:
#
#   scripts/slurm/submit_chain.sh N [sbatch args...] -- [Hydra overrides...]
#   scripts/slurm/submit_chain.sh 6 --nodes=4 --time=04:00:00 -- +experiment=glm5_freq4 optim.lr=1e-4
#
# All N jobs get the same --job-name and --dependency=singleton: Slurm starts a job only when
# no other job of that name (and user) is running, so the jobs run in submission order, one at
# a time, whatever their exit status (a crashed job does not stall the chain). Each job saves
# on SIGTERM before its walltime; the next one auto-resumes from the latest checkpoint in the
# same run directory, because every job of the chain gets INDEXCACHE_RUN_ID = the first job's
# id (or the INDEXCACHE_RUN_ID you export, to extend an earlier chain).
#
# The job name defaults to ic-<experiment> (from +experiment=...); pass --job-name/-J to pick
# one. Two chains with the same name would interleave into one queue: name them apart.
# Stop a chain: docs/launching.md ("Graceful stop").
set -euo pipefail

usage() {
  echo "usage: scripts/slurm/submit_chain.sh N [sbatch args...] -- [Hydra overrides...]" >&2
  exit 2
}

die() {
  echo "submit_chain: error: $*" >&2
  exit 1
}

(($# >= 1)) || usage
count=$1
shift
[[ "$count" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer (got '$count')"

sbatch_args=()
overrides=()
while (($#)); do
  if [[ "$1" == -- ]]; then
    shift
    overrides=("$@")
    break
  fi
  sbatch_args+=("$1")
  shift
done

# Inspect the sbatch options we must agree with: the job name (shared by the chain), the
# dependency (ours) and --export (INDEXCACHE_RUN_ID travels in the environment).
job_name=""
for ((i = 0; i < ${#sbatch_args[@]}; i++)); do
  arg=${sbatch_args[i]}
  case "$arg" in
    --job-name=*) job_name=${arg#--job-name=} ;;
    --job-name | -J) job_name=${sbatch_args[i + 1]:-} ;;
    -J?*) job_name=${arg#-J} ;;
    --dependency* | -d*) die "submit_chain sets --dependency=singleton itself; drop '$arg'" ;;
    --export=ALL*) ;;
    --export*) die "'$arg' would drop INDEXCACHE_RUN_ID; use --export=ALL,... or leave it out" ;;
  esac
done
name_args=()
if [[ -z "$job_name" ]]; then
  job_name=indexcache
  for override in "${overrides[@]}"; do
    case "$override" in
      +experiment=?* | experiment=?*) job_name="ic-${override#*experiment=}" ;;
    esac
  done
  name_args=("--job-name=$job_name")
fi

self_dir=.
[[ "${BASH_SOURCE[0]}" != */* ]] || self_dir=${BASH_SOURCE[0]%/*}
root=$(cd "$self_dir/../.." && pwd)
script="$root/scripts/slurm/train.sbatch"
# sbatch resolves relative paths (--output=runs/slurm/...) against its working directory, and
# the job's SLURM_SUBMIT_DIR is how train.sbatch finds the repository.
cd "$root"
# Slurm does not create the --output directory; a missing one fails the job without a log.
mkdir -p runs/slurm

run_id=${INDEXCACHE_RUN_ID:-}
ids=()
for ((k = 1; k <= count; k++)); do
  # The first job of a fresh chain uses its own id as the run id (train.sbatch's default).
  out=$(INDEXCACHE_RUN_ID="$run_id" sbatch --parsable "${name_args[@]}" --dependency=singleton \
    "${sbatch_args[@]}" "$script" "${overrides[@]}")
  id=${out%%;*} # --parsable prints "jobid" or "jobid;cluster"
  [[ "$id" =~ ^[0-9]+$ ]] || die "sbatch returned '$out' for job $k of $count"
  ids+=("$id")
  [[ -n "$run_id" ]] || run_id=$id
done

echo "submitted $count job(s) named '$job_name' (run id $run_id): ${ids[*]}"
