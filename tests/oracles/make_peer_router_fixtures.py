#!/usr/bin/env python3
"""Writes moe/gate/testdata/deepspeed_router.txt and torchtitan_router.txt: inputs, outputs
and gradients of DeepSpeed's and torchtitan's own routing code on seeded fp32 inputs, for
peer_router_test.cc to compare with.

Needs tests/oracles/.venv with torch, deepspeed and torchtitan (see PEERS.md for the install):

    tests/oracles/.venv/bin/python tests/oracles/make_peer_router_fixtures.py
"""
import os
import types

import numpy as np
import torch
from torch import nn

from deepspeed.moe import sharded_moe
from torchtitan.components.optimizer import optimizer as tt_optimizer
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.moe import TokenChoiceTopKRouter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TESTDATA = os.path.join(ROOT, "moe", "gate", "testdata")

FORMAT = "# Blocks: 'case NAME', 'option KEY VALUE' lines, 'tensor NAME SHAPE : values', 'end'."

# name, gate, tokens, experts, keyword arguments of the gate. Capacity factors are exact
# binary fractions: DeepSpeed computes ceil(T / E · cf · k) in fp32, we in double, and the two
# agree unless that product lands within rounding of an integer.
DEEPSPEED = [
    ("top1_cf1", "top1", 12, 8, dict(capacity_factor=1.0, min_capacity=0)),
    ("top1_cf0_5_min2", "top1", 12, 8, dict(capacity_factor=0.5, min_capacity=2)),
    ("top1_dropless", "top1", 12, 8, dict(capacity_factor=1.0, min_capacity=0, drop_tokens=False)),
    ("top2_cf1", "top2", 12, 8, dict(capacity_factor=1.0, min_capacity=0)),
    ("top2_cf0_5", "top2", 12, 8, dict(capacity_factor=0.5, min_capacity=0)),  # first choices drop too
    ("top2_cf0_25_min3", "top2", 12, 8, dict(capacity_factor=0.25, min_capacity=3)),
    ("top2_dropless", "top2", 12, 8, dict(capacity_factor=1.0, min_capacity=0, drop_tokens=False)),
    ("top3_probs_cf1", "topk", 12, 8, dict(k=3, capacity_factor=1.0, min_capacity=0, drop_policy="probs")),
    ("top3_position_cf1", "topk", 12, 8, dict(k=3, capacity_factor=1.0, min_capacity=0, drop_policy="position")),
    ("top4_probs_cf0_5_min5", "topk", 12, 8,
     dict(k=4, capacity_factor=0.5, min_capacity=5, drop_policy="probs")),
    ("top4_dropless", "topk", 12, 8, dict(k=4, capacity_factor=1.0, min_capacity=0, drop_tokens=False)),
]

# name, experts, options of TokenChoiceTopKRouter.Config, whether to pass an expert bias.
TORCHTITAN = [
    ("softmax_k2", 8, dict(top_k=2, score_func="softmax"), False),
    ("softmax_k3_norm_scaled_groups_bias", 8,
     dict(top_k=3, score_func="softmax", route_norm=True, route_scale=2.5, num_expert_groups=4,
          num_limited_groups=2), True),
    ("sigmoid_k2_bias", 8, dict(top_k=2, score_func="sigmoid", route_scale=1.5), True),
    ("sigmoid_k2_norm", 8, dict(top_k=2, score_func="sigmoid", route_norm=True), False),
    ("sigmoid_k1_norm", 8, dict(top_k=1, score_func="sigmoid", route_norm=True), False),
    ("sigmoid_k6_norm_scaled_groups_bias", 16,
     dict(top_k=6, score_func="sigmoid", route_norm=True, route_scale=2.5, num_expert_groups=4,
          num_limited_groups=2), True),
]
BATCH, SEQ, HIDDEN = 2, 8, 4


