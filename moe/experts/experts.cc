#include "moe/experts/experts.h"

#include <cmath>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
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
                            const std::vector<int64_t>& counts) {
    ctx->save_for_backward({x, w});
    ctx->saved_data["counts"] = counts;
    const std::vector<int64_t> off = Offsets(counts);
    at::Tensor out = at::empty({x.size(0), w.size(2)}, x.options());
    for (size_t e = 0; e < counts.size(); ++e) {
      if (counts[e] == 0) continue;
      at::Tensor o = out.narrow(0, off[e], counts[e]);
      at::mm_out(o, x.narrow(0, off[e], counts[e]), w[e]);
    }
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const at::Tensor& x = s[0];
    const at::Tensor& w = s[1];
    const std::vector<int64_t> counts = ctx->saved_data["counts"].toIntVector();
    const std::vector<int64_t> off = Offsets(counts);
    const at::Tensor g = grads[0].contiguous();
    at::Tensor gx, gw;
    if (ctx->needs_input_grad(0)) {
      gx = at::empty_like(x);
      for (size_t e = 0; e < counts.size(); ++e) {
        if (counts[e] == 0) continue;
        at::Tensor o = gx.narrow(0, off[e], counts[e]);
        at::mm_out(o, g.narrow(0, off[e], counts[e]), w[e].t());
      }
    }
    if (ctx->needs_input_grad(1)) {
      gw = at::empty_like(w);
      for (size_t e = 0; e < counts.size(); ++e) {
        at::Tensor o = gw[e];
        if (counts[e] == 0) {
          o.zero_();
        } else {
          at::mm_out(o, x.narrow(0, off[e], counts[e]).t(), g.narrow(0, off[e], counts[e]));
        }
      }
    }
    return {gx, gw, at::Tensor()};
  }
};

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int64_t kGrain = 16;

struct SwigluFn : torch::autograd::Function<SwigluFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h) {
    ctx->save_for_backward({h});
    const int64_t n = h.size(0), f = h.size(1) / 2;
    at::Tensor out = at::empty({n, f}, h.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "Swiglu", [&] {
      using A = Acc<scalar_t>;
      const scalar_t* hp = h.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const scalar_t* g = hp + r * 2 * f;
          const scalar_t* u = g + f;
          scalar_t* o = op + r * f;
          for (int64_t c = 0; c < f; ++c) {
            const A gv = A(g[c]);
            o[c] = scalar_t(gv / (A(1) + std::exp(-gv)) * A(u[c]));
          }
        }
      });
    });
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor h = ctx->get_saved_variables()[0];
    const at::Tensor go = grads[0].contiguous();
    const int64_t n = h.size(0), f = h.size(1) / 2;
    at::Tensor gh = at::empty_like(h);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "SwigluBackward", [&] {
      using A = Acc<scalar_t>;
      const scalar_t* hp = h.data_ptr<scalar_t>();
      const scalar_t* gp = go.data_ptr<scalar_t>();
      scalar_t* out = gh.data_ptr<scalar_t>();
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const scalar_t* g = hp + r * 2 * f;
          const scalar_t* u = g + f;
          const scalar_t* d = gp + r * f;
          scalar_t* dg = out + r * 2 * f;
          scalar_t* du = dg + f;
          for (int64_t c = 0; c < f; ++c) {
            const A gv = A(g[c]), uv = A(u[c]), dv = A(d[c]);
            const A sig = A(1) / (A(1) + std::exp(-gv));
            du[c] = scalar_t(dv * gv * sig);
            dg[c] = scalar_t(dv * uv * sig * (A(1) + gv * (A(1) - sig)));
          }
        }
      });
    });
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

at::Tensor GroupedMatmul(const at::Tensor& x, const at::Tensor& w,
                         const std::vector<int64_t>& rows_per_expert) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && x.size(1) == w.size(1),
              "GroupedMatmul: x must be [N, in] and w [E, in, out]; got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(static_cast<int64_t>(rows_per_expert.size()) == w.size(0),
              "GroupedMatmul: ", rows_per_expert.size(), " row counts for ", w.size(0), " experts");
  int64_t total = 0;
  for (int64_t c : rows_per_expert) {
    TORCH_CHECK(c >= 0, "GroupedMatmul: negative row count");
    total += c;
  }
  TORCH_CHECK(total == x.size(0), "GroupedMatmul: row counts sum to ", total, " but x has ", x.size(0), " rows");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "GroupedMatmul: x and w dtypes differ");
  return GroupedMatmulFn::apply(x.contiguous(), w.contiguous(), rows_per_expert);
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
                                                   const std::vector<int64_t>& rows_per_local_expert) {
  if (!rows.defined() || rows.dim() != 2 || rows.size(1) != config_.hidden_size) {
    return absl::InvalidArgumentError(absl::StrFormat("experts: rows must be [N, %d]", config_.hidden_size));
  }
  if (static_cast<int>(rows_per_local_expert.size()) != num_local_experts()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "experts: %d row counts for %d local experts", rows_per_local_expert.size(), num_local_experts()));
  }
  try {
    const at::Tensor x = rows.to(config_.dtype);
    at::Tensor h = GroupedMatmul(x, fc1_, rows_per_local_expert);
    switch (config_.activation) {
      case Activation::kSwiglu: h = SwigluFused(h); break;
      case Activation::kGelu: h = at::gelu(h); break;
      case Activation::kRelu: h = at::relu(h); break;
    }
    return GroupedMatmul(h, fc2_, rows_per_local_expert);
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(absl::StrCat("experts: ", e.what_without_backtrace()));
  }
}

}  // namespace switchyard::experts
