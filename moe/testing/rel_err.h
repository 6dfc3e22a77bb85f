// The relative error the MoE layer's tests hold layouts and peers to.
#ifndef MOE_TESTING_REL_ERR_H_
#define MOE_TESTING_REL_ERR_H_

#include <ATen/ATen.h>

namespace switchyard::moe::testing {

// max|a − b| / max|b|: the error relative to the tensor's scale (0 for two empty tensors;
// 1e9 for tensors of different shapes).
inline double RelErr(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return 1e9;
  if (b.numel() == 0) return 0.0;
  const at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
  return ((x - y).abs().max() / (y.abs().max() + 1e-30)).item<double>();
}

}  // namespace switchyard::moe::testing

#endif  // MOE_TESTING_REL_ERR_H_
