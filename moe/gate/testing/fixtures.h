// Reads the router fixtures in moe/gate/testdata (written by tests/oracles/*.py from a peer
// library's own code), and compares tensors with them. Blocks of lines:
//
//   case NAME
//   option KEY VALUE
//   tensor NAME SHAPE : v0 v1 ...      (SHAPE "4,8", or "scalar")
//   end
//
//   std::vector<FixtureCase> cases = LoadFixtures("moe/gate/testdata/megatron_router.txt");
//   for (const FixtureCase& c : cases) EXPECT_LE(MaxRelErr(mine, c.tensors.at("probs")), 1e-6);
#ifndef MOE_GATE_TESTING_FIXTURES_H_
#define MOE_GATE_TESTING_FIXTURES_H_

#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace switchyard::gate::testing {

struct FixtureCase {
  std::string name;
  std::map<std::string, std::string> options;
  std::map<std::string, at::Tensor> tensors;  // fp32
};

// Every case of the file; a missing file or a malformed line is a test failure (and an
// empty or partial result), never a silent pass.
std::vector<FixtureCase> LoadFixtures(const std::string& path);

const FixtureCase& FindCase(const std::vector<FixtureCase>& cases, const std::string& name);

// An option's value, or `fallback` when the case does not have it. A value that does not
// parse is a test failure.
std::string Option(const FixtureCase& c, const std::string& key, const std::string& fallback = "");
int IntOption(const FixtureCase& c, const std::string& key, int fallback);
double DoubleOption(const FixtureCase& c, const std::string& key, double fallback);
bool BoolOption(const FixtureCase& c, const std::string& key, bool fallback = false);  // "True"/"False"

// max |a - b| / max(|b|, 0.1 · max|b|, 1e-6) over the elements: relative where b is large,
// and relative to a tenth of the largest |b| below that. Values far below the largest are the
// rounding noise of cancelling terms (a gradient that is exactly 0 in exact arithmetic comes
// out as ±5e-9 beside terms of 0.5), whose digits depend on the kernels' summation order
// (LibTorch 2.11's AVX-512 softmax backward against the AVX2 one the fixtures were made with,
// 2026-12-01), not on the math under test.
double MaxRelErr(const at::Tensor& a, const at::Tensor& b);

}  // namespace switchyard::gate::testing

#endif  // MOE_GATE_TESTING_FIXTURES_H_
