"""sy_proto_library: C++ code from a .proto with Debian's protoc, as a cc_library.

    load("//third_party:proto.bzl", "sy_proto_library")
    sy_proto_library(name = "job_proto", src = "job.proto")   # -> #include "launcher/job.pb.h"

Bazel 4's own proto rules would download protobuf's sources; this needs no network. Works
from Switchyard's workspace and from a consumer's (@switchyard//...).
"""

def sy_proto_library(name, src, deps = [], **kwargs):
    base = src[:-len(".proto")]
    pkg = native.package_name()
    repo = native.repository_name()
    root = "." if repo == "@" else "external/" + repo[1:]
    out_root = "$(GENDIR)" if repo == "@" else "$(GENDIR)/external/" + repo[1:]
    native.genrule(
        name = name + "_protoc",
        srcs = [src],
        outs = [base + ".pb.h", base + ".pb.cc"],
        tools = ["@switchyard//third_party:protoc"],
        cmd = "$(location @switchyard//third_party:protoc) --proto_path=%s --cpp_out=%s %s/%s/%s" % (
            root,
            out_root,
            root,
            pkg,
            src,
        ),
    )
    native.cc_library(
        name = name,
        srcs = [base + ".pb.cc"],
        hdrs = [base + ".pb.h"],
        deps = deps + ["@switchyard//third_party:protobuf"],
        **kwargs
    )
