#include "launcher/spec.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace switchyard::launcher {
namespace {

using ::testing::HasSubstr;

std::vector<std::filesystem::path> Files(const std::string& dir) {
  std::vector<std::filesystem::path> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

// The "# expect: ..." first line of a bad spec.
std::string Expected(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::string line;
  std::getline(in, line);
  const std::string tag = "# expect: ";
  EXPECT_EQ(line.rfind(tag, 0), 0u) << p << " has no '# expect:' first line";
  return line.substr(tag.size());
}

TEST(Spec, EveryBadSpecFailsNamingTheField) {
  std::vector<std::filesystem::path> files = Files("tests/bad_specs");
  ASSERT_GE(files.size(), 20u);
  for (const auto& f : files) {
    absl::StatusOr<ResolvedJob> job = LoadJob(f.string());
    ASSERT_FALSE(job.ok()) << f << " was accepted";
    EXPECT_THAT(std::string(job.status().message()), HasSubstr(Expected(f))) << f;
  }
}

TEST(Spec, ExamplesAreValid) {
  std::vector<std::filesystem::path> files = Files("launcher/examples");
  ASSERT_FALSE(files.empty());
  for (const auto& f : files) {
    absl::StatusOr<ResolvedJob> job = LoadJob(f.string());
    EXPECT_TRUE(job.ok()) << f << ": " << job.status();
  }
}

TEST(Spec, DefaultsAndDerivedValues) {
  absl::StatusOr<Job> job = ParseJob("", "empty");
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(job->model().hidden_size(), 128);
  EXPECT_EQ(job->parallel().order(), "tp-cp-ep-dp-pp");
  EXPECT_EQ(job->launch().master_port(), 29500);

  absl::StatusOr<Job> j = ParseJob(R"pb(
    model { num_layers: 4 moe { every_n: 2 num_experts: 8 } }
    parallel { tp: 2 ep: 4 }
    train { global_batch_size: 16 micro_batch_size: 2 }
    launch { nnodes: 2 nproc_per_node: 4 })pb", "inline");
  ASSERT_TRUE(j.ok()) << j.status();
  absl::StatusOr<ResolvedJob> r = ValidateJob(*j);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->world_size, 8);
  EXPECT_EQ(r->layout.dp(), 4);
  EXPECT_EQ(r->layout.etp(), 2);   // defaults to tp
  EXPECT_EQ(r->layout.edp(), 1);   // 8 / (tp 2 × ep 4)
  EXPECT_EQ(r->micro_batch_size, 2);
  EXPECT_EQ(r->grad_accumulation_steps, 2);  // 16 / dp 4 = 4 per rank, 2 micro-batches
  EXPECT_EQ(r->moe_layers, (std::vector<int>{0, 2}));

  // An outer launcher's world size overrides the spec's nnodes × nproc_per_node.
  absl::StatusOr<ResolvedJob> r2 = ValidateJob(*j, 16);
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_EQ(r2->layout.dp(), 8);
  absl::StatusOr<ResolvedJob> r3 = ValidateJob(*j, 6);
  ASSERT_FALSE(r3.ok());
  EXPECT_THAT(std::string(r3.status().message()), HasSubstr("parallel.ep: etp × ep = 2 × 4 = 8 does not divide"));
}

TEST(Spec, ExplicitMoeLayers) {
  absl::StatusOr<Job> j = ParseJob("model { num_layers: 4 moe { layers: 3 layers: 1 } }", "x");
  ASSERT_TRUE(j.ok());
  absl::StatusOr<ResolvedJob> r = ValidateJob(*j);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->moe_layers, (std::vector<int>{1, 3}));
}

TEST(Spec, ParseErrorsCarrySourceLineAndPath) {
  absl::StatusOr<Job> j = ParseJob("model {\n  moe {\n    top_kk: 2\n  }\n}\n", "job.pbtxt");
  ASSERT_FALSE(j.ok());
  const std::string m(j.status().message());
  EXPECT_THAT(m, ::testing::StartsWith("job.pbtxt:3:"));
  EXPECT_THAT(m, HasSubstr(": in model.moe: Message type \"switchyard.MoE\" has no field "
                           "named \"top_kk\""));
}

TEST(Spec, MissingSpecFile) {
  absl::StatusOr<ResolvedJob> r = LoadJob("/nonexistent/job.pbtxt");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr("--spec: \"/nonexistent/job.pbtxt\" cannot be opened"));
}

}  // namespace
}  // namespace switchyard::launcher
