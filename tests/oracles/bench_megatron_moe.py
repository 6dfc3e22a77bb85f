#!/usr/bin/env python3
"""Times Megatron-Core's own MoELayer (forward + backward) on the CPU, for comparison with
Switchyard's MoE layer at the same shapes.

Builds megatron.core.transformer.moe.moe_layer.MoELayer from a TransformerConfig and
MoESubmodules without Transformer Engine: TopKRouter, the "allgather" token dispatcher and
SequentialMLP experts made of ColumnParallelLinear / RowParallelLinear (moe_grouped_gemm=False,
the same modules as LocalSpecProvider). SwiGLU experts, dropless, aux-loss load balancing,
T = 4096 tokens ([seq 4096, batch 1, hidden 512]), in fp32 and bf16.

Needs tests/oracles/.venv with torch and megatron-core (see PEERS.md for the install):

    tests/oracles/.venv/bin/python tests/oracles/bench_megatron_moe.py --threads 2
    tests/oracles/.venv/bin/python tests/oracles/bench_megatron_moe.py --quick   # does it run?

One line per configuration: shape, dtype, threads, median ms per forward+backward, tokens/s.
--shapes coarse,fine and --dtypes fp32,bf16 pick a subset; --warmup / --iters (default 3 / 10).

bf16 needs a CPU with native bf16 (AVX512-BF16; torch.ops.mkldnn._is_mkldnn_bf16_supported()):
without it (an AVX2 machine, 2026-11-23) torch's bf16 matmul falls back to a slow kernel (about
1 GFLOP/s against about 65 in fp32 on one thread), so bf16 times there measure that fallback,
not Megatron; with it (a Zen 5 machine, 2026-12-01) bf16 goes through oneDNN as ours does.
The router runs in the input dtype (Megatron's default,
moe_router_dtype=None; it warns about that for 64 experts).
"""
import argparse
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist

# Megatron-Core warns at import that Transformer Engine and Apex are missing (expected here),
# and TransformerConfig about its own default cuda_graph_scope.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")

# Megatron-Core assumes CUDA in a few places (TopKRouter moves its weight and buffers to
# torch.cuda.current_device()); on this CPU-only machine the "current device" is the CPU.
torch.cuda.current_device = lambda: "cpu"

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer.mlp import MLPSubmodules  # noqa: E402
from megatron.core.transformer.moe import moe_utils  # noqa: E402
from megatron.core.transformer.moe.experts import SequentialMLP  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
from megatron_cpu import init_one_rank  # noqa: E402

# Without Transformer Engine the name is never bound and router_gating_linear raises a
# NameError on "te_general_gemm is not None"; None selects its plain torch path.
if not hasattr(moe_utils, "te_general_gemm"):
    moe_utils.te_general_gemm = None

SEQ, BATCH, HIDDEN = 4096, 1, 512
# name, moe_ffn_hidden_size, experts, top-k
SHAPES = [
    ("coarse", 1024, 16, 2),
    ("fine", 256, 64, 8),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
AUX_LOSS_COEFF = 1e-2


def init_distributed():
    """One-rank gloo group and Megatron's parallel state with TP = PP = EP = 1."""
    init_one_rank()
    # No model_parallel_cuda_manual_seed: it needs a CUDA driver. With use_cpu_initialization
    # the linears initialise their weights from torch's CPU generator (torch.manual_seed).


def build_layer(ffn, experts, topk, dtype):
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=8,  # unused by the MoE layer, required by the config
        ffn_hidden_size=ffn,
        moe_ffn_hidden_size=ffn,
        num_moe_experts=experts,
        moe_router_topk=topk,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=AUX_LOSS_COEFF,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        moe_expert_capacity_factor=None,  # dropless
        moe_permute_fusion=False,
        moe_router_fusion=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        bias_activation_fusion=False,
        add_bias_linear=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=1,
        expert_model_parallel_size=1,
        sequence_parallel=False,
    )
    submodules = MoESubmodules(
        experts=ModuleSpec(
            module=SequentialMLP,
            submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        ),
    )
    layer = MoELayer(config, submodules)
    layer.set_layer_number(1)  # as TransformerLayer does; the router logs its aux loss per layer
    layer.train()
    return layer


def bench(name, ffn, experts, topk, dtype_name, threads, warmup, iters):
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    layer = build_layer(ffn, experts, topk, dtype)
    x = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float32).to(dtype).requires_grad_(True)
    g = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float32).to(dtype)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out, bias = layer(x)
        assert bias is None
        out.backward(g)
        return out.detach()

    for _ in range(warmup):
        out = step()
    assert out.shape == x.shape and out.dtype == dtype, (out.shape, out.dtype)
    assert torch.isfinite(out).all() and x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.router.weight.grad is not None
    # The aux loss was attached (MoEAuxLossAutoScaler) and logged for layer 1.
    logged = moe_utils.get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
    assert logged is not None and logged["values"][0].item() > 0, "no aux loss was logged"
    moe_utils.clear_aux_losses_tracker()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    tokens = SEQ * BATCH
    print(f"shape={name:<6} T={tokens} hidden={HIDDEN} ffn={ffn} experts={experts} top{topk} "
          f"dtype={dtype_name} threads={threads} median_ms={ms:.1f} "
          f"tokens_per_s={tokens / (ms / 1e3):.0f} iters={iters}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="1 warm-up and 1 timed iteration")
    p.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    a = p.parse_args()
    if a.quick:
        a.warmup, a.iters = 1, 1
    torch.set_num_threads(a.threads)
    init_distributed()
    print(f"# Megatron-Core MoELayer (allgather dispatcher, SequentialMLP, SwiGLU, dropless, "
          f"aux_loss {AUX_LOSS_COEFF}), torch {torch.__version__}, CPU, "
          f"warmup={a.warmup} iters={a.iters}", flush=True)
    shapes = [s for s in SHAPES if s[0] in a.shapes.split(",")]
    failed = False
    for name, ffn, experts, topk in shapes:
        for dtype_name in a.dtypes.split(","):
            try:
                bench(name, ffn, experts, topk, dtype_name, a.threads, a.warmup, a.iters)
            except Exception as e:  # report and go on with the other configurations
                failed = True
                print(f"shape={name} dtype={dtype_name} threads={a.threads} FAILED: "
                      f"{type(e).__name__}: {e}", flush=True)
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
