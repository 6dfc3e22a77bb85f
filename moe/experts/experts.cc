#include "moe/experts/experts.h"

#include <cmath>
#include <numeric>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/custom_function.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace switchyard::experts {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::vector<int64_t> Offsets(const std::vector<int64_t>& counts) {
  std::vector<int64_t> off(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) off[e + 1] = off[e] + counts[e];
  return off;
}

struct GroupedMatmulFn : torch::autograd::Function<GroupedMatmulFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const std::vector<int64_t>& counts, const std::vector<int64_t>& expert) {
    ctx->save_for_backward({x, w});
    ctx->saved_data["counts"] = counts;
    ctx->saved_data["expert"] = expert;
    const std::vector<int64_t> off = Offsets(counts);
    const at::ScalarType ct = CpuGemmComputeType(x.scalar_type());
    const at::Tensor xc = x.to(ct), wc = w.to(ct);
    at::Tensor out = at::empty({x.size(0), w.size(2)}, xc.options());
    for (size_t s = 0; s < counts.size(); ++s) {
      if (counts[s] == 0) continue;
      at::Tensor o = out.narrow(0, off[s], counts[s]);
      at::mm_out(o, xc.narrow(0, off[s], counts[s]), wc[expert[s]]);
    }
    return out.to(x.scalar_type());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::ScalarType ct = CpuGemmComputeType(saved[0].scalar_type());
    const at::Tensor x = saved[0].to(ct), w = saved[1].to(ct);
    const std::vector<int64_t> counts = ctx->saved_data["counts"].toIntVector();
    const std::vector<int64_t> expert = ctx->saved_data["expert"].toIntVector();
    const std::vector<int64_t> off = Offsets(counts);
    const at::Tensor g = grads[0].to(ct).contiguous();
    at::Tensor gx, gw;
    if (ctx->needs_input_grad(0)) {
      gx = at::empty_like(x);
      for (size_t s = 0; s < counts.size(); ++s) {
        if (counts[s] == 0) continue;
        at::Tensor o = gx.narrow(0, off[s], counts[s]);
        at::mm_out(o, g.narrow(0, off[s], counts[s]), w[expert[s]].t());
      }
    }
    if (ctx->needs_input_grad(1)) {
      gw = at::empty_like(w);
      std::vector<bool> written(w.size(0), false);
      for (size_t s = 0; s < counts.size(); ++s) {
        if (counts[s] == 0) continue;
        at::Tensor o = gw[expert[s]];
        const at::Tensor xs = x.narrow(0, off[s], counts[s]).t(), gs = g.narrow(0, off[s], counts[s]);
        if (written[expert[s]]) {
          o.addmm_(xs, gs);  // a later segment of the same expert adds to its gradient
        } else {
          at::mm_out(o, xs, gs);
          written[expert[s]] = true;
        }
      }
      for (int64_t e = 0; e < w.size(0); ++e) {
        if (!written[e]) gw[e].zero_();
      }
    }
    if (gx.defined()) gx = gx.to(saved[0].scalar_type());
    if (gw.defined()) gw = gw.to(saved[1].scalar_type());
    return {gx, gw, at::Tensor(), at::Tensor()};
  }
};

// SwiGLU on h = [gate | up] as ATen's vectorised kernels over the two halves (strided views,
// no copies of h): forward silu(gate)·up; backward d_up = g·silu(gate) and
// d_gate = silu'(gate)·g·up, written straight into the two halves of one gradient buffer.
struct SwigluFn : torch::autograd::Function<SwigluFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h) {
    ctx->save_for_backward({h});
    const int64_t f = h.size(1) / 2;
    return at::silu(h.narrow(1, 0, f)).mul_(h.narrow(1, f, f));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor h = ctx->get_saved_variables()[0];
    const at::Tensor& go = grads[0];
    const int64_t f = h.size(1) / 2;
    const at::Tensor gate = h.narrow(1, 0, f), up = h.narrow(1, f, f);
    at::Tensor gh = at::empty_like(h);
    at::Tensor d_gate = gh.narrow(1, 0, f), d_up = gh.narrow(1, f, f);
    at::silu_out(d_up, gate).mul_(go);
    at::silu_backward_out(d_gate, go * up, gate);
    return {gh};
  }
};

