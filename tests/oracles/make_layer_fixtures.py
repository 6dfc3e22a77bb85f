#!/usr/bin/env python3
"""Writes moe/testdata/megatron_layer.safetensors: Megatron-Core's whole MoELayer (router,
token dispatcher, per-expert MLPs, shared experts) forward and backward on seeded fp32
inputs, for moe/megatron_layer_test.cc to compare Switchyard's MoELayer with.

Needs tests/oracles/.venv with torch and megatron-core (see PEERS.md for the install):

    tests/oracles/.venv/bin/python tests/oracles/make_layer_fixtures.py

Each case builds megatron.core.transformer.moe.moe_layer.MoELayer on one CPU rank (the
modules of bench_megatron_moe.py: TopKRouter, a token dispatcher, SequentialMLP of
ColumnParallelLinear / RowParallelLinear, SharedExpertMLP), sets every weight from a seeded
generator, runs it in training mode on x [seq, batch, hidden] and back-propagates
sum(out * g) (the aux losses and the z-loss reach the router through Megatron's
MoEAuxLossAutoScaler, at scale 1). Stored per case "NAME.": x, g, the weights, out, the
gradients of x and of every weight, the losses Megatron attached (z-loss and aux losses), the
expert bias before and after get_updated_expert_bias where it is on, and in the metadata the
options as "key=value" words. Every tensor keeps Megatron's layout: x is [seq, batch,
hidden], expert i's linear_fc1.weight is [2F or F, hidden] (SwiGLU: gate rows, then up rows),
linear_fc2.weight [hidden, F]; the test maps them to Switchyard's.

The router weight is drawn with std 0.5 (the input with std 1), so that no top-k choice or
capacity cut is within rounding of a tie; the script checks that margin (1e-3 in the scores
that choose, and in the keys that rank under capacity) and fails otherwise.
"""
import os
import sys
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
torch.cuda.current_device = lambda: "cpu"  # as in bench_megatron_moe.py

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer.mlp import MLPSubmodules  # noqa: E402
from megatron.core.transformer.moe import moe_utils  # noqa: E402
from megatron.core.transformer.moe.experts import SequentialMLP  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules  # noqa: E402
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
from megatron_cpu import init_one_rank  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

if not hasattr(moe_utils, "te_general_gemm"):
    moe_utils.te_general_gemm = None

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "moe", "testdata", "megatron_layer.safetensors")

SEQ, BATCH, HIDDEN = 12, 2, 16
ACTIVATIONS = {
    "swiglu": (torch.nn.functional.silu, True),
    "gelu": (torch.nn.functional.gelu, False),
    "relu": (torch.nn.functional.relu, False),
}

# name, Megatron options; every case also sets moe_router_dtype fp32 and the allgather dispatcher (the alltoall one makes a CUDA stream).
CASES = [
    ("swiglu_top2_dropless", dict(
        activation="swiglu", experts=8, ffn=12, topk=2, aux="aux_loss", aux_coeff=1e-2,
        z_coeff=1e-3)),
    ("gelu_top1_capacity_pad", dict(
        activation="gelu", experts=8, ffn=12, topk=1, pre_softmax=True, aux="aux_loss",
        aux_coeff=1e-2, capacity=1.0, drop="probs", pad=True)),
    # No "position" policy: Megatron keeps torch.topk's pick among the equal entries of a 0/1
    # map, not the earliest tokens (PEERS.md); router_test checks our rule by definition.
    ("relu_top2_pre_softmax_capacity", dict(
        activation="relu", experts=8, ffn=12, topk=2, pre_softmax=True, aux="aux_loss",
        aux_coeff=1e-2, capacity=0.75, drop="probs")),
    ("sigmoid_groups_bias_shared", dict(
        activation="swiglu", experts=8, ffn=12, topk=4, score="sigmoid", groups=4,
        group_topk=2, scaling=2.5, bias=True, aux="seq_aux_loss", aux_coeff=1e-3,
        shared=20)),
    ("softmax_top8_shared_z", dict(
        activation="swiglu", experts=16, ffn=8, topk=8, aux="aux_loss", aux_coeff=1e-2,
        z_coeff=1e-3, shared=24)),
    ("swiglu_shared_gate_capacity", dict(
        activation="swiglu", experts=8, ffn=12, topk=2, aux="aux_loss", aux_coeff=1e-2,
        capacity=1.0, drop="probs", shared=16, shared_gate=True)),
    # Padding tokens (MoELayer.forward's padding_mask): out of the losses; the test's
    # layer does not route them either, which changes no real token's number when dropless.
    ("swiglu_top2_padding_shared_z", dict(
        activation="swiglu", experts=8, ffn=12, topk=2, aux="aux_loss", aux_coeff=1e-2,
        z_coeff=1e-3, shared=16, padding=True)),
    # The global aux loss over two micro-batches of one step (gradient accumulation): the
    # second's counts are the average of both.
    ("global_aux_two_micro_batches", dict(
        activation="swiglu", experts=8, ffn=12, topk=2, aux="global_aux_loss", aux_coeff=1e-2,
        micro_batches=2)),
    # Llama 4's routing: sigmoid top-1, the weight on the expert's input, a shared expert.
    ("sigmoid_top1_probs_on_input_shared", dict(
        activation="swiglu", experts=8, ffn=12, topk=1, score="sigmoid", aux="aux_loss",
        aux_coeff=1e-3, probs_on_input=True, shared=12)),
]

