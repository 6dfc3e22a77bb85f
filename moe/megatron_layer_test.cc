// The single-process MoELayer against Megatron-Core's own MoELayer on the same weights and
// inputs: output, every gradient, the losses, and the expert-bias update
// (testdata/megatron_layer.safetensors, made by tests/oracles/make_layer_fixtures.py).
// The multi-rank tests in moe_layer_test.cc then hold every layout to this layer.
#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "moe/moe_layer.h"
#include "moe/testing/rel_err.h"

namespace switchyard::moe {
namespace {

constexpr char kFixture[] = "moe/testdata/megatron_layer.safetensors";

using testing::RelErr;

// "key=value" words of a case's metadata.
std::map<std::string, std::string> Options(const std::string& words) {
  std::map<std::string, std::string> o;
  for (absl::string_view w : absl::StrSplit(words, ' ', absl::SkipEmpty())) {
    std::vector<std::string> kv = absl::StrSplit(w, absl::MaxSplits('=', 1));
    o[kv[0]] = kv.size() > 1 ? kv[1] : "";
  }
  return o;
}

class Case {
 public:
  Case(const common::Safetensors& f, const std::string& name) : f_(f), name_(name) {
    o_ = Options(f.metadata.at(name));
  }
  bool Has(const std::string& key) const { return o_.count(key) > 0 && o_.at(key) != "None"; }
  const std::string& Str(const std::string& key) const { return o_.at(key); }
  double Num(const std::string& key) const {
    double v = 0;
    EXPECT_TRUE(absl::SimpleAtod(o_.at(key), &v)) << name_ << ": " << key << "=" << o_.at(key);
    return v;
  }
  bool Flag(const std::string& key) const { return Has(key) && Str(key) == "True"; }
  const at::Tensor& T(const std::string& key) const { return f_.tensors.at(name_ + "." + key); }
  bool HasT(const std::string& key) const { return f_.tensors.count(name_ + "." + key) > 0; }

