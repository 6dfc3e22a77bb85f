#!/usr/bin/env python3
"""Writes common/testdata/python_writer.safetensors with the Python `safetensors` package (the
reference implementation's writer), for common/safetensors_test.cc to read back exactly; with
--check FILE, reads a file that our writer made with the same tensors (safetensors_test leaves
one as writer_sample.safetensors in its undeclared outputs) and checks every byte and the
metadata.

    tests/oracles/.venv/bin/pip install safetensors          # 0.8.0 was used
    tests/oracles/.venv/bin/python tests/oracles/make_safetensors_fixture.py
    unzip -o bazel-testlogs/common/safetensors_test/test.outputs/outputs.zip -d /tmp/st
    tests/oracles/.venv/bin/python tests/oracles/make_safetensors_fixture.py \
        --check /tmp/st/writer_sample.safetensors

The values are exactly representable in their dtypes (or literal constants that C++ and
Python round the same way), so safetensors_test.cc builds the same tensors independently.
Keep the two lists in step.
"""
import argparse
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "common", "testdata", "python_writer.safetensors")

# One key: the reference writer emits metadata in hash order, and safetensors_test.cc checks
# that our writer reproduces this file byte for byte.
METADATA = {"note": 'quote " backslash \\ newline \n tab \t e-acute \u00e9 check \u2713'}


def tensors():
    inf, nan = float("inf"), float("nan")
    return {
        "f32": torch.tensor([[0.1, -2.5, 3.0e38], [1e-45, -0.0, 1 / 3], [inf, -inf, nan]],
                            dtype=torch.float32),
        "f64": torch.tensor([1 / 3, -1e300, 5e-324, inf], dtype=torch.float64),
        "f16": torch.tensor([0.5, -65504.0, 2.0**-24, inf, -0.0, 1 + 2.0**-10], dtype=torch.float16),
        "bf16": torch.tensor([[1 + 2.0**-7, -(2 - 2.0**-7) * 2.0**127], [2.0**-133, 0.5]],
                             dtype=torch.bfloat16),
        "i8": torch.tensor([-128, 127, 0, -1], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 128, 7], dtype=torch.uint8),
        "i16": torch.tensor([-32768, 32767, 1234], dtype=torch.int16),
        "i32": torch.arange(8, dtype=torch.int32).reshape(2, 2, 2) - 3,
        "i32_limits": torch.tensor([-2**31, 2**31 - 1], dtype=torch.int32),
        "i64": torch.tensor([-2**63, 2**63 - 1, 2**40 + 3], dtype=torch.int64),
        "bool": torch.tensor([[True, False, True], [False, False, True]]),
        "scalar": torch.tensor(2.5, dtype=torch.float32),
        "empty": torch.zeros(0, 4, dtype=torch.float32),
    }


def raw(t):
    return t.contiguous().reshape(-1).view(torch.uint8).tolist()


def check(path):
    want = tensors()
    errors = []
    with safe_open(path, "pt") as f:
        if f.metadata() != METADATA:
            errors.append(f"metadata {f.metadata()!r} != {METADATA!r}")
        names = set(f.keys())
        if names != set(want):
            errors.append(f"tensor names {sorted(names)} != {sorted(want)}")
        for name in sorted(names & set(want)):
            got = f.get_tensor(name)
            w = want[name]
            if got.dtype != w.dtype or got.shape != w.shape or raw(got) != raw(w):
                errors.append(f"{name}: got {got.dtype} {list(got.shape)} {got}, want {w.dtype} "
                              f"{list(w.shape)} {w}")
    for e in errors:
        print("MISMATCH", e)
    if errors:
        sys.exit(1)
    print(f"{path}: all {len(want)} tensors and the metadata read back exactly by "
          f"safetensors {__import__('safetensors').__version__}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--check", metavar="FILE", help="read FILE (from our writer) and compare")
    args = p.parse_args()
    if args.check:
        check(args.check)
        return
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors(), OUT, metadata=METADATA)
    check(OUT)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
