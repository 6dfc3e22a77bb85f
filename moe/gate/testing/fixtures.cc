#include "moe/gate/testing/fixtures.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>

#include <ATen/ATen.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"

namespace switchyard::gate::testing {

std::vector<FixtureCase> LoadFixtures(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in) << "fixture file missing: " << path;
  std::vector<FixtureCase> cases;
  int line_no = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    if (line.empty() || line[0] == '#' || line == "end") continue;
    std::vector<std::string> w = absl::StrSplit(line, ' ');
    if (w[0] == "case" && w.size() == 2) {
      cases.push_back({w[1], {}, {}});
      continue;
    }
    if (cases.empty() || w.size() < 3) {
      ADD_FAILURE() << path << ":" << line_no << ": malformed line";
      return cases;
    }
    if (w[0] == "option") {
      cases.back().options[w[1]] = w[2];
    } else if (w[0] == "tensor" && w.size() >= 4 && w[3] == ":") {
      std::vector<int64_t> shape;
      if (w[2] != "scalar") {
        for (absl::string_view d : absl::StrSplit(w[2], ',')) {
          int64_t v = 0;
          EXPECT_TRUE(absl::SimpleAtoi(d, &v)) << path << ":" << line_no << ": shape " << w[2];
          shape.push_back(v);
        }
      }
      std::vector<double> values;
      for (size_t i = 4; i < w.size(); ++i) {
        double v = 0;
        EXPECT_TRUE(absl::SimpleAtod(w[i], &v)) << path << ":" << line_no << ": " << w[i];
        values.push_back(v);
      }
      // Values are written as fp32's shortest round-trip digits, or more: through double
      // to float gives back the very bits.
      cases.back().tensors[w[1]] = at::tensor(values, at::kDouble).reshape(shape).to(at::kFloat);
    } else {
      ADD_FAILURE() << path << ":" << line_no << ": unknown line kind " << w[0];
    }
  }
  return cases;
}

const FixtureCase& FindCase(const std::vector<FixtureCase>& cases, const std::string& name) {
  for (const FixtureCase& c : cases)
    if (c.name == name) return c;
  ADD_FAILURE() << "no case " << name;
  static const FixtureCase* const kEmpty = new FixtureCase();
  return *kEmpty;
}

std::string Option(const FixtureCase& c, const std::string& key, const std::string& fallback) {
  auto it = c.options.find(key);
  return it == c.options.end() ? fallback : it->second;
}

int IntOption(const FixtureCase& c, const std::string& key, int fallback) {
  auto it = c.options.find(key);
  int v = fallback;
  if (it != c.options.end()) {
    EXPECT_TRUE(absl::SimpleAtoi(it->second, &v)) << c.name << ": " << key;
  }
  return v;
}

double DoubleOption(const FixtureCase& c, const std::string& key, double fallback) {
  auto it = c.options.find(key);
  double v = fallback;
  if (it != c.options.end()) {
    EXPECT_TRUE(absl::SimpleAtod(it->second, &v)) << c.name << ": " << key;
  }
  return v;
}

bool BoolOption(const FixtureCase& c, const std::string& key, bool fallback) {
  auto it = c.options.find(key);
  if (it == c.options.end()) return fallback;
  EXPECT_TRUE(it->second == "True" || it->second == "False") << c.name << ": " << key;
  return it->second == "True";
}

double MaxRelErr(const at::Tensor& a, const at::Tensor& b) {
  EXPECT_EQ(a.sizes(), b.sizes());
  if (a.sizes() != b.sizes()) return INFINITY;
  if (a.numel() == 0) return 0.0;
  const at::Tensor d = (a.to(at::kDouble) - b.to(at::kDouble)).abs();
  const at::Tensor mag = b.to(at::kDouble).abs();
  const at::Tensor scale = mag.clamp_min(std::max(1e-6, 1e-1 * mag.max().item<double>()));
  return (d / scale).max().item<double>();
}

}  // namespace switchyard::gate::testing