# Attached losses, in the order the router attaches them (z-loss to the logits first).
attached = []
_apply = moe_utils.MoEAuxLossAutoScaler.apply


def _record(activation, loss):
    attached.append(loss.detach().clone())
    return _apply(activation, loss)


moe_utils.MoEAuxLossAutoScaler.apply = staticmethod(_record)


def build(o):
    act, glu = ACTIVATIONS[o["activation"]]
    cfg = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=o["ffn"],
        moe_ffn_hidden_size=o["ffn"], num_moe_experts=o["experts"], moe_router_topk=o["topk"],
        moe_router_score_function=o.get("score", "softmax"),
        moe_router_pre_softmax=o.get("pre_softmax", False),
        moe_router_num_groups=o.get("groups"), moe_router_group_topk=o.get("group_topk"),
        moe_router_topk_scaling_factor=o.get("scaling"),
        moe_router_enable_expert_bias=o.get("bias", False), moe_router_bias_update_rate=1e-2,
        moe_router_load_balancing_type=o["aux"], moe_aux_loss_coeff=o["aux_coeff"],
        moe_z_loss_coeff=o.get("z_coeff"), moe_router_dtype="fp32",
        moe_expert_capacity_factor=o.get("capacity"),
        moe_token_drop_policy=o.get("drop", "probs"),
        moe_pad_expert_input_to_capacity=o.get("pad", False),
        moe_shared_expert_intermediate_size=o.get("shared"),
        moe_shared_expert_gate=o.get("shared_gate", False),
        moe_apply_probs_on_input=o.get("probs_on_input", False),
        moe_token_dispatcher_type="allgather", moe_grouped_gemm=False, moe_permute_fusion=False,
        moe_router_fusion=False, gated_linear_unit=glu, activation_func=act,
        bias_activation_fusion=False, add_bias_linear=False, gradient_accumulation_fusion=False,
        use_cpu_initialization=True, params_dtype=torch.float32, tensor_model_parallel_size=1,
        expert_model_parallel_size=1, sequence_parallel=False)
    mlp = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    sub = MoESubmodules(experts=ModuleSpec(module=SequentialMLP, submodules=mlp),
                        shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=mlp)
                        if o.get("shared") else None)
    layer = MoELayer(cfg, sub)
    layer.set_layer_number(1)
    layer.train()
    return layer


def weights(layer):
    """Megatron's parameters by the names the fixture stores."""
    w = {"router.weight": layer.router.weight}
    for i, e in enumerate(layer.experts.local_experts):
        w[f"experts.{i}.fc1"] = e.linear_fc1.weight
        w[f"experts.{i}.fc2"] = e.linear_fc2.weight
    if layer.shared_experts is not None:
        w["shared.fc1"] = layer.shared_experts.linear_fc1.weight
        w["shared.fc2"] = layer.shared_experts.linear_fc2.weight
        if layer.shared_experts.gate_weight is not None:
            w["shared.gate"] = layer.shared_experts.gate_weight
    return w


