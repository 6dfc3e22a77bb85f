// route_check: compares an output of //moe/gate:route with one case of an expected file
// (testdata/route_expected.safetensors, from Megatron-Core; see route_test.sh).
//
//   route_check OUT.safetensors EXPECTED.safetensors CASE
//
// The output must hold exactly the eight tensors CASE/* names, each with the same dtype and
// shape; integer and bool tensors equal, float ones within 1e-5 relative + 1e-6 absolute
// (expected values are Megatron-Core's fp32 numbers, ours differ by rounding only); and its
// __metadata__ must equal the CASE/* metadata entries. Exit 0 when all match, else 1 with one
// line per mismatch.
#include <cstdio>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/safetensors.h"

namespace {

using switchyard::common::ReadSafetensors;
using switchyard::common::Safetensors;
using switchyard::common::SafetensorsDtypeName;

std::string Describe(const at::Tensor& t) {
  return absl::StrCat(SafetensorsDtypeName(t.scalar_type()), " [", absl::StrJoin(t.sizes(), ", "), "]");
}

int Check(const std::string& output_path, const std::string& expected_path, const std::string& name) {
  absl::StatusOr<Safetensors> out = ReadSafetensors(output_path);
  absl::StatusOr<Safetensors> all = ReadSafetensors(expected_path);
  if (!out.ok() || !all.ok()) {
    absl::FPrintF(stderr, "route_check: %s\n", (out.ok() ? all : out).status().ToString());
    return 1;
  }
  const std::string prefix = name + "/";
  std::map<std::string, at::Tensor> want;
  std::map<std::string, std::string> want_metadata;
  for (const auto& [key, t] : all->tensors) {
    if (absl::StartsWith(key, prefix)) want[key.substr(prefix.size())] = t;
  }
  for (const auto& [key, v] : all->metadata) {
    if (absl::StartsWith(key, prefix)) want_metadata[key.substr(prefix.size())] = v;
  }
  if (want.empty()) {
    absl::FPrintF(stderr, "route_check: %s has no case \"%s\"\n", expected_path, name);
    return 1;
  }

  std::vector<std::string> problems;
  for (const auto& [key, t] : out->tensors) {
    if (!want.count(key)) problems.push_back(absl::StrCat("unexpected output tensor \"", key, "\""));
  }
  for (const auto& [key, w] : want) {
    auto it = out->tensors.find(key);
    if (it == out->tensors.end()) {
      problems.push_back(absl::StrCat("missing output tensor \"", key, "\""));
      continue;
    }
    const at::Tensor& g = it->second;
    if (g.scalar_type() != w.scalar_type() || g.sizes() != w.sizes()) {
      problems.push_back(absl::StrFormat("%s: got %s, want %s", key, Describe(g), Describe(w)));
      continue;
    }
    if (at::isFloatingType(w.scalar_type())) {
      if (!at::allclose(g, w, /*rtol=*/1e-5, /*atol=*/1e-6)) {
        problems.push_back(absl::StrFormat("%s: max |got - want| = %g", key,
                                           (g - w).abs().max().item<double>()));
      }
    } else if (!at::equal(g, w)) {
      problems.push_back(absl::StrFormat(
          "%s: %d of %d elements differ (first at flat index %d)", key,
          g.ne(w).sum().item<int64_t>(), w.numel(),
          g.ne(w).reshape({-1}).nonzero().select(0, 0).item<int64_t>()));
    }
  }
  for (const auto& [key, v] : want_metadata) {
    auto it = out->metadata.find(key);
    if (it == out->metadata.end()) {
      problems.push_back(absl::StrFormat("metadata \"%s\" missing (want \"%s\")", key, v));
    } else if (it->second != v) {
      problems.push_back(absl::StrFormat("metadata \"%s\" = \"%s\", want \"%s\"", key, it->second, v));
    }
  }
  for (const auto& [key, v] : out->metadata) {
    if (!want_metadata.count(key)) {
      problems.push_back(absl::StrFormat("unexpected metadata \"%s\" = \"%s\"", key, v));
    }
  }
  for (const std::string& p : problems) absl::FPrintF(stderr, "%s: %s\n", name, p);
  if (!problems.empty()) return 1;
  absl::PrintF("%s: %d tensors and %d metadata entries match\n", name, want.size(), want_metadata.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: route_check OUT.safetensors EXPECTED.safetensors CASE\n");
    return 2;
  }
  return Check(argv[1], argv[2], argv[3]);
}
