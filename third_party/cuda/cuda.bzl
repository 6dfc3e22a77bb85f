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
    srcs = ["lib64/libcudart.so"],
    linkopts = ["-Wl,-rpath,{lib}", "-ldl", "-lpthread", "-lrt"],
    deps = [":cuda_headers"],
)

cc_library(
    name = "cublas",
    srcs = ["lib64/libcublas.so", "lib64/libcublasLt.so"],
    deps = [":cudart"],
)

cc_library(
    name = "nccl",
    srcs = ["lib64/libnccl.so"],
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
        ctx.symlink(root.get_child("lib64"), "lib64")
        ctx.file("BUILD", _BUILD_FOUND.format(lib = str(root.get_child("lib64"))))
        nvcc = str(root.get_child("bin").get_child("nvcc"))
    else:
        ctx.file("BUILD", _BUILD_STUB)
        nvcc = ""
    ctx.file("defs.bzl", "CUDA_FOUND = %s\nNVCC = %r\nCUDA_HOME = %r\n" % (found, nvcc, home))

cuda_repository = repository_rule(
    implementation = _cuda_repository_impl,
    environ = ["CUDA_HOME"],
    local = True,
)
