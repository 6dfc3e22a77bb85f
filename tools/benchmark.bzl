"""sy_cc_benchmark: a Google Benchmark binary the Switchyard way."""

load("//tools:copts.bzl", "SY_DEFAULT_COPTS")

def sy_cc_benchmark(name, srcs, deps = [], copts = SY_DEFAULT_COPTS, tags = [], **kwargs):
    """A cc_binary linked with Google Benchmark's main and LibTorch, testonly, tagged `benchmark`.

    Run it with `tools/bazel run -c opt //pkg:name`; `tools/bazel test //...` builds it but
    runs no benchmark.
    """
    native.cc_binary(
        name = name,
        testonly = True,
        srcs = srcs,
        copts = copts,
        tags = ["benchmark"] + tags,
        deps = deps + [
            Label("//third_party:benchmark_main"),
            Label("@libtorch//:torch"),
        ],
        **kwargs
    )
