#ifndef SWITCHYARD_COMMON_BF16_H_
#define SWITCHYARD_COMMON_BF16_H_

// bf16 <-> fp32 for hand-written CPU loops (permutation, fused activations).
#include <cstdint>
#include <cstring>

namespace switchyard::common {

// bf16 is the top half of an fp32: widen by a shift; narrow rounding to nearest even (NaN
// stays a quiet NaN), as c10::BFloat16 does, with no branch so that loops vectorise.
inline float WidenBf16(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline uint16_t NarrowToBf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return v != v ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

}  // namespace switchyard::common

#endif  // SWITCHYARD_COMMON_BF16_H_
