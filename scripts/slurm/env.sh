# shellcheck shell=bash disable=SC2034  # IC_CONTAINER_ENV is read by lib.sh.
# THE environment block for every Slurm launch (train.sbatch, convert.sbatch). Sourced by
# lib.sh once GPUs and CPUs per node are known, before the site include (site.sh), so a
# cluster can override any of these. `${VAR:-default}` lets a value exported in the shell that
# runs sbatch win (sbatch passes the submitting environment on by default), e.g.
#   NCCL_DEBUG=INFO sbatch scripts/slurm/train.sbatch +experiment=glm5_freq4
# Cluster-specific NCCL/IB/EFA settings do not belong here: see site.example.sh.
# The same block for a run outside Slurm: IC_NPROC_PER_NODE=8 source scripts/slurm/env.sh

# Megatron: a single hardware work queue per GPU makes kernels start in issue order, which the
# tensor/sequence-parallel communication overlap relies on (the collective must be queued
# before the GEMM it hides behind).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

# Async collectives: without this, PyTorch calls recordStream on every tensor handed to the
# NCCL stream, and the caching allocator keeps that memory until the stream catches up (peaks,
# fragmentation); with it, the tensor is held until wait() and freed deterministically.
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}

# MoE token counts change every step, so activation sizes do too; expandable segments grow one
# mapping instead of caching many odd-sized blocks (fragmentation OOMs). Unset it only for
# features that need fixed segments (NCCL user-buffer registration).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

# A failed or timed-out collective aborts the communicator and ends the process instead of
# hanging until the walltime: torchrun exits, srun --kill-on-bad-exit ends the step, and the
# next job of a chain resumes from the last checkpoint. (torchrun sets 1 too; said here.)
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

# Each rank's fair share of the node's CPUs, so 8 ranks do not each start one OpenMP thread
# per core (oversubscription slows CPU-side work: collation, checkpoint tensor copies).
# Without this torchrun silently uses 1.
# (Sourced by hand for a local run, IC_NPROC_PER_NODE=8 gives the rank count; default 1.)
_ic_nproc=${IC_NPROC_PER_NODE:-1}
_ic_cpus=${IC_CPUS_PER_TASK:-$_ic_nproc}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((_ic_cpus >= _ic_nproc ? _ic_cpus / _ic_nproc : 1))}
unset _ic_nproc _ic_cpus

# Graceful stop: torchrun forwards SIGTERM to its workers and SIGKILLs them after this many
# seconds (default 30, far too short to write a large checkpoint). Keep it equal to the
# `#SBATCH --signal=TERM@<lead>` lead in train.sbatch (a test checks that): the trainer has
# the whole lead to finish its step and save. torch releases without the variable ignore it.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}

# Log lines reach the Slurm output file when written, not in 8 KiB blocks: after a hang or a
# kill, the last lines are the ones that explain it.
export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}

# NCCL says what went wrong (WARN) without the per-connection INFO flood; INFO when debugging.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# Names that must keep these values inside a pyxis container even if the image sets them
# (lib.sh passes them as --container-env). A site.sh may append: IC_CONTAINER_ENV+=(NAME).
IC_CONTAINER_ENV=(
  CUDA_DEVICE_MAX_CONNECTIONS
  TORCH_NCCL_AVOID_RECORD_STREAMS
  PYTORCH_CUDA_ALLOC_CONF
  TORCH_NCCL_ASYNC_ERROR_HANDLING
  OMP_NUM_THREADS
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT
  PYTHONUNBUFFERED
  NCCL_DEBUG
)
