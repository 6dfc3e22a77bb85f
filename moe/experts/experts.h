// Grouped expert MLPs: every local expert's weights in one tensor per projection, computed
// as one grouped GEMM over contiguous per-expert row blocks (never a module per expert, and
// never a full-size gradient per expert in the backward).
//
//   ExpertsConfig c{.hidden_size = 512, .ffn_hidden_size = 1024, .num_experts = 16,
//                   .ep_size = 2, .ep_rank = 1, .activation = Activation::kSwiglu};
//   absl::StatusOr<GroupedExperts> experts = GroupedExperts::Create(c, seed);
//   at::Tensor out = experts->Forward(rows, rows_per_expert);   // [N, H], one block per local expert
//
// Weights are drawn per global expert from (seed, expert index) before any sharding, so the
// same seed gives the same model under every EP and ETP layout. With expert tensor
// parallelism each rank holds a slice of F, and its output is a partial sum that the
// dispatcher reduces over the ETP group. This package never communicates.
#ifndef MOE_EXPERTS_EXPERTS_H_
#define MOE_EXPERTS_EXPERTS_H_

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"

namespace switchyard::experts {

enum class Activation { kGelu, kRelu, kSwiglu };

struct ExpertsConfig {
  int64_t hidden_size = 0;
  int64_t ffn_hidden_size = 0;  // per expert, before ETP sharding
  int num_experts = 1;          // global
  int ep_size = 1;              // this rank holds experts [ep_rank × E/ep, (ep_rank + 1) × E/ep)
  int ep_rank = 0;
  int etp_size = 1;             // F is split in etp_size slices; this rank holds slice etp_rank
  int etp_rank = 0;
  Activation activation = Activation::kSwiglu;
  at::ScalarType dtype = at::kFloat;
  float init_std = 0.02f;
};

// The dtype CPU GEMMs on `storage` tensors compute in: bf16 in fp32 unless the CPU has native
// bf16 dot products (AVX512-BF16), fp16 always in fp32; results are rounded back to storage.
// Either way products accumulate in fp32 and activations are computed in fp32.
at::ScalarType CpuGemmComputeType(at::ScalarType storage);

// Which GEMMs bf16 storage uses, process-wide: kAuto as above; kFp32 and kBf16 force one, so
// that tests check both paths on every CPU (bf16 GEMMs without bf16 units are right, but
// LibTorch's fallback for them is ~20x slower than fp32).
enum class Bf16Gemms { kAuto, kFp32, kBf16 };
void SetBf16Gemms(Bf16Gemms choice);

// Which loops the fused SwiGLU runs (with bf16 GEMMs, and fp32 on fp32 storage), process-wide:
// kAuto takes the AVX-512 + AVX512-BF16 kernels where the CPU has them; kPortable the loops
// built for any x86-64, so that tests check both on CPUs that have the units.
enum class SwigluKernels { kAuto, kPortable };
void SetSwigluKernels(SwigluKernels choice);

// out[segment s] = x[segment s] @ w[expert(s)]: x is cut into consecutive segments of
// rows_per_segment rows (summing to N); segment s belongs to expert segment_expert[s], or to
// expert s when segment_expert is empty (then one segment per expert). An expert may own
// several segments, in any order: the dispatcher hands over rows as (source rank, expert)
// blocks without regrouping them. x: [N, in]; w: [E, in, out]. Autograd to x and w; an expert
// with no rows gets a zero gradient.
at::Tensor GroupedMatmul(const at::Tensor& x, const at::Tensor& w,
                         const std::vector<int64_t>& rows_per_segment,
                         const std::vector<int64_t>& segment_expert = {});

// y[segment s] = act(x[s] @ w1[e]) @ w2[e] with e = expert(s), segments as GroupedMatmul
// takes them; w1: [E, H, F] ([E, H, 2F] = [gate | up] for SwiGLU), w2: [E, F, H]. Each
// segment runs start to end while its [n, F] block is in cache, forward and backward, rather
// than as three passes over [N, F] tensors; act(x @ w1) is recomputed per segment in the
// backward instead of being kept. row_weights (optional, [N], any float dtype, computed in
// fp32): y[r] = row_weights[r] · (act(x[r] @ w1) @ w2), applied to fc2's input, so the
// routing weights ride with the rows through the dispatcher and the combine is a plain sum
// (Megatron-Core's fused permute applies them in the activation likewise). Autograd to x, w1,
// w2 and row_weights.
at::Tensor GroupedMlp(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, Activation activation,
                      const std::vector<int64_t>& rows_per_segment,
                      const std::vector<int64_t>& segment_expert = {},
                      const at::Tensor& row_weights = {});

class GroupedExperts {
 public:
  static absl::StatusOr<GroupedExperts> Create(const ExpertsConfig& config, uint64_t seed);

  // rows: [N, H] in segments as GroupedMatmul takes them (segment_expert: local expert
  // indices; empty: one segment per local expert, in order).
  // row_weights: as GroupedMlp takes them (undefined: none).
  // Returns [N, H] in rows' dtype (a partial sum over F slices when etp_size > 1).
  absl::StatusOr<at::Tensor> Forward(const at::Tensor& rows, const std::vector<int64_t>& rows_per_segment,
                                     const std::vector<int64_t>& segment_expert = {},
                                     const at::Tensor& row_weights = {});

  const ExpertsConfig& config() const { return config_; }
  int num_local_experts() const { return config_.num_experts / config_.ep_size; }
  int first_expert() const { return config_.ep_rank * num_local_experts(); }
  int64_t local_ffn() const { return config_.ffn_hidden_size / config_.etp_size; }
  // fc1: [E_local, H, F_local] or, for SwiGLU, [E_local, H, 2·F_local] with the gate slice
  // first and the up slice second; fc2: [E_local, F_local, H]. Both require grad.
  at::Tensor& fc1() { return fc1_; }
  at::Tensor& fc2() { return fc2_; }

  // This rank's part of a full fc1 or fc2 tensor of every global expert laid out as one
  // process holds it ([E, H, F] or [E, H, 2F] with gate then up, [E, F, H]; weights or their
  // gradients): its EP rank's experts and its ETP slice of F, laid out as fc1() / fc2().
  at::Tensor LocalShard(const at::Tensor& full, bool fc1) const;

  // The full (unsharded) weights of global expert e as Create draws them, for tests and
  // checkpoint conversion: fc1 [H, F] (SwiGLU: [H, 2F], gate then up), fc2 [F, H].
  static std::pair<at::Tensor, at::Tensor> FullExpertWeights(const ExpertsConfig& config,
                                                             uint64_t seed, int expert);

 private:
  GroupedExperts() = default;
  ExpertsConfig config_;
  at::Tensor fc1_, fc2_;
};

}  // namespace switchyard::experts

#endif  // MOE_EXPERTS_EXPERTS_H_