 private:
  const common::Safetensors& f_;
  std::string name_;
  std::map<std::string, std::string> o_;
};

// The fixture's Megatron options as our config.
MoEConfig ConfigOf(const Case& c, int64_t hidden) {
  MoEConfig m;
  m.router.hidden_size = hidden;
  m.router.num_experts = static_cast<int>(c.Num("experts"));
  gate::TopKOptions& t = m.router.topk;
  t.top_k = static_cast<int>(c.Num("topk"));
  if (c.Has("score"))
    t.score = c.Str("score") == "sigmoid" ? gate::ScoreFunction::kSigmoid : gate::ScoreFunction::kSoftmax;
  t.pre_softmax = c.Flag("pre_softmax");
  if (c.Has("groups")) {
    t.num_groups = static_cast<int>(c.Num("groups"));
    t.group_topk = static_cast<int>(c.Num("group_topk"));
  }
  if (c.Has("scaling")) t.scaling_factor = static_cast<float>(c.Num("scaling"));
  if (c.Has("capacity")) {
    t.capacity_factor = c.Num("capacity");
    EXPECT_EQ(c.Str("drop"), "probs");
    t.drop_policy = gate::DropPolicy::kByScore;
    t.pad_to_capacity = c.Flag("pad");
  }
  m.router.aux_loss = c.Str("aux") == "seq_aux_loss"      ? gate::AuxLoss::kSequence
                      : c.Str("aux") == "global_aux_loss" ? gate::AuxLoss::kGlobal
                                                          : gate::AuxLoss::kBatch;
  m.router.aux_loss_coeff = c.Num("aux_coeff");
  if (c.Has("z_coeff")) m.router.z_loss_coeff = c.Num("z_coeff");
  m.router.expert_bias = c.Flag("bias");
  m.router.bias_update_rate = 1e-2;
  m.ffn_hidden_size = static_cast<int64_t>(c.Num("ffn"));
  const std::string& act = c.Str("activation");
  m.activation = act == "gelu"   ? experts::Activation::kGelu
                 : act == "relu" ? experts::Activation::kRelu
                                 : experts::Activation::kSwiglu;
  if (c.Has("shared")) {
    m.num_shared_experts = 1;
    m.shared_ffn_hidden_size = static_cast<int64_t>(c.Num("shared"));
  }
  m.shared_expert_gate = c.Flag("shared_gate");
  m.apply_probs_on_input = c.Flag("probs_on_input");
  return m;
}

// Megatron's [seq, batch, ...] as the layer's tokens: [seq · batch, ...] as they lie, or for
// the per-sequence loss whole sequences one after another ([batch, seq]).
at::Tensor Tokens(const at::Tensor& sbh, bool by_sequence) {
  const at::Tensor t = by_sequence ? sbh.transpose(0, 1) : sbh;
  return t.reshape({-1, sbh.size(2)}).contiguous();
}

TEST(MegatronLayerTest, MatchesMegatronCoreMoELayer) {
  absl::StatusOr<common::Safetensors> f = common::ReadSafetensors(kFixture);
  ASSERT_TRUE(f.ok()) << f.status();
  const std::vector<std::string> names = absl::StrSplit(f->metadata.at("cases"), ' ');
  ASSERT_GE(names.size(), 9u);
  for (const std::string& name : names) {
    const Case c(*f, name);
    // The per-sequence loss's tokens go in as whole sequences one after another, and as they
    // are, position by position (SequenceOrder::kInterleaved).
    for (bool by_sequence :
         c.Str("aux") == "seq_aux_loss" ? std::vector<bool>{true, false} : std::vector<bool>{false}) {
      SCOPED_TRACE(name + (by_sequence ? ", whole sequences" : ""));
      const at::Tensor& x_sbh = c.T("x");
      const int64_t S = x_sbh.size(0), B = x_sbh.size(1), H = x_sbh.size(2);
      const bool per_sequence = c.Str("aux") == "seq_aux_loss";
      const MoEConfig cfg = ConfigOf(c, H);
      absl::StatusOr<MoELayer> layer = MoELayer::Create(cfg, 7);
      ASSERT_TRUE(layer.ok()) << layer.status();
      const int E = cfg.router.num_experts;

      // Megatron's weights: expert i's linear_fc1.weight [2F | F, H] (SwiGLU: gate rows, then
      // up rows) is our fc1[i]ᵀ ([H, gate | up]); linear_fc2.weight [H, F] is fc2[i]ᵀ.
      {
        at::NoGradGuard no_grad;
        layer->router().weight().copy_(c.T("router.weight"));
        for (int e = 0; e < E; ++e) {
          layer->routed_experts().fc1()[e].copy_(c.T(absl::StrCat("experts.", e, ".fc1")).t());
          layer->routed_experts().fc2()[e].copy_(c.T(absl::StrCat("experts.", e, ".fc2")).t());
        }
        if (cfg.num_shared_experts > 0) {
          layer->shared_experts()->fc1()[0].copy_(c.T("shared.fc1").t());
          layer->shared_experts()->fc2()[0].copy_(c.T("shared.fc2").t());
        }
        if (cfg.shared_expert_gate) layer->shared_expert_gate().copy_(c.T("shared.gate"));
        if (cfg.router.expert_bias) layer->router().expert_bias().copy_(c.T("expert_bias"));
      }
      ASSERT_EQ(c.HasT("shared.gate"), cfg.shared_expert_gate);

      at::Tensor x = Tokens(x_sbh, by_sequence).requires_grad_(true);
      // Padding (the fixture's "valid", [seq, batch]): Megatron still routes it, we do not;
      // its g rows are 0, so only the real rows' outputs are compared.
      const at::Tensor valid = c.HasT("valid") ? c.T("valid").unsqueeze(2) > 0.5f : at::ones({S, B, 1}, at::kBool);
      absl::StatusOr<MoEOutput> out = layer->Forward(
          x, {.training = true,
              .num_sequences = per_sequence ? B : 1,
              .sequence_order = by_sequence ? gate::SequenceOrder::kWhole : gate::SequenceOrder::kInterleaved,
              .valid_tokens = c.HasT("valid") ? Tokens(valid, by_sequence).squeeze(1) : at::Tensor()});
      ASSERT_TRUE(out.ok()) << out.status();
      ((out->output * Tokens(c.T("g"), by_sequence)).sum() + out->aux_loss + out->z_loss).backward();
      // A second micro-batch of the same optimizer step (gradient accumulation): the global
      // aux loss's counts are the average of both; the parameter gradients below are the sum.
      if (c.HasT("x.1")) {
        at::Tensor x1 = Tokens(c.T("x.1"), false).requires_grad_(true);
        absl::StatusOr<MoEOutput> out1 = layer->Forward(x1, {.training = true, .micro_batch = 1});
        ASSERT_TRUE(out1.ok()) << out1.status();
        ((out1->output * Tokens(c.T("g.1"), false)).sum() + out1->aux_loss).backward();
        EXPECT_LT(RelErr(out1->output.reshape({S, B, H}), c.T("out.1")), 1e-5);
        EXPECT_LT(RelErr(x1.grad().reshape({S, B, H}), c.T("x.1.grad")), 1e-5);
        EXPECT_NEAR(out1->aux_loss_value, c.T("aux_loss.1").item<double>(), 1e-6 * c.T("aux_loss.1").item<double>());
        // Out of order: a clear error, and the step goes on from where it was.
        EXPECT_THAT(std::string(layer->Forward(x1, {.training = true, .micro_batch = 3}).status().message()),
                    ::testing::HasSubstr("micro_batch = 3 does not follow the step's 2 micro-batch(es) so far"));
      }

      auto back = [&](const at::Tensor& t) {  // our [tokens, H] as Megatron's [seq, batch, H]
        return by_sequence ? t.reshape({B, S, H}).transpose(0, 1) : t.reshape({S, B, H});
      };
      constexpr double kTol = 1e-5;
      double worst = 0;
      auto err = [&worst](const at::Tensor& got, const at::Tensor& want) {
        const double e = RelErr(got, want);
        worst = std::max(worst, e);
        return e;
      };
      EXPECT_LT(err(back(out->output) * valid, c.T("out") * valid), kTol);
      EXPECT_LT(err(back(x.grad()), c.T("x.grad")), kTol);
      EXPECT_NEAR(out->aux_loss_value, c.T("aux_loss").item<double>(), 1e-6 * c.T("aux_loss").item<double>());
      if (c.HasT("z_loss")) {
        EXPECT_NEAR(out->z_loss_value, c.T("z_loss").item<double>(), 1e-6 * c.T("z_loss").item<double>());
      } else {
        EXPECT_EQ(out->z_loss_value, 0);
      }
      EXPECT_LT(err(layer->router().weight().grad(), c.T("router.weight.grad")), kTol);
      for (int e = 0; e < E; ++e) {
        SCOPED_TRACE(absl::StrCat("expert ", e));
        const std::string k = absl::StrCat("experts.", e);
        EXPECT_LT(err(layer->routed_experts().fc1().grad()[e].t(), c.T(k + ".fc1.grad")), kTol);
        EXPECT_LT(err(layer->routed_experts().fc2().grad()[e].t(), c.T(k + ".fc2.grad")), kTol);
      }
      if (cfg.num_shared_experts > 0) {
        EXPECT_LT(err(layer->shared_experts()->fc1().grad()[0].t(), c.T("shared.fc1.grad")), kTol);
        EXPECT_LT(err(layer->shared_experts()->fc2().grad()[0].t(), c.T("shared.fc2.grad")), kTol);
      }
      if (cfg.shared_expert_gate) {
        EXPECT_LT(err(layer->shared_expert_gate().grad(), c.T("shared.gate.grad")), kTol);
      }
      if (cfg.router.expert_bias) {
        // Megatron counts the copies each expert kept; these cases drop none, where that is
        // also our count of routed copies.
        ASSERT_FALSE(c.Has("capacity"));
        EXPECT_TRUE(at::equal(out->tokens_per_expert.to(at::kFloat), c.T("tokens_per_expert")))
            << out->tokens_per_expert << c.T("tokens_per_expert");
        ASSERT_TRUE(layer->UpdateExpertBias(out->tokens_per_expert).ok());
        EXPECT_LT(RelErr(layer->router().expert_bias(), c.T("expert_bias.updated")), 1e-6);
      }
      // Megatron's drops: each expert's routed copies past its capacity.
      EXPECT_EQ(out->dropped, static_cast<int64_t>(c.T("dropped").item<float>()));
      if (c.Has("capacity")) {
        EXPECT_GT(out->dropped, 0);
      }
      std::printf("%-36s largest relative error %.2g (output and gradients), %lld copies dropped%s\n", name.c_str(),
                  worst, static_cast<long long>(out->dropped), by_sequence ? " (whole sequences)" : "");
    }
  }
}

}  // namespace
}  // namespace switchyard::moe