uint64_t ExpertSeed(uint64_t seed, int expert) {
  // splitmix64 of (seed, expert): nearby seeds and experts give unrelated streams.
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (static_cast<uint64_t>(expert) + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

at::ScalarType CpuGemmComputeType(at::ScalarType storage) {
  if (storage == at::kBFloat16) {
    // oneDNN's bf16 GEMM needs AVX512-BF16 (or AMX); without it LibTorch falls back to a
    // scalar loop (measured on an AVX2 machine: 4.5 GFLOP/s bf16 against 100 fp32).
    static const bool native = __builtin_cpu_supports("avx512bf16");
    return native ? storage : at::kFloat;
  }
  if (storage == at::kHalf) return at::kFloat;
  return storage;
}

at::Tensor GroupedMatmul(const at::Tensor& x, const at::Tensor& w,
                         const std::vector<int64_t>& rows_per_segment,
                         const std::vector<int64_t>& segment_expert) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && x.size(1) == w.size(1),
              "GroupedMatmul: x must be [N, in] and w [E, in, out]; got ", x.sizes(), " and ", w.sizes());
  std::vector<int64_t> expert = segment_expert;
  if (expert.empty()) {
    TORCH_CHECK(static_cast<int64_t>(rows_per_segment.size()) == w.size(0),
                "GroupedMatmul: ", rows_per_segment.size(), " row counts for ", w.size(0), " experts");
    expert.resize(rows_per_segment.size());
    std::iota(expert.begin(), expert.end(), 0);
  }
  TORCH_CHECK(expert.size() == rows_per_segment.size(), "GroupedMatmul: ", rows_per_segment.size(),
              " segments but ", expert.size(), " segment experts");
  int64_t total = 0;
  for (size_t s = 0; s < expert.size(); ++s) {
    TORCH_CHECK(rows_per_segment[s] >= 0, "GroupedMatmul: negative row count");
    TORCH_CHECK(expert[s] >= 0 && expert[s] < w.size(0), "GroupedMatmul: segment ", s, " names expert ",
                expert[s], " of ", w.size(0));
    total += rows_per_segment[s];
  }
  TORCH_CHECK(total == x.size(0), "GroupedMatmul: row counts sum to ", total, " but x has ", x.size(0), " rows");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "GroupedMatmul: x and w dtypes differ");
  return GroupedMatmulFn::apply(x.contiguous(), w.contiguous(), rows_per_segment, expert);
}

at::Tensor SwigluFused(const at::Tensor& h) {
  TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0, "Swiglu: input must be [N, 2F], got ", h.sizes());
  return SwigluFn::apply(h.contiguous());
}

std::pair<at::Tensor, at::Tensor> GroupedExperts::FullExpertWeights(const ExpertsConfig& c,
                                                                    uint64_t seed, int expert) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(ExpertSeed(seed, expert));
  const int64_t f1 = c.activation == Activation::kSwiglu ? 2 * c.ffn_hidden_size : c.ffn_hidden_size;
  at::Tensor fc1 = at::empty({c.hidden_size, f1}, at::kFloat).normal_(0.0, c.init_std, gen);
  at::Tensor fc2 = at::empty({c.ffn_hidden_size, c.hidden_size}, at::kFloat).normal_(0.0, c.init_std, gen);
  return {fc1, fc2};
}

absl::StatusOr<GroupedExperts> GroupedExperts::Create(const ExpertsConfig& c, uint64_t seed) {
  if (c.hidden_size < 1 || c.ffn_hidden_size < 1 || c.num_experts < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "experts: hidden_size = %d, ffn_hidden_size = %d and num_experts = %d must all be at least 1",
        c.hidden_size, c.ffn_hidden_size, c.num_experts));
  }
  if (c.ep_size < 1 || c.num_experts % c.ep_size != 0 || c.ep_rank < 0 || c.ep_rank >= c.ep_size) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "experts: ep_size = %d must divide num_experts = %d (ep_rank = %d)", c.ep_size, c.num_experts, c.ep_rank));
  }
  if (c.etp_size < 1 || c.ffn_hidden_size % c.etp_size != 0 || c.etp_rank < 0 || c.etp_rank >= c.etp_size) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "experts: etp_size = %d must divide ffn_hidden_size = %d (etp_rank = %d)", c.etp_size,
        c.ffn_hidden_size, c.etp_rank));
  }
  if (!at::isFloatingType(c.dtype)) return absl::InvalidArgumentError("experts: dtype must be floating point");
  GroupedExperts x;
  x.config_ = c;
  const int64_t fl = x.local_ffn(), lo = c.etp_rank * fl;
  std::vector<at::Tensor> fc1, fc2;
  for (int i = 0; i < x.num_local_experts(); ++i) {
    auto [w1, w2] = FullExpertWeights(c, seed, x.first_expert() + i);
    if (c.activation == Activation::kSwiglu) {
      fc1.push_back(at::cat({w1.narrow(1, lo, fl), w1.narrow(1, c.ffn_hidden_size + lo, fl)}, 1));
    } else {
      fc1.push_back(w1.narrow(1, lo, fl));
    }
    fc2.push_back(w2.narrow(0, lo, fl));
  }
  x.fc1_ = at::stack(fc1).to(c.dtype).contiguous().requires_grad_(true);
  x.fc2_ = at::stack(fc2).to(c.dtype).contiguous().requires_grad_(true);
  return x;
}

absl::StatusOr<at::Tensor> GroupedExperts::Forward(const at::Tensor& rows,
                                                   const std::vector<int64_t>& rows_per_segment,
                                                   const std::vector<int64_t>& segment_expert) {
  if (!rows.defined() || rows.dim() != 2 || rows.size(1) != config_.hidden_size) {
    return absl::InvalidArgumentError(absl::StrFormat("experts: rows must be [N, %d]", config_.hidden_size));
  }
  if (segment_expert.empty() && static_cast<int>(rows_per_segment.size()) != num_local_experts()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "experts: %d row counts for %d local experts", rows_per_segment.size(), num_local_experts()));
  }
  try {
    const at::Tensor x = rows.to(config_.dtype);
    at::Tensor h = GroupedMatmul(x, fc1_, rows_per_segment, segment_expert);
    switch (config_.activation) {
      case Activation::kSwiglu: h = SwigluFused(h); break;
      case Activation::kGelu: h = at::gelu(h); break;
      case Activation::kRelu: h = at::relu(h); break;
    }
    return GroupedMatmul(h, fc2_, rows_per_segment, segment_expert);
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(absl::StrCat("experts: ", e.what_without_backtrace()));
  }
}

}  // namespace switchyard::experts
