# shellcheck shell=bash
# Cluster-specific settings for scripts/slurm/*.sbatch. Copy to scripts/slurm/site.sh (read
# when present) or anywhere else and point INDEXCACHE_SITE_ENV at it:
#   cp scripts/slurm/site.example.sh scripts/slurm/site.sh
#   INDEXCACHE_SITE_ENV=/shared/clusters/eos.sh sbatch scripts/slurm/train.sbatch ...
#
# Sourced by bash on the first node of the job, after the project's environment block
# (scripts/slurm/env.sh) and before the rendezvous and container flags are composed, so it may
# override anything there and set CONTAINER_IMAGE / CONTAINER_MOUNTS / INDEXCACHE_RDZV_HOST.
# Everything exported here reaches every node (srun passes the environment on). It runs under
# `set -euo pipefail`: guard optional variables with ${VAR:-}.
# sbatch options (account, partition, QOS) cannot be set from here, because the job already
# runs: use SBATCH_ACCOUNT / SBATCH_PARTITION in your login shell, or sbatch flags.
# Check every value against your cluster's documentation; these are starting points.

# ---- Modules (if the cluster uses Lmod/Environment Modules) --------------------------------
# module load cuda/12.8 nccl/2.27

# ---- InfiniBand (Mellanox/NVIDIA ConnectX, e.g. DGX H100/H200) -----------------------------
# The HCAs NCCL may use for the GPU traffic (`ibv_devices` lists them); leave out the storage
# or management port if it is an IB device too.
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_6,mlx5_7,mlx5_8,mlx5_9
# The interface for NCCL's bootstrap and torch's gloo groups (TCP): the one whose address the
# other nodes can reach, not docker0/lo.
# export NCCL_SOCKET_IFNAME=ib0        # or bond0, eth0; a leading ^ excludes: ^docker,lo
# export GLOO_SOCKET_IFNAME=ib0
# RoCE fabrics: the GID index of the RoCE v2 address (`show_gids`).
# export NCCL_IB_GID_INDEX=3
# Long collectives on a busy fabric: retry longer before declaring the link dead.
# export NCCL_IB_TIMEOUT=22
# export NCCL_IB_RETRY_CNT=7

# ---- AWS EFA (p4d, p5, p5e) with the aws-ofi-nccl plugin ------------------------------------
# export FI_PROVIDER=efa
# GPUDirect RDMA over EFA (p4d and later).
# export FI_EFA_USE_DEVICE_RDMA=1
# Libfabric older than 1.13 needs this when processes fork (data-loader workers).
# export FI_EFA_FORK_SAFE=1
# Where the AMI installs EFA and the plugin (containers usually ship their own: check first).
# export LD_LIBRARY_PATH=/opt/amazon/efa/lib:/opt/amazon/ofi-nccl/lib:${LD_LIBRARY_PATH:-}
# export NCCL_SOCKET_IFNAME=^docker,lo,veth
# Verify the provider is visible on a compute node: `fi_info -p efa -t FI_EP_RDM`.

# ---- Containers (pyxis/enroot) ----------------------------------------------------------------
# export CONTAINER_IMAGE=${CONTAINER_IMAGE:-/shared/images/indexcache-25.09.sqsh}
# export CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-/shared/data:/shared/data,/shared/ckpt:/shared/ckpt}
# A variable set here that the image also sets keeps the image's value unless named here:
# IC_CONTAINER_ENV+=(NCCL_IB_HCA NCCL_SOCKET_IFNAME)

# ---- Rendezvous ----------------------------------------------------------------------------------
# When the first node's hostname resolves to an address the other nodes cannot reach (e.g. a
# management network), name the reachable one:
# export INDEXCACHE_RDZV_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)-ib"
