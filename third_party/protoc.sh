#!/bin/sh
# Debian's protobuf-compiler, called by sy_proto_library (third_party/proto.bzl).
if [ ! -x /usr/bin/protoc ]; then
  echo "protoc not found: install Debian's protobuf-compiler (tools/bazel does)" >&2
  exit 1
fi
exec /usr/bin/protoc "$@"
