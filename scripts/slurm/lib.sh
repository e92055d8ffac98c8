# shellcheck shell=bash disable=SC2034  # IC_* globals are read by the scripts that source this.
# Shared launch logic for train.sbatch and convert.sbatch. Sourced, never executed.
#
# Apart from the bash version check, everything here is a function, so sourcing changes nothing;
# the sbatch scripts call the steps in order:
#   ic_require_slurm -> ic_setup_launch -> (compose the srun command) -> ic_write_provenance
#   -> ic_run_launch.
# Globals set here are prefixed IC_ (arrays too); the exported environment lives in env.sh.
# shellcheck source-path=SCRIPTDIR

# Empty arrays under `set -u` ("${a[@]}" with no elements) only expand safely from bash 4.4 on;
# older bash aborts with "unbound variable" half-way through a launch, so refuse up front.
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "[indexcache-slurm] error: bash >= 4.4 is required (found ${BASH_VERSION})" >&2
  exit 1
fi

ic_log() {
  # A fixed tag: under sbatch $0 is the spooled copy ("slurm_script"), which says nothing.
  printf '[indexcache-slurm %(%Y-%m-%dT%H:%M:%S)T] %s\n' -1 "$*" >&2
}

ic_die() {
  ic_log "error: $*"
  exit 1
}

# Print the arguments as one shell-quoted line (re-runnable by copy and paste).
ic_quote() {
  local out
  printf -v out '%q ' "$@"
  printf '%s\n' "${out% }"
}

ic_require_slurm() {
  local var
  for var in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_NNODES; do
    if [[ -z "${!var:-}" ]]; then
      ic_die "$var is not set: this script runs inside a Slurm allocation (sbatch). For a" \
        "workstation or an interactive node use torchrun directly (docs/launching.md)."
    fi
  done
  [[ "$SLURM_JOB_ID" =~ ^[0-9]+$ ]] || ic_die "SLURM_JOB_ID='$SLURM_JOB_ID' is not numeric"
  [[ "$SLURM_NNODES" =~ ^[1-9][0-9]*$ ]] || ic_die "SLURM_NNODES='$SLURM_NNODES' is not a node count"
}

# GPUs per node and the CPUs the single launcher task may use on each node.
ic_detect_resources() {
  # SLURM_GPUS_ON_NODE is set when the job asked for GPUs (--gpus-per-node / --gres=gpu:N).
  IC_GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
  [[ "$IC_GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || ic_die "GPUS_PER_NODE='$IC_GPUS_PER_NODE' is not a positive integer"
  # One task per node spawns all ranks of that node, so it must own every CPU of the node:
  # srun's default of one CPU per task would pin all ranks (and their data loaders) to a
  # single core, and since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task.
  IC_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-}}
}

# Use the repository's virtual environment when there is one and no container or already
# activated environment says otherwise. PATH is exported, so srun's tasks (torchrun) and the
# provenance step resolve the same interpreter.
ic_python_env() {
  if [[ -z "${CONTAINER_IMAGE:-}" && -z "${VIRTUAL_ENV:-}" && -x "$IC_ROOT/.venv/bin/python" ]]; then
    export VIRTUAL_ENV="$IC_ROOT/.venv"
    export PATH="$VIRTUAL_ENV/bin:$PATH"
  fi
  IC_PYTHON=${INDEXCACHE_PYTHON:-python3}
}

# Cluster-specific settings (NCCL/IB/EFA interfaces, module loads, container defaults).
# Sourced after env.sh, so a site may override any project default.
ic_source_site() {
  local site
  if [[ -n "${INDEXCACHE_SITE_ENV:-}" ]]; then
    # An explicit pointer that does not exist is a typo, not "no site settings".
    [[ -f "$INDEXCACHE_SITE_ENV" ]] || ic_die "INDEXCACHE_SITE_ENV=$INDEXCACHE_SITE_ENV does not exist"
    site=$INDEXCACHE_SITE_ENV
  else
    site="$IC_ROOT/scripts/slurm/site.sh"
  fi
  if [[ -f "$site" ]]; then
    ic_log "site settings: $site"
    IC_SITE_FILE=$site
    # shellcheck source=site.example.sh
    source "$site"
  else
    ic_log "site settings: none ($site absent; see scripts/slurm/site.example.sh)"
    IC_SITE_FILE=""
  fi
}

