#include "launcher/worker_env.h"

#include <map>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace switchyard::launcher {
namespace {

using ::testing::HasSubstr;

absl::StatusOr<std::optional<WorkerEnv>> Detect(const std::map<std::string, std::string>& vars) {
  return DetectWorkerEnv([&](const char* name) -> const char* {
    auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  });
}

TEST(WorkerEnv, PlainCommandLineIsTheLauncher) {
  auto e = Detect({{"HOME", "/root"}, {"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "4"}});
  ASSERT_TRUE(e.ok());
  EXPECT_FALSE(e->has_value());  // a Slurm batch script, not an srun step
}

TEST(WorkerEnv, Torchrun) {
  auto e = Detect({{"RANK", "5"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"},
                   {"LOCAL_WORLD_SIZE", "4"}, {"MASTER_ADDR", "10.0.0.1"}, {"MASTER_PORT", "29400"},
                   {"TORCHELASTIC_USE_AGENT_STORE", "True"}});
  ASSERT_TRUE(e.ok() && e->has_value()) << e.status();
  const WorkerEnv& w = **e;
  EXPECT_EQ(w.source, "torchrun");
  EXPECT_EQ(w.rank, 5);
  EXPECT_EQ(w.world_size, 8);
  EXPECT_EQ(w.local_rank, 1);
  EXPECT_EQ(w.local_world_size, 4);
  EXPECT_EQ(w.master_addr, "10.0.0.1");
  EXPECT_EQ(w.master_port, 29400);
  EXPECT_TRUE(w.agent_store);
  EXPECT_EQ(w.restart, 0);
}

TEST(WorkerEnv, RestartCount) {
  auto e = Detect({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"TORCHELASTIC_RESTART_COUNT", "2"}});
  ASSERT_TRUE(e.ok() && e->has_value());
  EXPECT_EQ((*e)->restart, 2);
  e = Detect({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"SWITCHYARD_RESTART", "1"},
              {"TORCHELASTIC_RESTART_COUNT", "5"}});
  EXPECT_EQ((*e)->restart, 1);
}

TEST(WorkerEnv, OurLauncherHostsTheStore) {
  auto e = Detect({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"SWITCHYARD_LAUNCHER_PID", "77"}});
  ASSERT_TRUE(e.ok() && e->has_value());
  EXPECT_EQ((*e)->source, "switchyard");
  EXPECT_TRUE((*e)->agent_store);
  EXPECT_EQ((*e)->master_port, -1);  // the spec's
}

TEST(WorkerEnv, SlurmStep) {
  auto e = Detect({{"SLURM_PROCID", "6"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "2"},
                   {"SLURM_STEP_ID", "0"}, {"SLURM_STEP_TASKS_PER_NODE", "4(x2)"}});
  ASSERT_TRUE(e.ok() && e->has_value()) << e.status();
  EXPECT_EQ((*e)->source, "slurm");
  EXPECT_EQ((*e)->rank, 6);
  EXPECT_EQ((*e)->world_size, 8);
  EXPECT_EQ((*e)->local_rank, 2);
  EXPECT_EQ((*e)->local_world_size, 4);
  EXPECT_FALSE((*e)->agent_store);  // rank 0 hosts the store
}

TEST(WorkerEnv, Mpirun) {
  auto e = Detect({{"OMPI_COMM_WORLD_RANK", "3"}, {"OMPI_COMM_WORLD_SIZE", "4"},
                   {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}});
  ASSERT_TRUE(e.ok() && e->has_value());
  EXPECT_EQ((*e)->source, "mpirun");
  EXPECT_EQ((*e)->rank, 3);
  EXPECT_EQ((*e)->local_world_size, 2);
}

TEST(WorkerEnv, MalformedVariablesAreErrors) {
  auto bad = [](std::map<std::string, std::string> v) {
    auto e = Detect(v);
    return e.ok() ? std::string("accepted") : std::string(e.status().message());
  };
  EXPECT_THAT(bad({{"RANK", "abc"}, {"WORLD_SIZE", "2"}}), HasSubstr("RANK=\"abc\" is not a non-negative integer"));
  EXPECT_THAT(bad({{"RANK", "2"}, {"WORLD_SIZE", "2"}}), HasSubstr("RANK=2 is not below WORLD_SIZE=2"));
  EXPECT_THAT(bad({{"RANK", "0"}, {"WORLD_SIZE", "0"}}), HasSubstr("WORLD_SIZE=0 must be at least 1"));
  EXPECT_THAT(bad({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "99999"}}), HasSubstr("MASTER_PORT=99999"));
}

}  // namespace
}  // namespace switchyard::launcher
