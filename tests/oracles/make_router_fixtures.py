#!/usr/bin/env python3
"""Writes moe/gate/testdata/megatron_router.txt: inputs, outputs and gradients of
Megatron-Core's routing functions on seeded inputs, for router_test.cc to compare with.

Needs tests/oracles/.venv with torch and megatron-core (see PEERS.md for the install):

    tests/oracles/.venv/bin/python tests/oracles/make_router_fixtures.py
"""
import os

import torch
import torch.distributed as dist
from megatron.core.transformer.moe import moe_utils as mu
from megatron_cpu import init_one_rank

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "moe", "gate", "testdata", "megatron_router.txt")

# name, tokens, experts, options for topk_routing_with_score_function
ROUTING = [
    ("softmax_post_k2", 32, 8, dict(topk=2)),
    ("softmax_pre_k2", 32, 8, dict(topk=2, use_pre_softmax=True)),
    ("softmax_post_k1", 32, 8, dict(topk=1)),
    ("softmax_pre_k8_all", 16, 8, dict(topk=8, use_pre_softmax=True)),
    ("one_expert", 8, 1, dict(topk=1, use_pre_softmax=True)),
    ("sigmoid_k2", 32, 16, dict(topk=2, score_function="sigmoid")),
    ("sigmoid_k1", 32, 16, dict(topk=1, score_function="sigmoid")),
    ("sigmoid_groups_bias_scaled", 32, 16,
     dict(topk=4, score_function="sigmoid", num_groups=4, group_topk=2, scaling_factor=2.5,
          expert_bias=True)),
    ("softmax_pre_groups_k3", 32, 16,
     dict(topk=3, use_pre_softmax=True, num_groups=4, group_topk=2)),
    ("softmax_pre_scaled", 32, 8, dict(topk=2, use_pre_softmax=True, scaling_factor=0.5)),
]
# name, routing case it drops from, capacity factor, drop policy, pad to capacity
DROPPING = [
    ("drop_probs_cf1", "softmax_post_k2", 1.0, "probs", False),
    ("drop_position_cf1", "softmax_post_k2", 1.0, "position", False),
    ("drop_probs_cf1_5_pad", "softmax_pre_k2", 1.5, "probs", True),
    ("drop_position_cf0_5", "sigmoid_k2", 0.5, "position", False),
]


def fmt(t):
    t = t.detach().to(torch.float64).flatten().tolist()
    return " ".join(repr(float(v)) for v in t)


def tensor_line(name, t):
    shape = ",".join(str(d) for d in t.shape) if t.dim() else "scalar"
    return f"tensor {name} {shape} : {fmt(t)}"