# Rendezvous endpoint: the first node of the allocation, a port derived from the job id.
ic_rendezvous() {
  local -a nodes
  # mapfile instead of `scontrol ... | head -n1`: with pipefail, head closing the pipe early
  # can fail the pipeline (SIGPIPE in scontrol) on a long node list.
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  ((${#nodes[@]} > 0)) || ic_die "scontrol show hostnames '$SLURM_JOB_NODELIST' returned no hosts"
  # The job id gives every job its own port, so two jobs sharing a node (or a stale store from
  # a previous job) never collide; 15000-29999 stays below Linux's ephemeral range (32768+),
  # where an outgoing connection could already hold the port.
  export MASTER_ADDR=${INDEXCACHE_RDZV_HOST:-${nodes[0]}}
  export MASTER_PORT=${INDEXCACHE_RDZV_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
  IC_RDZV_ENDPOINT="$MASTER_ADDR:$MASTER_PORT"
}

# pyxis/enroot flags for srun, only when CONTAINER_IMAGE is set (here or in site.sh).
ic_container_args() {
  IC_CONTAINER_ARGS=()
  [[ -n "${CONTAINER_IMAGE:-}" ]] || return 0
  # The repository is mounted at its host path, so absolute paths (train.py, the run
  # directory, site.sh) mean the same inside and outside the container.
  local mounts="$IC_ROOT:$IC_ROOT"
  [[ -z "${CONTAINER_MOUNTS:-}" ]] || mounts+=",$CONTAINER_MOUNTS"
  local env_names
  env_names=$(IFS=,; printf '%s' "${IC_CONTAINER_ENV[*]}")
  IC_CONTAINER_ARGS=(
    "--container-image=$CONTAINER_IMAGE"
    "--container-mounts=$mounts"
    "--container-workdir=$IC_ROOT"
    # pyxis gives a variable the image also sets (ENV in its Dockerfile) the image's value;
    # naming the env block here makes our values win inside the container.
    "--container-env=$env_names"
  )
}

# Everything a launch needs before the srun command is composed.
ic_setup_launch() {
  ic_detect_resources
  IC_NPROC_PER_NODE=${1:-$IC_GPUS_PER_NODE}
  # Stable across the jobs of one chain (submit_chain.sh exports the first job's id), so the
  # trainer finds its run directory, and with it the checkpoint to resume from, again.
  export INDEXCACHE_RUN_ID=${INDEXCACHE_RUN_ID:-$SLURM_JOB_ID}
  # shellcheck source=env.sh
  source "$IC_ROOT/scripts/slurm/env.sh"
  ic_source_site
  # After the site file, which may choose a container image or an environment of its own.
  ic_python_env
  ic_rendezvous
  ic_container_args
  IC_CPU_ARGS=()
  [[ -z "$IC_CPUS_PER_TASK" ]] || IC_CPU_ARGS=("--cpus-per-task=$IC_CPUS_PER_TASK")
  local name=${SLURM_JOB_NAME:-indexcache}
  IC_LOG_DIR=${INDEXCACHE_LOG_DIR:-$IC_ROOT/runs/slurm/$name-$SLURM_JOB_ID}
  # A requeued job keeps its id; keep the first attempt's record instead of overwriting it.
  if [[ -z "${INDEXCACHE_LOG_DIR:-}" && "${SLURM_RESTART_COUNT:-0}" != 0 ]]; then
    IC_LOG_DIR+="-restart$SLURM_RESTART_COUNT"
  fi
  mkdir -p "$IC_LOG_DIR"
  # Relative paths in overrides (data, checkpoints) and the trainer's run directory resolve
  # against the repository, wherever sbatch was called from.
  cd "$IC_ROOT" || ic_die "cannot cd to $IC_ROOT"
}

# Names worth recording; values of anything that looks like a credential never are.
ic_dump_env() {
  local name
  while IFS= read -r name; do
    case "$name" in
      *KEY* | *TOKEN* | *SECRET* | *PASSWORD* | *PASSWD* | *CREDENTIAL*) continue ;;
      SLURM_* | SLURMD_* | CUDA_* | NCCL_* | TORCH* | PYTORCH_* | OMP_* | MASTER_* | INDEXCACHE_* | \
        CONTAINER_* | FI_* | UCX_* | GLOO_* | NVTE_* | PYTHON* | GPUS_PER_NODE | PATH | \
        LD_LIBRARY_PATH | VIRTUAL_ENV | HOSTNAME)
        printf '%s=%s\n' "$name" "${!name}"
        ;;
    esac
  done < <(compgen -e)
}

ic_git_provenance() {
  local dir=$1 sha status
  if ! command -v git >/dev/null 2>&1; then
    printf 'commit=unknown\ndirty=unknown\nreason=git not on PATH\n' >"$dir/git.txt"
    return 0
  fi
  if ! sha=$(git -C "$IC_ROOT" rev-parse HEAD 2>&1); then
    printf 'commit=unknown\ndirty=unknown\nreason=%s\n' "${sha//$'\n'/ }" >"$dir/git.txt"
    return 0
  fi
  # Tracked changes only: untracked files (logs, a local site.sh) do not change what runs.
  status=$(git -C "$IC_ROOT" status --porcelain --untracked-files=no 2>/dev/null || true)
  if [[ -n "$status" ]]; then
    printf 'commit=%s\ndirty=true\n' "$sha" >"$dir/git.txt"
    # The uncommitted changes themselves, so the run can be reproduced from commit + patch.
    git -C "$IC_ROOT" diff HEAD >"$dir/git.diff" 2>/dev/null || true
  else
    printf 'commit=%s\ndirty=false\n' "$sha" >"$dir/git.txt"
  fi
}

# Record what is about to run. Never fatal: a missing tool is written down, not a failed job.
# Reads IC_SCRIPT_ARGS (the sbatch script's own arguments) and IC_LAUNCH (the composed command).
ic_write_provenance() {
  local dir=$IC_LOG_DIR
  {
    printf 'job_id: %s\n' "$SLURM_JOB_ID"
    printf 'run_id: %s\n' "$INDEXCACHE_RUN_ID"
    printf 'batch_host: %s\n' "${SLURMD_NODENAME:-${HOSTNAME:-unknown}}"
    printf 'repo: %s\n' "$IC_ROOT"
    printf 'site: %s\n' "${IC_SITE_FILE:-none}"
    printf 'script: %s\n' "$(ic_quote "$IC_SCRIPT_NAME" "${IC_SCRIPT_ARGS[@]}")"
    printf 'launch: %s\n' "$(ic_quote "${IC_LAUNCH[@]}")"
  } >"$dir/command.txt"
  ic_dump_env >"$dir/env.txt"
  ic_git_provenance "$dir"
  # The original sbatch options (time limit, nodes, partition) as Slurm recorded them.
  scontrol show job "$SLURM_JOB_ID" >"$dir/job.txt" 2>&1 || true
  # pip freeze where the job actually runs: inside the container when there is one.
  local -a freeze=("$IC_PYTHON" -m pip freeze)
  if ((${#IC_CONTAINER_ARGS[@]})); then
    freeze=(srun --nodes=1 --ntasks=1 "${IC_CONTAINER_ARGS[@]}" "${freeze[@]}")
  fi
  "${freeze[@]}" >"$dir/pip-freeze.txt" 2>&1 || echo "(pip freeze failed: see above)" >>"$dir/pip-freeze.txt"
  # The driver belongs to the host, so the host's nvidia-smi is the right one either way.
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi >"$dir/nvidia-smi.txt" 2>&1 || true
  else
    echo "nvidia-smi not found on PATH" >"$dir/nvidia-smi.txt"
  fi
  ic_log "provenance: $dir"
}

# Run IC_LAUNCH, record its exit status next to the provenance, and exit with it.
ic_run_launch() {
  ic_log "launch: $(ic_quote "${IC_LAUNCH[@]}")"
  local rc=0
  "${IC_LAUNCH[@]}" || rc=$?
  printf '%s\n' "$rc" >"$IC_LOG_DIR/exit_code"
  ic_log "finished with exit code $rc"
  exit "$rc"
}
