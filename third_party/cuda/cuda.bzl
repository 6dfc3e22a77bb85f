"""CUDA and NCCL as an external repository: `@local_cuda`.

Finds the toolkit at CUDA_HOME, else /usr/local/cuda. When neither exists it writes stub
targets of the same names, so CPU machines analyse and build offline; the CUDA targets
themselves only build under `--config=cuda` (see build_defs.bzl).
"""

_BUILD_FOUND = '''package(default_visibility = ["//visibility:public"])

# CUDA 13 moved CCCL (cub, thrust, nv, cuda/) under include/cccl; some headers (nv/target)
# have no extension, hence include/** rather than *.h.
cc_library(
    name = "cuda_headers",
    hdrs = glob(["include/**"]),
    includes = ["include", "include/cccl"],
)

cc_library(
    name = "cudart",
    srcs = ["cuda_lib/libcudart.so"],
    linkopts = ["-Wl,-rpath,{lib}", "-ldl", "-lpthread", "-lrt"],
    deps = [":cuda_headers"],
)

cc_library(
    name = "cublas",
    srcs = ["cuda_lib/libcublas.so", "cuda_lib/libcublasLt.so"],
    deps = [":cudart"],
)

# NCCL: {nccl_where}
cc_library(
    name = "nccl",
    srcs = {nccl_srcs},
    hdrs = glob(["nccl_include/*.h"]),
    includes = ["nccl_include"],
    linkopts = {nccl_linkopts},
    deps = [":cudart"],
)
'''

_BUILD_STUB = '''package(default_visibility = ["//visibility:public"])

# No CUDA toolkit was found (CUDA_HOME or /usr/local/cuda). These empty targets keep CPU
# builds analysable; `--config=cuda` builds need the toolkit.
[cc_library(name = n) for n in ["cuda_headers", "cudart", "cublas", "nccl"]]
'''

def _cuda_repository_impl(ctx):
    home = ctx.os.environ.get("CUDA_HOME", "").strip() or "/usr/local/cuda"
    root = ctx.path(home)
    found = root.get_child("bin").get_child("nvcc").exists and root.get_child("include").exists
    ctx.file("WORKSPACE", 'workspace(name = "%s")\n' % ctx.name)
    if found:
        ctx.symlink(root.get_child("include"), "include")
        lib = root.get_child("lib64") if root.get_child("lib64").exists else root.get_child("lib")
        ctx.symlink(lib, "cuda_lib")
        # NCCL ships with some CUDA installs, and as Debian/Ubuntu's libnccl-dev elsewhere.
        nccl_home = ctx.os.environ.get("NCCL_HOME", "").strip()
        candidates = ([nccl_home + "/lib", nccl_home + "/lib64"] if nccl_home else []) + [
            str(lib),
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib64",
        ]
        nccl_lib = None
        for d in candidates:
            if ctx.path(d + "/libnccl.so").exists:
                nccl_lib = d
                break
        if nccl_lib:
            ctx.symlink(nccl_lib + "/libnccl.so", "nccl_lib/libnccl.so")
            for inc in [nccl_lib + "/../include", str(root.get_child("include")), "/usr/include"]:
                if ctx.path(inc + "/nccl.h").exists:
                    ctx.symlink(inc + "/nccl.h", "nccl_include/nccl.h")
                    break
            nccl_srcs, nccl_linkopts, where = ["nccl_lib/libnccl.so"], ["-Wl,-rpath," + nccl_lib], nccl_lib
        else:
            # The link then fails with "cannot find -lnccl", which names what is missing.
            nccl_srcs, nccl_linkopts, where = [], ["-lnccl"], "not found in " + ", ".join(candidates)
        ctx.file("BUILD", _BUILD_FOUND.format(
            lib = str(lib),
            nccl_where = where,
            nccl_srcs = repr(nccl_srcs),
            nccl_linkopts = repr(nccl_linkopts),
        ))
        nvcc = str(root.get_child("bin").get_child("nvcc"))
    else:
        ctx.file("BUILD", _BUILD_STUB)
        nvcc = ""
    ctx.file("defs.bzl", "CUDA_FOUND = %s\nNVCC = %r\nCUDA_HOME = %r\n" % (found, nvcc, home))

cuda_repository = repository_rule(
    implementation = _cuda_repository_impl,
    environ = ["CUDA_HOME", "NCCL_HOME"],
    local = True,
)