def main():
    lines = ["# Megatron-Core 0.16.1 routing on seeded fp32 inputs (tests/oracles/make_router_fixtures.py).",
             "# Blocks: 'case NAME', 'option KEY VALUE' lines, 'tensor NAME SHAPE : values', 'end'."]
    routed = {}
    for i, (name, T, E, opts) in enumerate(ROUTING):
        g = torch.Generator().manual_seed(1000 + i)
        logits = torch.randn(T, E, generator=g, dtype=torch.float32)
        weights = torch.randn(T, E, generator=g, dtype=torch.float32)  # for a gradient
        opts = dict(opts)
        bias = None
        if opts.pop("expert_bias", False):
            bias = torch.randn(E, generator=g, dtype=torch.float32) * 0.1
        x = logits.clone().requires_grad_(True)
        probs, routing_map = mu.topk_routing_with_score_function(x, expert_bias=bias, **opts)
        (probs * weights).sum().backward()
        routed[name] = (logits, probs.detach(), routing_map, opts["topk"])
        lines.append(f"case {name}")
        lines.append(f"option kind routing")
        for k, v in opts.items():
            lines.append(f"option {k} {v}")
        lines.append(tensor_line("logits", logits))
        if bias is not None:
            lines.append(tensor_line("expert_bias", bias))
        lines.append(tensor_line("probs", probs))
        lines.append(tensor_line("routing_map", routing_map.float()))
        lines.append(tensor_line("grad_weights", weights))
        lines.append(tensor_line("grad_logits", x.grad))
        lines.append("end")
    for name, src, cf, policy, pad in DROPPING:
        logits, probs, routing_map, topk = routed[src]
        p, m = mu.apply_router_token_dropping(probs.clone(), routing_map.clone(), topk, cf,
                                              drop_policy=policy, pad_to_capacity=pad)
        capacity = mu.get_capacity(num_tokens=logits.shape[0] * topk, num_experts=logits.shape[1],
                                   capacity_factor=cf)
        lines += [f"case {name}", "option kind dropping", f"option from {src}",
                  f"option capacity_factor {cf}", f"option drop_policy {policy}",
                  f"option pad_to_capacity {pad}", f"option capacity {capacity}",
                  tensor_line("probs", p), tensor_line("routing_map", m.float()), "end"]
    # Losses on the first routing case's logits.
    for i, (name, T, E, topk, score) in enumerate([("aux_softmax_k2", 32, 8, 2, "softmax"),
                                                     ("aux_sigmoid_k3", 32, 16, 3, "sigmoid")]):
        g = torch.Generator().manual_seed(2000 + i)
        logits = torch.randn(T, E, generator=g, dtype=torch.float32)
        x = logits.clone().requires_grad_(True)
        routing_map, scores = mu.compute_routing_scores_for_aux_loss(x, topk, score)
        tokens_per_expert = routing_map.sum(dim=0)
        aux = mu.switch_load_balancing_loss_func(scores, tokens_per_expert, T, topk, E, 0.01)
        aux.backward()
        z_in = logits.clone().requires_grad_(True)
        z = mu.z_loss_func(z_in, 0.001)
        z.backward()
        lines += [f"case {name}", "option kind losses", f"option topk {topk}",
                  f"option score_function {score}", "option aux_loss_coeff 0.01",
                  "option z_loss_coeff 0.001", tensor_line("logits", logits),
                  tensor_line("tokens_per_expert", tokens_per_expert.float()),
                  tensor_line("aux_loss", aux.detach()), tensor_line("aux_grad_logits", x.grad),
                  tensor_line("z_loss", z.detach()), tensor_line("z_grad_logits", z_in.grad), "end"]
    # Sequence-level loss and the expert-bias update go through Megatron-Core's own
    # group-reducing helpers, which want torch.distributed: a one-rank Gloo group.
    group = init_one_rank()
    for i, (name, S, B, E, topk, score) in enumerate([("seq_aux_softmax_k2", 16, 4, 8, 2, "softmax"),
                                                        ("seq_aux_sigmoid_k3", 8, 3, 16, 3, "sigmoid")]):
        g = torch.Generator().manual_seed(3000 + i)
        logits = torch.randn(S * B, E, generator=g, dtype=torch.float32)  # [seq, batch] order
        x = logits.clone().requires_grad_(True)
        routing_map, scores = mu.compute_routing_scores_for_aux_loss(x, topk, score)
        # As TopKRouter._apply_seq_aux_loss: batch folded into the expert dimension.
        tpe, _, total = mu.get_tokens_per_expert_and_token_count(
            routing_map=routing_map.reshape(S, -1), reduce_group=group, topk=topk * B)
        loss = mu.switch_load_balancing_loss_func(scores.reshape(S, -1), tpe, total, topk, E, 0.01) / B
        loss.backward()
        lines += [f"case {name}", "option kind seq_losses", f"option topk {topk}",
                  f"option score_function {score}", f"option seq_length {S}", f"option batch {B}",
                  "option aux_loss_coeff 0.01", "option layout seq_major",
                  tensor_line("logits", logits), tensor_line("seq_aux_loss", loss.detach()),
                  tensor_line("seq_aux_grad_logits", x.grad), "end"]
    for i, E in enumerate([8, 16]):
        g = torch.Generator().manual_seed(4000 + i)
        tokens = torch.randint(0, 50, (E,), generator=g).float()
        tokens[0] = tokens.mean()  # exactly average: sign 0, no move
        bias = torch.randn(E, generator=g) * 0.01
        new_bias = mu.get_updated_expert_bias(tokens.clone(), bias.clone(), 1e-3)
        lines += [f"case bias_update_{E}", "option kind bias_update", "option rate 0.001",
                  tensor_line("tokens_per_expert", tokens), tensor_line("expert_bias", bias),
                  tensor_line("updated_bias", new_bias), "end"]
    dist.destroy_process_group()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
