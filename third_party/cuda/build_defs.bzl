"""CUDA build helpers: if_cuda(), CUDA_ONLY and sy_cuda_library() (nvcc through a genrule).

    load("//third_party/cuda:build_defs.bzl", "sy_cuda_library")
    sy_cuda_library(name = "kernels", srcs = ["k.cu"], hdrs = ["k.h"])

Default builds never call nvcc: CUDA targets are incompatible (skipped by //...) unless
--config=cuda is given.
"""

load("@local_cuda//:defs.bzl", "CUDA_FOUND", "CUDA_HOME", "NVCC")

def if_cuda(if_true, if_false = []):
    """`if_true` under --config=cuda, else `if_false`."""
    return select({
        "@switchyard//third_party/cuda:enabled": if_true,
        "//conditions:default": if_false,
    })

# target_compatible_with value for targets that only make sense with CUDA. Tag such targets
# "cuda" too: .ci/run builds everything tagged so with --config=cuda.
CUDA_ONLY = select({
    "@switchyard//third_party/cuda:enabled": [],
    "//conditions:default": ["@switchyard//third_party/cuda:cuda_only"],
})

# target_compatible_with value for targets that need a CUDA toolkit's headers but no nvcc or
# GPU (the CPU emulator's, third_party/cuda_emu): skipped where no toolkit is installed.
CUDA_HEADERS_ONLY = [] if CUDA_FOUND else ["@switchyard//third_party/cuda:cuda_only"]

# Hopper (H100/H200). sm_90a would allow Hopper-only instructions (wgmma, TMA).
DEFAULT_CUDA_ARCH = "sm_90"

def sy_cuda_library(name, srcs, hdrs = [], deps = [], arch = DEFAULT_CUDA_ARCH, cu_hdrs = [], **kwargs):
    """A cc_library whose .cu sources are compiled by nvcc.

    Args:
      srcs: .cu files.
      hdrs: public headers (usable from C++ and from the .cu files).
      cu_hdrs: other headers the .cu files include (project-relative labels).
      deps: cc deps of the resulting library (not seen by nvcc).
      arch: the -arch nvcc is given.
    """
    repo = native.repository_name()
    root = "." if repo == "@" else "external/" + repo[1:]
    objs = []
    for src in srcs:
        obj = "_%s_%s.o" % (name, src.replace("/", "_").replace(".cu", ""))
        if NVCC:
            cmd = ("%s -c -O2 -std=c++17 -Xcompiler -fPIC -arch=%s " +
                   "-I%s -I$(GENDIR)/%s -o $@ $(location %s)") % (NVCC, arch, root, root, src)
        else:
            cmd = ("echo 'no CUDA toolkit at %s (set CUDA_HOME): --config=cuda needs nvcc to " +
                   "compile %s' >&2; exit 1") % (CUDA_HOME, src)
        native.genrule(
            name = obj.replace(".", "_"),
            srcs = [src] + hdrs + cu_hdrs,
            outs = [obj],
            cmd = cmd,
            target_compatible_with = CUDA_ONLY,
            tags = kwargs.get("tags", []) + ["cuda"],
        )
        objs.append(obj)
    lib_kwargs = dict(kwargs)
    lib_kwargs["tags"] = kwargs.get("tags", []) + ["cuda"]
    native.cc_library(
        name = name,
        srcs = objs,
        hdrs = hdrs,
        deps = deps + ["@local_cuda//:cudart"],
        target_compatible_with = CUDA_ONLY,
        **lib_kwargs
    )