def fmt(t):
    if t.dtype in (torch.bool, torch.int32, torch.int64):
        return " ".join(str(int(v)) for v in t.flatten().tolist())
    a = t.detach().to(torch.float32).flatten().numpy()
    out = [str(v) for v in a]
    # Shortest round-trip digits: the test reads them as double and rounds to fp32.
    assert all(np.float32(float(s)) == v for s, v in zip(out, a))
    return " ".join(out)


def tensor_line(name, t):
    shape = ",".join(str(d) for d in t.shape) if t.dim() else "scalar"
    return f"tensor {name} {shape} : {fmt(t)}"


def write(name, lines):
    path = os.path.join(TESTDATA, name)
    os.makedirs(TESTDATA, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def small(T, E, g):
    """Weights for a gradient: eighths in [-1, 1], short to write and exact in fp32."""
    return torch.randint(-8, 9, (T, E), generator=g).float() / 8


def grid(shape, g):
    """Multiples of 1/512 in [-1, 1]: x·Wᵀ over HIDDEN = 4 is then exact in fp32 in any
    summation order, so logits are the same bits whatever BLAS computes them."""
    return torch.randint(-512, 513, shape, generator=g).float() / 512


def deepspeed_cases():
    lines = ["# DeepSpeed 0.19.8 deepspeed.moe.sharded_moe gating on seeded fp32 logits",
             "# (tests/oracles/make_peer_router_fixtures.py). combine_weights and dispatch_mask",
             "# [T, E, C] are stored as [T, E] and 'slot' (the capacity index; -1 where not",
             "# dispatched, so dispatch_mask is slot >= 0): each (t, e) holds at most one slot,",
             "# which the generator asserts, so nothing is lost.",
             FORMAT]
    for i, (name, gate, T, E, kw) in enumerate(DEEPSPEED):
        g = torch.Generator().manual_seed(5000 + i)
        logits = torch.randn(T, E, generator=g, dtype=torch.float32)
        weights = small(T, E, g)  # for a gradient
        x = logits.clone().requires_grad_(True)
        if gate == "top1":
            l_aux, combine, dispatch, counts = sharded_moe.top1gating(x, use_rts=False, **kw)
        elif gate == "top2":
            l_aux, combine, dispatch, counts = sharded_moe.top2gating(
                x, top2_2nd_expert_sampling=False, **kw)
        else:
            l_aux, combine, dispatch, counts = sharded_moe.topkgating(x, **kw)
        ((combine * weights.unsqueeze(-1)).sum() + l_aux).backward()
        C = combine.shape[2]
        assert (dispatch.sum(-1) <= 1).all()
        slot = torch.where(dispatch.any(-1), dispatch.float().argmax(-1), torch.full((T, E), -1))
        at = torch.where(slot >= 0, slot, C).unsqueeze(-1)  # C: a spare slot, cut off below
        dense = torch.zeros(T, E, C + 1).scatter(2, at, combine.detach().sum(-1, keepdim=True))[:, :, :C]
        assert torch.equal(dense, combine.detach()) and torch.equal(dense.bool(), dispatch)
        lines += [f"case {name}", "option kind deepspeed", f"option gate {gate}",
                  f"option k {kw.get('k', 2 if gate == 'top2' else 1)}",
                  f"option drop_tokens {kw.get('drop_tokens', True)}"]
        lines += [f"option {k} {v}" for k, v in kw.items() if k not in ("k", "drop_tokens")]
        lines += [f"option capacity {C}", tensor_line("logits", logits),
                  tensor_line("grad_weights", weights), tensor_line("l_aux", l_aux.detach()),
                  tensor_line("exp_counts", counts), tensor_line("combine_weights", combine.detach().sum(-1)),
                  tensor_line("slot", slot),
                  tensor_line("grad_logits", x.grad), "end"]
    return lines


def torchtitan_cases():
    lines = ["# torchtitan 0.3.0 TokenChoiceTopKRouter and its expert-bias update on seeded fp32",
             "# inputs (tests/oracles/make_peer_router_fixtures.py). x is [batch·seq, hidden]; the",
             "# gradients are of sum(grad_weights[t, ids] · top_scores).",
             FORMAT]
    for i, (name, E, opts, with_bias) in enumerate(TORCHTITAN):
        g = torch.Generator().manual_seed(6000 + i)
        x = grid((BATCH, SEQ, HIDDEN), g)
        w = grid((E, HIDDEN), g)
        weights = small(BATCH * SEQ, E, g)
        bias = torch.randn(E, generator=g, dtype=torch.float32) * 0.05 if with_bias else None
        router = TokenChoiceTopKRouter.Config(
            num_experts=E, gate=Linear.Config(in_features=HIDDEN, out_features=E), **opts).build()
        with torch.no_grad():
            router.gate.weight.copy_(w)
        seen = {}

        def keep_logits(module, args, out):
            out.retain_grad()
            seen["logits"] = out

        router.gate.register_forward_hook(keep_logits)
        xin = x.clone().requires_grad_(True)
        top_scores, ids, _ = router(xin, bias)
        top_scores = top_scores.reshape(BATCH * SEQ, -1)
        ids = ids.reshape(BATCH * SEQ, -1)
        (top_scores * weights.gather(1, ids)).sum().backward()
        logits = seen["logits"]
        lines += [f"case {name}", "option kind torchtitan", f"option num_experts {E}"]
        lines += [f"option {k} {v}" for k, v in opts.items()]
        lines += [f"option batch {BATCH}", f"option seq {SEQ}",
                  tensor_line("x", x.reshape(BATCH * SEQ, HIDDEN)), tensor_line("gate_weight", w)]
        if bias is not None:
            lines.append(tensor_line("expert_bias", bias))
        lines += [tensor_line("logits", logits.detach().reshape(BATCH * SEQ, E)),
                  tensor_line("top_scores", top_scores), tensor_line("ids", ids),
                  tensor_line("grad_weights", weights),
                  tensor_line("grad_logits", logits.grad.reshape(BATCH * SEQ, E)),
                  tensor_line("grad_x", xin.grad.reshape(BATCH * SEQ, HIDDEN)),
                  tensor_line("grad_gate_weight", router.gate.weight.grad), "end"]
    # The expert-bias update is a closure inside register_moe_load_balancing_hook: register it
    # on a stand-in optimizer and model (one MoE layer, no parallelism) and call it.
    for i, E in enumerate([8, 16]):
        g = torch.Generator().manual_seed(7000 + i)
        tokens = torch.randint(0, 50, (E,), generator=g).float()
        # Expert 0 exactly average (sign 0; only the centring moves it): whole counts whose
        # mean is a whole number.
        tokens[1] += -int(tokens[1:].sum()) % (E - 1)
        tokens[0] = tokens[1:].sum() / (E - 1)
        assert tokens[0] == tokens.mean()
        bias = torch.randn(E, generator=g) * 0.01
        moe = nn.Module()
        moe.load_balance_coeff = 1e-3
        moe.register_buffer("tokens_per_expert_E", tokens.clone())
        moe.register_buffer("expert_bias_E", bias.clone())
        block = nn.Module()
        block.moe_enabled = True
        block.moe = moe
        model = nn.Module()
        model.layers = nn.ModuleDict({"0": block})
        hooks = []
        optimizers = types.SimpleNamespace(register_step_pre_hook=hooks.append)
        parallel_dims = types.SimpleNamespace(get_optional_mesh=lambda name: None, ep_enabled=False, tp=1)
        tt_optimizer.register_moe_load_balancing_hook(optimizers, [model], parallel_dims)
        assert len(hooks) == 1
        hooks[0]()
        assert not moe.tokens_per_expert_E.any()
        lines += [f"case bias_update_{E}", "option kind bias_update", "option rate 0.001",
                  tensor_line("tokens_per_expert", tokens), tensor_line("expert_bias", bias),
                  tensor_line("updated_bias", moe.expert_bias_E), "end"]
    return lines


def main():
    write("deepspeed_router.txt", deepspeed_cases())
    write("torchtitan_router.txt", torchtitan_cases())


if __name__ == "__main__":
    main()
