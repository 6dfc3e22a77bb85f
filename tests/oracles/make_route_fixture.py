#!/usr/bin/env python3
"""Writes the fixtures of moe/gate/route_test.sh, which runs //moe/gate:route on them:

- moe/gate/testdata/route_input.safetensors: the tool's input (logits in F64, F32 and F16,
  BF16 hidden states with an F32 gate weight, an expert bias, and an I64 tensor for the
  bad-dtype check), written by the Python `safetensors` package;
- moe/gate/testdata/route_cases.txt: one line per case, "NAME|FLAGS";
- moe/gate/testdata/route_expected.safetensors: per case, "NAME/<output>" tensors and
  "NAME/<key>" metadata that the tool's output must match.

Token-choice expectations come from Megatron-Core 0.16.1's own functions
(topk_routing_with_score_function, apply_router_token_dropping,
compute_routing_scores_for_aux_loss, switch_load_balancing_loss_func with its per-sequence
reshape, z_loss_func), except which tokens drop by position: Megatron-Core leaves that to
torch.topk's order among equal entries, so it comes from the definition (each expert keeps
its earliest routed tokens) with Megatron-Core's per-expert counts asserted equal.
Megatron-Core has no expert-choice router: that case is computed here in plain torch from its
definition (softmax over experts; each expert takes its
ceil(T·cf/E) best tokens). Inputs are drawn so that no choice is within 1e-4 of a tie, which
keeps fp32 rounding differences from flipping a decision.

Needs tests/oracles/.venv (PEERS.md) plus `pip install safetensors`:

    tests/oracles/.venv/bin/python tests/oracles/make_route_fixture.py
"""
import math
import os

import torch
import torch.distributed as dist
from megatron.core.transformer.moe import moe_utils as mu
from megatron_cpu import init_one_rank
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TESTDATA = os.path.join(ROOT, "moe", "gate", "testdata")
MARGIN = 1e-4


def shortest(v):
    """As route_main.cc's Shortest: the shortest %g that reads back as v."""
    for p in range(1, 18):
        s = f"{v:.{p}g}"
        if float(s) == v:
            return s
    return f"{v:.17g}"


def check_margin(name, values, k, dim):
    """The k-th and (k+1)-th largest along dim must differ by more than MARGIN."""
    if k >= values.shape[dim] or values.numel() == 0:
        return
    top = torch.topk(values, k + 1, dim=dim).values.narrow(dim, k - 1, 2)
    gap = (top.narrow(dim, 0, 1) - top.narrow(dim, 1, 1)).min().item()
    assert gap > MARGIN, f"{name}: a near-tie ({gap}) at the k-th place; change the seed"


def token_choice(name, logits, topk, *, pre_softmax=False, score="softmax", num_groups=None,
                 group_topk=None, scaling=None, bias=None, cf=0.0, policy="probs", pad=False):
    """Megatron-Core's routing and dropping; returns the tool's outputs."""
    x = logits.float()
    probs, pre_map = mu.topk_routing_with_score_function(
        x, topk, use_pre_softmax=pre_softmax, num_groups=num_groups, group_topk=group_topk,
        scaling_factor=scaling, score_function=score, expert_bias=bias)
    # The order of each token's experts: by the score that chose them (biased when there is
    # a bias), best first; ties (none here) to the lower index.
    if score == "sigmoid":
        select = torch.sigmoid(x)
    else:
        select = torch.softmax(x, -1) if pre_softmax else x
    if bias is not None:
        select = select + bias
    if group_topk is None:
        check_margin(name, select, topk, 1)
    key = torch.where(pre_map, select, torch.full_like(select, -math.inf))
    idx = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :topk]
    out = {"topk_indices": idx, "topk_weights": probs.gather(1, idx),
           "tokens_per_expert": pre_map.sum(0)}
    if cf > 0:
        if policy == "probs":
            capacity = mu.get_capacity(num_tokens=x.shape[0] * topk, num_experts=x.shape[1],
                                       capacity_factor=cf)
            over = pre_map.sum(0) > capacity  # experts that drop: their cut must be clear
            check_margin(name, probs[:, over], capacity, 0)
        meg_probs, meg_map = mu.apply_router_token_dropping(probs, pre_map, topk, cf,
                                                            drop_policy=policy, pad_to_capacity=pad)
        if policy == "position":
            # Megatron-Core keeps the tokens torch.topk picks among equal 0/1 entries, on the
            # CPU not the earliest ones; the reference is the definition (as router_test.cc):
            # each expert's first `capacity` routed tokens, then with padding its earliest
            # unrouted tokens. Megatron-Core must keep as many, routed and in all.
            capacity = mu.get_capacity(num_tokens=x.shape[0] * topk, num_experts=x.shape[1],
                                       capacity_factor=cf)
            final_map = pre_map & (pre_map.long().cumsum(0) <= capacity)
            if pad:
                free = capacity - final_map.sum(0, keepdim=True)
                unrouted = ~pre_map
                final_map = final_map | (unrouted & (unrouted.long().cumsum(0) <= free))
            assert torch.equal((meg_map & pre_map).sum(0), (final_map & pre_map).sum(0)), name
            assert torch.equal(meg_map.sum(0), final_map.sum(0)), name
            probs = probs * final_map
        else:
            probs, final_map = meg_probs, meg_map
    else:
        final_map = pre_map
    out.update(probs=probs, routing_map=final_map, dropped=pre_map & ~final_map)
    return out


