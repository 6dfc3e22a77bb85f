"""Every external repository Switchyard needs, all offline (see ../shared/TOOLCHAIN.md).

Both Switchyard's own WORKSPACE and a consumer's call `switchyard_dependencies()`. Nothing
here reads a path relative to a workspace, so it works from either.
"""

load("//third_party:libtorch.bzl", "libtorch_repository")
load("//third_party/cuda:cuda.bzl", "cuda_repository")

_RULES_CC_DEFS = '''"""Offline stand-in for @rules_cc: Bazel 4.2.3's native rules, re-exported."""
cc_binary = native.cc_binary
cc_import = native.cc_import
cc_library = native.cc_library
cc_proto_library = native.cc_proto_library
cc_test = native.cc_test
cc_toolchain = native.cc_toolchain
cc_toolchain_suite = native.cc_toolchain_suite
fdo_prefetch_hints = native.fdo_prefetch_hints
fdo_profile = native.fdo_profile
objc_library = native.objc_library
'''

def _rules_cc_stand_in_impl(ctx):
    ctx.file("WORKSPACE", 'workspace(name = "rules_cc")\n')
    ctx.file("BUILD", "")
    ctx.file("cc/BUILD", "")
    ctx.file("cc/defs.bzl", _RULES_CC_DEFS)

_rules_cc_stand_in = repository_rule(implementation = _rules_cc_stand_in_impl)

_COVERAGE_BUILD = '''package(default_visibility = ["//visibility:public"])

sh_binary(
    name = "coverage_report_generator",
    srcs = ["unavailable.sh"],
)

sh_binary(
    name = "lcov_merger",
    srcs = ["unavailable.sh"],
)
'''

def _coverage_stand_in_impl(ctx):
    ctx.file("WORKSPACE", 'workspace(name = "remote_coverage_tools")\n')
    ctx.file("BUILD", _COVERAGE_BUILD)
    ctx.file(
        "unavailable.sh",
        "#!/bin/sh\necho 'coverage tools unavailable offline (Switchyard builds without network)' >&2\nexit 1\n",
        executable = True,
    )

_coverage_stand_in = repository_rule(implementation = _coverage_stand_in_impl)

def switchyard_dependencies():
    """Declares the repositories Switchyard's targets need. Call once from a WORKSPACE."""
    existing = native.existing_rules()
    if "rules_cc" not in existing:
        _rules_cc_stand_in(name = "rules_cc")
    if "remote_coverage_tools" not in existing:
        _coverage_stand_in(name = "remote_coverage_tools")
    if "rules_java" not in existing:
        native.local_repository(name = "rules_java", path = "/usr/share/bazel/rules/java")
    if "platforms" not in existing:
        native.local_repository(name = "platforms", path = "/usr/share/bazel/platforms")
    if "libtorch" not in existing:
        libtorch_repository(name = "libtorch")
    if "local_cuda" not in existing:
        cuda_repository(name = "local_cuda")
