"""Every compatibility fix is needed: each scenario fails with the fix switched off.

The failing runs happen in subprocesses with ``INDEXCACHE_COMPAT_DISABLE=<fix>`` (fixes patch
process-wide state, so they cannot be switched off in this process). If a Megatron upgrade makes
a fix unnecessary, its test here fails and the fix should be deleted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from indexcache_train import compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only fixes")

PRELUDE = """
import os, sys, socket
sys.path.insert(0, {repo!r})
from indexcache_train import compat
compat.apply()
import torch, torch.distributed as dist
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ["MASTER_ADDR"] = "127.0.0.1"; os.environ["MASTER_PORT"] = str(port)
dist.init_process_group("gloo", rank=0, world_size=1)
from megatron.core import parallel_state as ps
ps.initialize_model_parallel(1, 1)
"""

#: Scenario preamble: a seeded process and what a DDP + distributed-optimizer toy needs.
DDP_IMPORTS = """
compat.model_parallel_seed(0)
from megatron.core.distributed import DistributedDataParallel as DDP, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.module import MegatronModule
"""

SCENARIOS = {
    # fix name -> (code after the prelude, error text expected without the fix)
    "rng_tracker": ("compat.model_parallel_seed(0)", "Torch not compiled with CUDA"),
    "current_device": (
        """
compat.model_parallel_seed(0)
from tests.helpers.models import build_toy
from indexcache_train.model.toy_configs import glm5_toy_hf_config
build_toy(glm5_toy_hf_config())   # MoE TopKRouter.__init__ places buffers on current_device()
""",
        "Torch not compiled with CUDA",
    ),
    "cuda_literals": (
        """
compat.model_parallel_seed(0)
from megatron.core.distributed import DistributedDataParallel as DDP, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)
class M(MegatronModule):
    def __init__(self):
        super().__init__(cfg)
        self.lin = ColumnParallelLinear(8, 8, config=cfg, init_method=cfg.init_method, bias=False)
m = DDP(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True), M())
get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True), [m])
""",
        "Torch not compiled with CUDA",
    ),
    "checkpoint_rng": (
        """
compat.model_parallel_seed(0)
from megatron.core import tensor_parallel
x = torch.ones(2, requires_grad=True)
tensor_parallel.checkpoint(lambda t: t * 2, False, x).sum().backward()  # CheckpointFunction RNG save
""",
        "Torch not compiled with CUDA",
    ),
    "indexer_grad_norm_group": (
        """
from megatron.core.optimizer.optimizer import _validate_grad_norm_group
_validate_grad_norm_group("indexer")   # MegatronOptimizer.clip_grad_norm validates every tagged group
""",
        "Unknown grad_norm_group 'indexer'",
    ),
    "distopt_mixed_dtype_order": (
        DDP_IMPORTS
        + """
cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, bf16=True,
                        params_dtype=torch.bfloat16, use_cpu_initialization=True)
class M(MegatronModule):   # one group mixing dtypes, like our bf16 model + fp32 weights_proj
    def __init__(self):
        super().__init__(cfg)
        self.a = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
        self.w = torch.nn.Parameter(torch.randn(3, dtype=torch.float32))
        self.b = torch.nn.Parameter(torch.randn(16, dtype=torch.bfloat16))
m = DDP(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True), M())
opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, bf16=True, use_distributed_optimizer=True), [m])
dopt = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
for p in m.module.parameters():
    main = dopt._get_main_param_and_optimizer_states(p)["param"]
    assert main.numel() == p.numel(), f"wrong main param: {main.numel()} for {p.numel()}"
""",
        "wrong main param",
    ),
    "distopt_reshardable_step": (
        DDP_IMPORTS
        + """
from indexcache_train.training.model_setup import init_optimizer_state
cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)
class M(MegatronModule):
    def __init__(self):
        super().__init__(cfg)
        self.a = torch.nn.Parameter(torch.randn(16))
m = DDP(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True), M())
opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, use_distributed_optimizer=True), [m])
init_optimizer_state(opt)   # torch Adam's state: param, exp_avg, exp_avg_sq and a `step` tensor
dopt = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
# What a fully_reshardable checkpoint holds per parameter (`step` lives in the param groups).
dopt.load_parameter_state_from_fully_reshardable(
    {0: {"fp32_param": torch.zeros(16), "exp_avg": torch.full((16,), 2.0), "exp_avg_sq": torch.ones(16)}}
)
st = dopt._get_main_param_and_optimizer_states(m.module.a)
assert float(st["exp_avg"].min()) == 2.0 and float(st["param"].abs().max()) == 0.0, st
""",
        "KeyError: 'step'",
    ),
    "cpu_grad_norm": (
        """