def expert_choice(name, logits, cf):
    x = logits.float()
    T, E = x.shape
    scores = torch.softmax(x, -1)
    capacity = min(T, math.ceil(T * cf / E))
    check_margin(name, scores, capacity, 0)
    routing_map = torch.zeros(T, E, dtype=torch.bool)
    for e in range(E):
        order = sorted(range(T), key=lambda t: (-scores[t, e].item(), t))
        routing_map[order[:capacity], e] = True
    return {"topk_indices": torch.zeros(T, 0, dtype=torch.int64),
            "topk_weights": torch.zeros(T, 0, dtype=torch.float32),
            "probs": scores * routing_map, "routing_map": routing_map,
            "tokens_per_expert": routing_map.sum(0), "dropped": torch.zeros(T, E, dtype=torch.bool)}, capacity


def batch_aux(logits, topk, score, coeff):
    x = logits.float()
    routing_map, scores = mu.compute_routing_scores_for_aux_loss(x, topk, score)
    return mu.switch_load_balancing_loss_func(scores, routing_map.sum(0), x.shape[0], topk,
                                              x.shape[1], coeff)


def sequence_aux(logits, topk, score, coeff, num_sequences, group):
    """Megatron-Core's per-sequence loss (TopKRouter._apply_seq_aux_loss). Its tokens are in
    [seq, batch] order; the tool's are sequences one after another, so reorder first."""
    x = logits.float()
    T, E = x.shape
    B, S = num_sequences, T // num_sequences
    x = x.view(B, S, E).transpose(0, 1).reshape(S * B, E)
    routing_map, scores = mu.compute_routing_scores_for_aux_loss(x, topk, score)
    tpe, _, total = mu.get_tokens_per_expert_and_token_count(
        routing_map=routing_map.reshape(S, -1), reduce_group=group, topk=topk * B)
    return mu.switch_load_balancing_loss_func(scores.reshape(S, -1), tpe, total, topk, E, coeff) / B


