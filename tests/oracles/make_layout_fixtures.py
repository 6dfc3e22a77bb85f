#!/usr/bin/env python3
"""Writes dist/groups/testdata/megatron_layouts.txt: the rank groups Megatron-Core's own code
produces, for layout_megatron_test.cc to compare with ours.

Installs megatron-core from PyPI (no dependencies) into tests/oracles/.venv, then executes
the real definitions of RankGenerator, generate_masked_orthogonal_rank_groups and
default_embedding_ranks from its parallel_state.py. Importing the module itself would need
torch (for process groups we do not use here), so those definitions are taken from the
source with `ast` and run as they are.

    python3 tests/oracles/make_layout_fixtures.py
"""
import ast
import os
import subprocess
import sys
import venv

MEGATRON_CORE = "megatron-core==0.16.1"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
VENV = os.path.join(HERE, ".venv")
OUT = os.path.join(ROOT, "dist", "groups", "testdata", "megatron_layouts.txt")

# (world, tp, cp, pp, ep, etp, order). etp None = Megatron's default (= tp).
CONFIGS = [
    (8, 2, 1, 1, 2, None, "tp-cp-ep-dp-pp"),
    (8, 1, 1, 1, 4, None, "tp-cp-ep-dp-pp"),
    (8, 2, 1, 1, 4, 1, "tp-cp-ep-dp-pp"),     # ep ≠ tp, etp < tp
    (16, 2, 1, 4, 1, None, "tp-cp-ep-dp-pp"),  # Megatron's docstring example
    (16, 2, 1, 2, 2, 1, "tp-cp-ep-dp-pp"),
    (16, 1, 1, 2, 2, 2, "tp-cp-ep-dp-pp"),     # etp > tp
    (16, 2, 2, 2, 2, 2, "tp-cp-ep-dp-pp"),     # cp > 1
    (32, 2, 2, 2, 4, 1, "tp-cp-ep-dp-pp"),
    (32, 4, 1, 2, 2, 2, "tp-cp-ep-dp-pp"),
    (24, 2, 1, 3, 2, None, "tp-cp-ep-dp-pp"),
    (64, 2, 2, 4, 4, 2, "tp-cp-ep-dp-pp"),
    (64, 4, 1, 2, 8, 1, "tp-cp-ep-dp-pp"),
    (16, 2, 1, 2, 2, 1, "tp-cp-ep-pp-dp"),     # pp before dp (etp × ep = tp × cp)
    (16, 2, 1, 2, 1, None, "tp-pp-dp"),        # cp and ep left out of the order
    (12, 1, 1, 1, 3, None, "tp-cp-ep-dp-pp"),
    (48, 2, 2, 2, 3, 2, "tp-cp-ep-dp-pp"),
]

DENSE = [("tp", "tp"), ("cp", "cp"), ("dp", "dp"), ("dp_cp", "dp-cp"), ("tp_cp", "tp-cp"),
         ("pp", "pp"), ("mp", "tp-pp"), ("gate", "tp-dp-cp")]
EXPERT = [("ep", "ep"), ("etp", "tp"), ("edp", "dp"), ("etp_ep", "tp-ep"),
          ("tp_ep_pp", "tp-ep-pp")]
WANTED = {"RankGenerator", "generate_masked_orthogonal_rank_groups", "default_embedding_ranks"}


def megatron_source():
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        venv.create(VENV, with_pip=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", MEGATRON_CORE], check=True)
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    path = os.path.join(site, "megatron", "core", "parallel_state.py")
    platlib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['platlib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    if not os.path.exists(path):
        path = os.path.join(platlib, "megatron", "core", "parallel_state.py")
    with open(path) as f:
        return f.read()


def load_megatron():
    tree = ast.parse(megatron_source())
    body = [n for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in WANTED]
    missing = WANTED - {n.name for n in body}
    if missing:
        sys.exit(f"parallel_state.py of {MEGATRON_CORE} lacks {sorted(missing)}")
    module = ast.Module(body=body, type_ignores=[])
    namespace = {"List": list, "Optional": None}
    exec(compile(module, "megatron/core/parallel_state.py", "exec"), namespace)
    return namespace


def main():
    m = load_megatron()
    lines = [f"# Rank groups from {MEGATRON_CORE}'s RankGenerator (parallel_state.py), made by",
             "# tests/oracles/make_layout_fixtures.py. One block per configuration: a config",
             "# line, then one line per group kind: groups separated by spaces, members by commas."]
    for world, tp, cp, pp, ep, etp, order in CONFIGS:
        dp = world // (tp * cp * pp)
        etp_ = tp if etp is None else etp
        edp = world // (etp_ * ep * pp)
        dense = m["RankGenerator"](tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=order)
        expert = m["RankGenerator"](tp=etp_, ep=ep, dp=edp, pp=pp, cp=1, order=order)
        # The two checks initialize_model_parallel makes.
        config = (world, tp, cp, pp, ep, etp, order)
        assert order.endswith("pp") or pp == 1 or edp == dp, f"Megatron rejects {config}"
        assert dense.get_ranks("pp") == expert.get_ranks("pp"), f"Megatron rejects {config}"
        lines.append(f"config world={world} tp={tp} cp={cp} pp={pp} ep={ep} "
                     f"etp={0 if etp is None else etp} order={order}")
        groups = [(name, dense.get_ranks(tok)) for name, tok in DENSE]
        groups += [(name, expert.get_ranks(tok)) for name, tok in EXPERT]
        groups.append(("embedding", [m["default_embedding_ranks"](g) for g in dense.get_ranks("pp")]))
        for name, gs in groups:
            lines.append(name + " " + " ".join(",".join(str(r) for r in g) for g in gs))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {len(CONFIGS)} configurations to {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