def margins(layer, x, o):
    """The smallest gap at a top-k choice and at a capacity cut, in the keys that decide."""
    logits = x.reshape(-1, HIDDEN) @ layer.router.weight.detach().t()
    if o.get("score", "softmax") == "sigmoid":
        scores = torch.sigmoid(logits)
    elif o.get("pre_softmax"):
        scores = torch.softmax(logits, -1)
    else:
        scores = logits
    if layer.router.expert_bias is not None:
        scores = scores + layer.router.expert_bias
    k = o["topk"]
    if o.get("groups"):
        # Group scores: the sum of each group's best topk / group_topk; then the choice
        # among the kept groups' experts (masked with -inf elsewhere).
        g, gk = o["groups"], o["group_topk"]
        per = scores.reshape(scores.shape[0], g, -1)
        gs = per.topk(k // gk, -1).values.sum(-1)
        top = gs.sort(-1, descending=True).values
        gap = (top[:, gk - 1] - top[:, gk]).min().item()
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter(1, gs.topk(gk, -1).indices, True)
        scores = per.masked_fill(~keep.unsqueeze(-1), float("-inf")).reshape(scores.shape[0], -1)
    else:
        gap = float("inf")
    s = scores.sort(-1, descending=True).values
    if k < s.shape[1]:
        gap = min(gap, (s[:, k - 1] - s[:, k]).min().item())
    probs, rmap = moe_utils.topk_routing_with_score_function(
        logits, k, use_pre_softmax=o.get("pre_softmax", False), num_groups=o.get("groups"),
        group_topk=o.get("group_topk"), scaling_factor=o.get("scaling"),
        score_function=o.get("score", "softmax"), expert_bias=layer.router.expert_bias)
    dropped = 0
    if o.get("capacity"):
        cap = moe_utils.get_capacity(num_tokens=logits.shape[0] * k, num_experts=o["experts"],
                                     capacity_factor=o["capacity"])
        for e in range(o["experts"]):
            p = probs[rmap[:, e], e].sort(descending=True).values
            dropped += max(p.numel() - cap, 0)
            if p.numel() > cap and o.get("drop", "probs") == "probs":
                gap = min(gap, (p[cap - 1] - p[cap]).item())
    return gap, dropped


def run_case(i, name, o):
    gen = torch.Generator().manual_seed(2000 + i)
    for attempt in range(50):
        torch.manual_seed(3000 + 100 * i + attempt)
        layer = build(o)
        w = weights(layer)
        with torch.no_grad():
            for key, p in w.items():
                std = 0.5 if key == "router.weight" else 0.3
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            if layer.router.expert_bias is not None:
                layer.router.expert_bias.copy_(torch.randn(o["experts"], generator=gen) * 0.05)
        x = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
        gap, dropped = margins(layer, x, o)
        if gap >= 1e-3:
            break
    else:
        sys.exit(f"{name}: no seed gave routing margins of 1e-3")
    print(f"{name}: margin {gap:.2g} after {attempt + 1} draw(s), {dropped} of "
          f"{SEQ * BATCH * o['topk']} routed copies dropped")
    g = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    valid = None
    if o.get("padding"):
        valid = torch.rand(SEQ, BATCH, generator=gen) > 0.3
        g = g * valid.unsqueeze(-1)  # a loss that ignores the padding rows
    bias_before = None if layer.router.expert_bias is None else layer.router.expert_bias.clone()
    x = x.requires_grad_(True)
    attached.clear()
    routed = []
    hook = layer.router.register_forward_hook(lambda m, i, out: routed.append(out[1].detach()))
    if valid is None:
        out, out_bias = layer(x)
    else:
        # MoELayer.forward documents padding_mask [bsz, seq] as "True for valid tokens", but
        # its router keeps the tokens where it is False out of the losses (valid_mask =
        # ~padding_mask in moe_utils): pass True for padding, and check that the attached
        # aux loss is the one of the real tokens alone.
        out, out_bias = layer(x, padding_mask=(~valid).transpose(0, 1))
        real = valid.reshape(-1)
        logits = x.detach().reshape(-1, HIDDEN)[real] @ layer.router.weight.detach().t()
        rmap, scores = moe_utils.compute_routing_scores_for_aux_loss(logits, o["topk"], "softmax")
        want = moe_utils.switch_load_balancing_loss_func(
            scores, rmap.sum(0), int(real.sum()), o["topk"], o["experts"], o["aux_coeff"])
        got = attached[-1]
        assert torch.allclose(got, want, rtol=1e-6), (name, got.item(), want.item())
    hook.remove()
    assert out_bias is None
    if not o.get("pad"):  # (padded maps hold every slot up to capacity)
        assert SEQ * BATCH * o["topk"] - routed[0].sum().item() == dropped, (name, dropped)
    (out * g).sum().backward()
    t = {"x": x.detach(), "g": g, "out": out.detach(), "x.grad": x.grad}
    t["dropped"] = torch.tensor(float(dropped))
    if o.get("micro_batches", 1) == 2:
        # A second micro-batch of the same step, its gradients added to the first's.
        x1 = torch.randn(SEQ, BATCH, HIDDEN, generator=gen).requires_grad_(True)
        g1 = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
        assert margins(layer, x1.detach(), o)[0] >= 1e-3, f"{name}: the second micro-batch is near a tie"
        before = len(attached)
        out1, _ = layer(x1)
        (out1 * g1).sum().backward()
        assert len(attached) == before + 1, name
        t.update({"x.1": x1.detach(), "g.1": g1, "out.1": out1.detach(), "x.1.grad": x1.grad,
                  "aux_loss.1": attached.pop()})  # (the first's losses stay, for below)
        # It averaged the counts over the step: check against the loss from the formula, and
        # that the second micro-batch's counts alone would give another number.
        def scores_counts(xx):
            lg = xx.detach().reshape(-1, HIDDEN) @ layer.router.weight.detach().t()
            rmap, sc = moe_utils.compute_routing_scores_for_aux_loss(lg, o["topk"], "softmax")
            return sc, rmap.sum(0).float()
        s0, c0 = scores_counts(x)
        s1, c1 = scores_counts(x1)
        lb = lambda sc, c: moe_utils.switch_load_balancing_loss_func(  # noqa: E731
            sc, c, SEQ * BATCH, o["topk"], o["experts"], o["aux_coeff"])
        assert torch.allclose(t["aux_loss.1"], lb(s1, (c0 + c1) / 2), rtol=1e-6), name
        assert not torch.allclose(t["aux_loss.1"], lb(s1, c1), rtol=1e-3), name
        for key, p in w.items():
            t[key + ".grad"] = p.grad  # both micro-batches' sum
    if valid is not None:
        t["valid"] = valid.float()
    for key, p in w.items():
        t[key] = p.detach()
        t[key + ".grad"] = p.grad
    z_coeff = o.get("z_coeff") or 0
    losses = list(attached)
    if z_coeff:
        t["z_loss"] = losses.pop(0)
    assert len(losses) == 1, (name, len(losses))
    t["aux_loss"] = losses[0]
    if bias_before is not None:
        # The update Megatron's finalize_model_grads makes after the step, from the counts
        # this forward accumulated.
        t["expert_bias"] = bias_before
        t["tokens_per_expert"] = layer.router.local_tokens_per_expert.clone()
        t["expert_bias.updated"] = moe_utils.get_updated_expert_bias(
            layer.router.local_tokens_per_expert, layer.router.expert_bias, 1e-2)
    meta = " ".join(f"{k}={v}" for k, v in sorted(o.items()))
    return {f"{name}.{k}": v.contiguous().to(torch.float32) for k, v in t.items()}, meta


def main():
    init_one_rank()
    tensors, meta = {}, {}
    for i, (name, o) in enumerate(CASES):
        t, m = run_case(i, name, o)
        tensors.update(t)
        meta[name] = m
    meta["cases"] = " ".join(name for name, _ in CASES)
    meta["made_by"] = "tests/oracles/make_layer_fixtures.py, Megatron-Core 0.16.1, torch " + torch.__version__
    save_file(tensors, OUT, metadata=meta)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes, {len(CASES)} cases)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