def main():
    group = init_one_rank()

    g = torch.Generator().manual_seed(5000)
    inputs = {
        # F64 holding fp32 values, so the tool's conversion to fp32 is exact.
        "logits": torch.randn(32, 8, generator=g).double(),
        "logits_sigmoid": torch.randn(32, 16, generator=g),
        "bias": torch.randn(16, generator=g) * 0.1,
        "hidden": torch.randn(24, 16, generator=g).to(torch.bfloat16),
        "weight": torch.randn(8, 16, generator=g) * 0.5,
        "logits_f16": torch.randn(16, 4, generator=g).half(),
        "token_ids": torch.arange(4, dtype=torch.int64),
    }
    cases = []  # (name, flags, outputs, metadata)

    def meta(common, **extra):
        m = {"tool": "switchyard //moe/gate:route", "tokens": str(common[0]),
             "experts": str(common[1])}
        m.update({k: str(v) for k, v in extra.items()})
        return m

    def tc_meta(T, E, top_k, capacity, cf, aux, z, score="softmax", pre="false", groups=0,
                group_topk=0, scaling=1.0, policy="score", pad="false", **extra):
        return meta((T, E), routing="token_choice", top_k=top_k, score=score, pre_softmax=pre,
                    num_groups=groups, group_topk=group_topk, scaling_factor=shortest(scaling),
                    capacity_factor=shortest(cf), drop_policy=policy, pad_to_capacity=pad,
                    capacity=capacity, aux_loss=aux, z_loss_coeff=shortest(z), **extra)

    # 1. Softmax after top-k, capacity with drop by score, batch aux loss and z-loss; the
    #    default input name.
    x = inputs["logits"]
    out = token_choice("softmax_capacity", x, 2, cf=1.0, policy="probs")
    out["aux_loss"] = batch_aux(x, 2, "softmax", 0.01)
    out["z_loss"] = mu.z_loss_func(x.float(), 0.001)
    cases.append(("softmax_capacity",
                  "--top_k=2 --capacity_factor=1 --drop_policy=score --aux_loss=batch "
                  "--aux_loss_coeff=0.01 --z_loss_coeff=0.001", out,
                  tc_meta(32, 8, 2, mu.get_capacity(num_tokens=64, num_experts=8, capacity_factor=1.0),
                          1.0, "batch", 0.001, aux_loss_coeff="0.01", logits="logits")))

    # 2. Sigmoid, group-limited, scaled, expert bias; capacity with drop by position; the
    #    per-sequence aux loss over 4 sequences.
    x = inputs["logits_sigmoid"]
    out = token_choice("sigmoid_groups_bias", x, 4, score="sigmoid", num_groups=4, group_topk=2,
                       scaling=2.5, bias=inputs["bias"], cf=0.5, policy="position")
    out["aux_loss"] = sequence_aux(x, 4, "sigmoid", 0.01, 4, group)
    out["z_loss"] = torch.zeros(())
    cases.append(("sigmoid_groups_bias",
                  "--logits=logits_sigmoid --score=sigmoid --top_k=4 --num_groups=4 --group_topk=2 "
                  "--scaling_factor=2.5 --expert_bias=bias --capacity_factor=0.5 "
                  "--drop_policy=position --aux_loss=sequence --num_sequences=4 --aux_loss_coeff=0.01",
                  out,
                  tc_meta(32, 16, 4, mu.get_capacity(num_tokens=128, num_experts=16, capacity_factor=0.5),
                          0.5, "sequence", 0.0, score="sigmoid", groups=4, group_topk=2, scaling=2.5,
                          policy="position", aux_loss_coeff="0.01", num_sequences=4,
                          logits="logits_sigmoid", expert_bias="bias")))

    # 3. Hidden states (BF16) times the gate weight; softmax before top-k; capacity with drop
    #    by position and padding; no aux loss.
    logits = inputs["hidden"].float() @ inputs["weight"].t()
    out = token_choice("hidden_pre_softmax_pad", logits, 2, pre_softmax=True, cf=1.5,
                       policy="position", pad=True)
    out["aux_loss"] = torch.zeros(())
    out["z_loss"] = mu.z_loss_func(logits, 0.01)
    cases.append(("hidden_pre_softmax_pad",
                  "--hidden=hidden --weight=weight --top_k=2 --pre_softmax --capacity_factor=1.5 "
                  "--drop_policy=position --pad_to_capacity --aux_loss=none --z_loss_coeff=0.01",
                  out,
                  tc_meta(24, 8, 2, mu.get_capacity(num_tokens=48, num_experts=8, capacity_factor=1.5),
                          1.5, "none", 0.01, pre="true", policy="position", pad="true",
                          hidden="hidden", weight="weight")))

    # 4. Expert choice on F16 logits.
    x = inputs["logits_f16"]
    out, capacity = expert_choice("expert_choice", x, 2.0)
    out["aux_loss"] = torch.zeros(())
    out["z_loss"] = mu.z_loss_func(x.float(), 0.001)
    cases.append(("expert_choice",
                  "--logits=logits_f16 --routing=expert_choice --capacity_factor=2 --z_loss_coeff=0.001",
                  out,
                  meta((16, 4), routing="expert_choice", capacity_factor="2", capacity=capacity,
                       aux_loss="none", z_loss_coeff="0.001", logits="logits_f16")))
    dist.destroy_process_group()

    dtypes = {"topk_indices": torch.int64, "topk_weights": torch.float32, "probs": torch.float32,
              "routing_map": torch.bool, "tokens_per_expert": torch.int64, "dropped": torch.bool,
              "aux_loss": torch.float32, "z_loss": torch.float32}
    expected, metadata = {}, {}
    for name, _, out, m in cases:
        assert set(out) == set(dtypes), (name, sorted(out))
        for key, t in out.items():
            expected[f"{name}/{key}"] = t.detach().to(dtypes[key]).reshape(t.shape).contiguous()
        for key, v in m.items():
            metadata[f"{name}/{key}"] = v
    os.makedirs(TESTDATA, exist_ok=True)
    save_file({k: v.contiguous() for k, v in inputs.items()},
              os.path.join(TESTDATA, "route_input.safetensors"),
              metadata={"note": "made by tests/oracles/make_route_fixture.py"})
    save_file(expected, os.path.join(TESTDATA, "route_expected.safetensors"), metadata=metadata)
    with open(os.path.join(TESTDATA, "route_cases.txt"), "w") as f:
        f.write("# NAME|FLAGS for //moe/gate:route (tests/oracles/make_route_fixture.py); the\n"
                "# expected outputs are NAME/* in route_expected.safetensors.\n")
        for name, flags, _, _ in cases:
            f.write(f"{name}|{flags}\n")
    for name, _, out, _ in cases:
        print(f"{name}: {int(out['dropped'].sum())} dropped, aux {out['aux_loss'].item():.6g}, "
              f"z {out['z_loss'].item():.6g}")
    print(f"wrote {TESTDATA}/route_{{input,expected}}.safetensors and route_cases.txt")


if __name__ == "__main__":
    main()