from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
torch.manual_seed(0)
g = torch.randn(3_219_456)   # an LM-head-sized gradient (50304 x 64)
norm = get_grad_norm_fp32([g], grad_stats_parallel_group=dist.group.WORLD)
exact = float(g.double().norm())
assert abs(norm / exact - 1) < 1e-6, f"grad norm off by {norm / exact - 1:.1e}"
""",
        "grad norm off by",
    ),
    "cuda_streams": (
        """
compat.model_parallel_seed(0)
from megatron.core.distributed import DistributedDataParallel as DDP, DistributedDataParallelConfig
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)
class M(MegatronModule):
    def __init__(self):
        super().__init__(cfg)
        self.lin = ColumnParallelLinear(8, 8, config=cfg, init_method=cfg.init_method, bias=False)
m = DDP(cfg, DistributedDataParallelConfig(), M())
m.module.lin(torch.ones(2, 8))[0].sum().backward()
m.finish_grad_sync()   # _ParamAndGradBucketGroup.start_grad_sync -> torch.cuda.current_stream()
""",
        "Torch not compiled with CUDA",
    ),
}


def _run(code: str, disable: str | None, repo: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("INDEXCACHE_COMPAT_DISABLE", None)
    if disable:
        env["INDEXCACHE_COMPAT_DISABLE"] = disable
    # Tear the group down before exit: a gloo group alive at interpreter shutdown can abort in
    # its C++ destructor ("terminate called without an active exception"), failing a passing run.
    epilogue = "\nprint('SCENARIO-OK', flush=True)\ndist.destroy_process_group()\n"
    script = PRELUDE.format(repo=repo) + textwrap.dedent(code) + epilogue
    return subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=repo,
    )


@pytest.mark.parametrize("fix", sorted(SCENARIOS))
def test_fix_is_needed(fix: str, repo_root) -> None:
    code, error = SCENARIOS[fix]
    without = _run(code, fix, str(repo_root))
    assert without.returncode != 0 and error in without.stderr, (
        without.stdout[-2000:] + without.stderr[-2000:]
    )
    with_fix = _run(code, None, str(repo_root))
    assert with_fix.returncode == 0 and "SCENARIO-OK" in with_fix.stdout, with_fix.stderr[-3000:]


def test_applied_fixes_listed() -> None:
    assert set(compat.applied_fixes()) == {
        "indexer_grad_norm_group",
        "distopt_mixed_dtype_order",
        "distopt_reshardable_step",
        "current_device",
        "cuda_literals",
        "cuda_streams",
        "checkpoint_rng",
        "rng_tracker",
        "cpu_grad_norm",
    }


def test_environment_defaults_in_fresh_process(repo_root) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TORCHDYNAMO_DISABLE")
    }
    code = f"import sys; sys.path.insert(0, {str(repo_root)!r}); from indexcache_train import compat; compat.apply(); import os, torch; print(os.environ['OMP_NUM_THREADS'], os.environ['TORCHDYNAMO_DISABLE'], torch.get_num_threads())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.split() == ["1", "1", "1"], out.stderr


def test_megatron_torch_norm_refuses_sp_ours_tags_weights() -> None:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        sequence_parallel=True,
        tensor_model_parallel_size=2,
        normalization="RMSNorm",
    )
    with pytest.raises(AssertionError):
        WrappedTorchNorm(config=cfg, hidden_size=8)
    norm = compat.RMSNorm(config=cfg, hidden_size=8)
    assert norm.weight.sequence_parallel is True


def test_duplicated_linear_replaces_te_only_indexer_linear() -> None:
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.transformer.transformer_config import TransformerConfig

    # Megatron-Core 0.19.2's DSA spec asks the backend for a "duplicated" linear that only TE has.
    assert not hasattr(LocalSpecProvider(), "linear")
    cfg = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True
    )
    lin = compat.DuplicatedLinear(
        8,
        4,
        config=cfg,
        init_method=cfg.init_method,
        bias=False,
        skip_bias_add=False,
        parallel_mode="duplicated",
        tp_comm_buffer_name="x",
    )
    out, bias = lin(torch.ones(3, 8))
    assert out.shape == (3, 4) and bias is None
    assert all(p.average_gradients_across_tp_domain for p in lin.parameters())
