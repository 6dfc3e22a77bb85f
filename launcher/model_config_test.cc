#include "launcher/model_config.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "gtest/gtest.h"
#include "launcher/spec.h"

namespace switchyard::launcher {
namespace {

TEST(MoELayerConfigTest, EveryModelFieldReachesTheLayer) {
  absl::StatusOr<Job> job = ParseJob(R"pb(
    model {
      hidden_size: 64 num_heads: 4 num_layers: 4 activation: GELU
      moe {
        every_n: 2 num_experts: 16 top_k: 4 ffn_hidden_size: 96
        num_shared_experts: 2 shared_ffn_hidden_size: 48 shared_expert_gate: true
        router {
          score: SIGMOID pre_softmax: false normalize_topk: true scaling_factor: 2.5
          jitter_eps: 0.01 noisy_gating: true num_groups: 4 group_topk: 2
          capacity_factor: 1.5 drop_policy: DROP_BY_POSITION pad_to_capacity: true
          aux_loss: AUX_SEQUENCE aux_loss_coeff: 0.02 z_loss_coeff: 0.001
          expert_bias: true bias_update_rate: 0.003
        }
      }
    }
    parallel { sequence_parallel: true tp: 2 }
    train { precision: BF16 }
  )pb", "test");
  ASSERT_TRUE(job.ok()) << job.status();
  absl::StatusOr<ResolvedJob> resolved = ValidateJob(*job, 2);
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  ASSERT_EQ(resolved->moe_layers, (std::vector<int>{0, 2}));
  absl::StatusOr<moe::MoEConfig> c = MoELayerConfig(*job, 2);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->name, "layers.2.mlp");
  EXPECT_EQ(c->router.hidden_size, 64);
  EXPECT_EQ(c->router.num_experts, 16);
  EXPECT_EQ(c->router.topk.top_k, 4);
  EXPECT_EQ(c->router.topk.score, gate::ScoreFunction::kSigmoid);
  EXPECT_FALSE(c->router.topk.pre_softmax);
  EXPECT_EQ(c->router.topk.weight_norm, gate::WeightNorm::kTopK);
  EXPECT_FLOAT_EQ(c->router.topk.scaling_factor, 2.5f);
  EXPECT_EQ(c->router.topk.num_groups, 4);
  EXPECT_EQ(c->router.topk.group_topk, 2);
  EXPECT_DOUBLE_EQ(c->router.topk.capacity_factor, 1.5);
  EXPECT_EQ(c->router.topk.drop_policy, gate::DropPolicy::kByPosition);
  EXPECT_TRUE(c->router.topk.pad_to_capacity);
  EXPECT_FLOAT_EQ(c->router.jitter_eps, 0.01f);
  EXPECT_TRUE(c->router.noisy_gating);
  EXPECT_EQ(c->router.aux_loss, gate::AuxLoss::kSequence);
  EXPECT_NEAR(c->router.aux_loss_coeff, 0.02, 1e-9);
  EXPECT_NEAR(c->router.z_loss_coeff, 0.001, 1e-9);
  EXPECT_TRUE(c->router.expert_bias);
  EXPECT_NEAR(c->router.bias_update_rate, 0.003, 1e-9);
  EXPECT_EQ(c->ffn_hidden_size, 96);
  EXPECT_EQ(c->activation, experts::Activation::kGelu);
  EXPECT_EQ(c->num_shared_experts, 2);
  EXPECT_EQ(c->shared_ffn_hidden_size, 48);
  EXPECT_TRUE(c->shared_expert_gate);
  EXPECT_EQ(c->dtype, at::kBFloat16);
  EXPECT_TRUE(c->sequence_parallel);
  // The layer builds from it.
  EXPECT_TRUE(moe::MoELayer::Create(*c, 1).ok());
  EXPECT_FALSE(MoELayerConfig(*job, 4).ok());
  EXPECT_FALSE(c->apply_probs_on_input);
  absl::StatusOr<Job> top1 = ParseJob("model { moe { top_k: 1 apply_probs_on_input: true } }", "top1");
  ASSERT_TRUE(top1.ok()) << top1.status();
  absl::StatusOr<moe::MoEConfig> c1 = MoELayerConfig(*top1, 0);
  ASSERT_TRUE(c1.ok()) << c1.status();
  EXPECT_TRUE(c1->apply_probs_on_input);
}

// A spec that passes validation must give layers that build and route: no setting the spec
// accepts may fail only once workers run. The examples, and one spec per kind of router.
TEST(MoELayerConfigTest, EveryValidSpecBuildsLayersThatRoute) {
  std::vector<std::pair<std::string, std::string>> specs = {
      {"defaults", ""},
      {"expert choice", "model { moe { router { type: EXPERT_CHOICE capacity_factor: 1.5 } } }"},
      {"expert choice, one expert, token-choice defaults written out",
       "model { moe { num_experts: 1 top_k: 2 router { type: EXPERT_CHOICE capacity_factor: 1 pre_softmax: true "
       "scaling_factor: 1 drop_policy: DROP_BY_SCORE score: SOFTMAX } } }"},
      {"top-1 sigmoid", "model { moe { top_k: 1 router { score: SIGMOID } } }"},
      {"sigmoid, groups, bias",
       "model { moe { num_experts: 16 top_k: 4 router { score: SIGMOID num_groups: 4 group_topk: 2 "
       "expert_bias: true } } }"},
      {"padded capacity by position, z-loss, noise, jitter",
       "model { moe { router { capacity_factor: 1.25 drop_policy: DROP_BY_POSITION pad_to_capacity: true "
       "z_loss_coeff: 0.001 noisy_gating: true jitter_eps: 0.01 } } }"},
      {"shared, ReLU, bf16",
       "model { activation: RELU moe { num_shared_experts: 1 shared_ffn_hidden_size: 64 } } train { precision: BF16 }"},
      {"top-1, per-sequence aux loss", "model { moe { top_k: 1 router { aux_loss: AUX_SEQUENCE } } }"},
      {"top-1 sigmoid, weights on the input, a gated shared expert",
       "model { moe { top_k: 1 apply_probs_on_input: true num_shared_experts: 1 shared_expert_gate: true "
       "router { score: SIGMOID } } }"},
      {"global aux loss", "model { moe { router { aux_loss: AUX_GLOBAL } } }"},
      {"context parallel, capacity by score",
       "model { moe { router { capacity_factor: 1.25 } } } parallel { cp: 2 } launch { nproc_per_node: 2 }"}};
  for (const auto& entry : std::filesystem::directory_iterator("launcher/examples")) {
    std::ifstream in(entry.path());
    std::stringstream text;
    text << in.rdbuf();
    specs.push_back({entry.path().filename().string(), text.str()});
  }
  for (const auto& [name, text] : specs) {
    SCOPED_TRACE(name);
    absl::StatusOr<Job> job = ParseJob(text, name);
    ASSERT_TRUE(job.ok()) << job.status();
    absl::StatusOr<ResolvedJob> resolved = ValidateJob(*job);
    ASSERT_TRUE(resolved.ok()) << resolved.status();
    ASSERT_FALSE(resolved->moe_layers.empty());
    for (int l : resolved->moe_layers) {
      absl::StatusOr<moe::MoEConfig> c = MoELayerConfig(*job, l);
      ASSERT_TRUE(c.ok()) << c.status();
      absl::StatusOr<moe::MoELayer> layer = moe::MoELayer::Create(*c, 7);
      ASSERT_TRUE(layer.ok()) << "layer " << l << ": " << layer.status();
      at::manual_seed(l);
      absl::StatusOr<moe::MoEOutput> out =
          layer->Forward(at::randn({12, job->model().hidden_size()}).to(c->dtype), {.training = true});
      ASSERT_TRUE(out.ok()) << "layer " << l << ": " << out.status();
      EXPECT_TRUE(at::isfinite(out->output.to(at::kFloat)).all().item<bool>());
    }
  }
}

TEST(MoELayerConfigTest, DefaultsAreMegatronLike) {
  absl::StatusOr<Job> job = ParseJob("", "empty");
  ASSERT_TRUE(job.ok());
  absl::StatusOr<moe::MoEConfig> c = MoELayerConfig(*job, 0);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->router.topk.top_k, 2);
  EXPECT_TRUE(c->router.topk.pre_softmax);
  EXPECT_EQ(c->router.topk.weight_norm, gate::WeightNorm::kSigmoidTopK);
  EXPECT_EQ(c->router.aux_loss, gate::AuxLoss::kBatch);
  EXPECT_EQ(c->activation, experts::Activation::kSwiglu);
  EXPECT_EQ(c->dtype, at::kFloat);
}

}  // namespace
}  // namespace switchyard::launcher
