"""LibTorch as an external repository: `@libtorch//:torch`.

Reads LIBTORCH_HOME: the root of a pytorch.org LibTorch zip, or the `torch/` folder of a pip
wheel (both have `include/` and `lib/`). Without it, uses Debian's libtorch-dev under /usr.
Works with LibTorch 1.13 (Debian) and 2.x: code that must tell them apart includes
<torch/version.h>, and only dist/groups does.
"""

_DEBIAN_INCLUDE_DIRS = ["ATen", "c10", "caffe2", "torch"]

# Entries of a LibTorch's include/ that Switchyard takes from the system instead: pip wheels
# bundle an old protobuf whose headers would shadow the one our generated code needs, and
# the headers of the oneDNN (3.x) built into libtorch_cpu, whose symbols it does not export:
# common/matmul compiles against Debian's oneDNN headers and links Debian's libdnnl.
_SHADOWING_INCLUDE_DIRS = ["google", "oneapi"]
_SHADOWING_INCLUDE_PREFIXES = ["dnnl"]

_BUILD = '''package(default_visibility = ["//visibility:public"])

# Everything that includes c10d's ProcessGroupGloo.hpp needs USE_C10D_GLOO, and the C++ ABI
# must match the one LibTorch was built with.
cc_library(
    name = "torch",
    hdrs = glob(["include/**"], allow_empty = True),
    includes = ["include", "include/torch/csrc/api/include"],
    # With --config=cuda and a CUDA LibTorch: c10d's NCCL backend (USE_C10D_NCCL declares
    # ProcessGroupNCCL; SY_TORCH_NCCL tells dist/groups it may use it).
    defines = {defines} + select({{
        "@switchyard//third_party/cuda:enabled": {cuda_defines},
        "//conditions:default": [],
    }}),
    # LibTorch's CUDA libraries (and what they load: cuDNN, NVSHMEM, ...) only with
    # --config=cuda, so CPU builds against a CUDA LibTorch also run on CPU-only machines.
    linkopts = {linkopts} + select({{
        "@switchyard//third_party/cuda:enabled": {cuda_linkopts},
        "//conditions:default": [],
    }}),
    # tsan_support: under --config=tsan, what ThreadSanitizer needs to judge code around
    # LibTorch (common/tsan_support.cc); an empty object in other builds.
    deps = ["@switchyard//common:tsan_support"] + select({{
        "@switchyard//third_party/cuda:enabled": {cuda_deps},
        "//conditions:default": [],
    }}),
)

# Facts about this LibTorch, for `bazel query` and for humans.
exports_files(["INFO"])
'''

def _cxx11_abi(ctx, root):
    """The _GLIBCXX_USE_CXX11_ABI value LibTorch was built with, or None if unknown."""
    for cfg in ["share/cmake/Torch/TorchConfig.cmake", "lib/x86_64-linux-gnu/cmake/Torch/TorchConfig.cmake"]:
        p = ctx.path("%s/%s" % (root, cfg))
        if p.exists:
            text = ctx.read(p)
            for v in ["0", "1"]:
                if "_GLIBCXX_USE_CXX11_ABI=" + v in text:
                    return v
    return None

def _libtorch_repository_impl(ctx):
    home = ctx.os.environ.get("LIBTORCH_HOME", "").strip()
    defines = ["USE_C10D_GLOO"]
    if home:
        root = ctx.path(home)
        if not root.get_child("include").exists or not root.get_child("lib").exists:
            fail("LIBTORCH_HOME=%s has no include/ and lib/ folders: point it at a LibTorch zip's root or a wheel's torch/ folder" % home)
        for child in root.get_child("include").readdir():
            if child.basename not in _SHADOWING_INCLUDE_DIRS and not [p for p in _SHADOWING_INCLUDE_PREFIXES if child.basename.startswith(p)]:
                ctx.symlink(child, "include/" + child.basename)
        lib = str(root.get_child("lib"))
        # A CUDA wheel's libtorch.so needs libtorch_cuda.so; everything Switchyard calls on the
        # CPU is in libtorch_cpu and libc10.
        # -fopenmp: the OpenMP runtime that code built with SY_PARALLEL_COPTS calls into. A pip
        # wheel bundles its own libgomp.so.1 in lib/, which the rpath makes the one loaded.
        linkopts = ["-L" + lib, "-Wl,-rpath," + lib, "-ltorch_cpu", "-lc10", "-fopenmp"]
        cuda_libs = [l for l in ["torch", "torch_cuda", "c10_cuda"] if root.get_child("lib").get_child("lib%s.so" % l).exists]
        # --no-as-needed: nothing references libtorch_cuda directly, but loading it registers
        # the CUDA kernels.
        cuda_linkopts = ["-Wl,--no-as-needed"] + ["-l" + l for l in cuda_libs] + ["-Wl,--as-needed"] if cuda_libs else []
        has_nccl = "torch_cuda" in cuda_libs and ctx.path(
            "%s/include/torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp" % home).exists
        cuda_defines = ["USE_C10D_NCCL", "SY_TORCH_NCCL=1"] if has_nccl else []
        cuda_deps = ["@local_cuda//:cuda_headers", "@local_cuda//:nccl"] if has_nccl else []
        abi = _cxx11_abi(ctx, root)
        source = home
    else:
        for d in _DEBIAN_INCLUDE_DIRS:
            p = ctx.path("/usr/include/" + d)
            if not p.exists:
                fail("LibTorch not found: /usr/include/%s is missing. Install Debian's libtorch-dev (tools/bazel does) or set LIBTORCH_HOME." % d)
            ctx.symlink(p, "include/" + d)
        linkopts = ["-ltorch", "-ltorch_cpu", "-lc10", "-fopenmp"]  # -fopenmp: as above
        cuda_linkopts = []  # Debian's LibTorch is CPU-only: no NCCL backend
        cuda_defines = []
        cuda_deps = []
        has_nccl = False
        abi = _cxx11_abi(ctx, ctx.path("/usr"))
        source = "/usr (Debian libtorch-dev)"
    if abi == "0":
        # Debian's Abseil and Protobuf, which Switchyard links beside LibTorch, use the C++11
        # ABI; a pre-C++11-ABI LibTorch would fail at link time with puzzling missing symbols.
        fail(("LIBTORCH_HOME=%s was built with the pre-C++11 ABI (_GLIBCXX_USE_CXX11_ABI=0); " +
              "Switchyard needs a cxx11-ABI LibTorch (pytorch.org's 'cxx11 ABI' zip, or a pip " +
              "wheel of torch >= 2.7)") % home)
    if abi != None:
        defines.append("_GLIBCXX_USE_CXX11_ABI=" + abi)
    ctx.file("INFO", "source: %s\ncxx11_abi: %s\nnccl (with --config=cuda): %s\n" % (source, abi, has_nccl))
    ctx.file("WORKSPACE", 'workspace(name = "%s")\n' % ctx.name)
    ctx.file("BUILD", _BUILD.format(
        defines = repr(defines),
        linkopts = repr(linkopts),
        cuda_linkopts = repr(cuda_linkopts),
        cuda_defines = repr(cuda_defines),
        cuda_deps = repr(cuda_deps),
    ))

libtorch_repository = repository_rule(
    implementation = _libtorch_repository_impl,
    environ = ["LIBTORCH_HOME"],
    local = True,
)
