#include "moe/gate/router.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include <immintrin.h>

#include <ATen/ATen.h>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "common/cpu_clones.h"
#include "common/parallel.h"

namespace switchyard::gate {
namespace {

absl::Status Invalid(const std::string& m) { return absl::InvalidArgumentError(m); }

// No NaN or inf in v: one vectorised pass (ATen's isfinite(x).all() makes a bool tensor
// first, ~0.3 ms at 4096 × 64 here, paid twice per routing with the aux loss).
SY_CPU_CLONES
bool AllFiniteF32(const float* __restrict__ v, int64_t n) {
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !(std::fabs(v[i]) <= std::numeric_limits<float>::max());
  return bad == 0;
}

}  // namespace

bool AllFinite(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return AllFiniteF32(t.data_ptr<float>(), t.numel());
  return at::isfinite(t).all().item<bool>();
}

namespace {

absl::Status CheckLogits(const at::Tensor& logits) {
  if (!logits.defined() || logits.dim() != 2) {
    return Invalid("router: logits must be a 2-D [tokens, experts] tensor");
  }
  if (!at::isFloatingType(logits.scalar_type())) {
    return Invalid("router: logits must be floating point");
  }
  if (logits.size(1) < 1) return Invalid("router: logits have no experts (second dimension 0)");
  if (!logits.device().is_cpu()) {
    return Invalid("router: logits must be a CPU tensor (its top-k and checks are host loops; the CUDA "
                   "router kernel is in moe/cuda)");
  }
  if (logits.numel() > 0 && !AllFinite(logits)) {
    return Invalid("router: logits contain NaN or inf; refusing to route (check the model for "
                   "overflow upstream)");
  }
  return absl::OkStatus();
}

// Top-k keys: each float mapped to an int32 whose signed order is the float order (ints
// compare and vectorise better than floats with NaN rules). -0.0 is taken as +0.0 (they are
// equal values) and NaN as -inf; kTaken lies below every key.
constexpr int32_t kTaken = std::numeric_limits<int32_t>::min();

inline int32_t OrderKey(float v) {
  float x = v != v ? -std::numeric_limits<float>::infinity() : v;
  x = x == 0.0f ? 0.0f : x;
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits >= 0 ? bits : bits ^ 0x7fffffff;
}

SY_CPU_CLONES
void OrderKeys(const float* __restrict__ v, int64_t n, int32_t* __restrict__ key) {
  for (int64_t j = 0; j < n; ++j) key[j] = OrderKey(v[j]);
}

// k = 1: the largest key, then its first index, each a vectorised pass over the row's keys.
// (32-bit indices: with 64-bit ones GCC 12 left the first-index pass scalar.)
SY_CPU_CLONES
int64_t ArgMaxKey(const int32_t* __restrict__ key, int32_t n) {
  int32_t m = kTaken;
  for (int32_t j = 0; j < n; ++j) m = key[j] > m ? key[j] : m;
  int32_t first = n;
  for (int32_t j = 0; j < n; ++j) {
    const int32_t c = key[j] == m ? j : n;
    first = c < first ? c : first;
  }
  return first;
}

// Small k > 1: each entry packed as (key << 32) | (n − 1 − j), so that one vectorised max
// per round gives the largest key and, among equal keys, the lowest index; the winner is
// then marked taken. (At 4096 × 64, k = 8, one thread on the 2-core development machine:
// 0.49 ms, against 0.80 for two int32 passes a round, max then first index, which in turn
// replaced an insertion into a sorted best-k list whose data-dependent branches cost ~8 ns
// an element. For k = 1 the two int32 passes stay: 0.078 against 0.094 ms.)
constexpr int64_t kTakenPacked = std::numeric_limits<int64_t>::min();  // below every packed key

SY_CPU_CLONES
void PackKeys(const float* __restrict__ v, int64_t n, int64_t* __restrict__ packed) {
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t high = static_cast<uint64_t>(static_cast<int64_t>(OrderKey(v[j]))) << 32;
    packed[j] = static_cast<int64_t>(high | static_cast<uint64_t>(n - 1 - j));
  }
}

SY_CPU_CLONES
void TopKByRounds(int64_t* __restrict__ packed, int64_t n, int64_t k, int64_t* __restrict__ idx) {
  for (int64_t i = 0; i < k; ++i) {
    int64_t m = kTakenPacked;
    for (int64_t j = 0; j < n; ++j) m = packed[j] > m ? packed[j] : m;
    const int64_t j = n - 1 - (m & 0xffffffff);
    idx[i] = j;
    packed[j] = kTakenPacked;
  }
}

// Top-k by rounds for rows of n ≤ 64 on AVX-512, from the scores: the packed keys (as
// PackKeys, built in registers) stay in eight registers, and each round's maximum is reduced
// across lanes by permutes, so no round waits on memory (TopKByRounds reloads the row after
// a scalar store into it every round, and reads keys PackKeys has just stored). The whole of
// TopKRoute at 4096 tokens, one thread, medians of 300: E = 64, k = 8 0.69 → 0.55 ms; k = 2
// 0.50 → 0.41; E = 60, k = 8 0.86 → 0.55 (2-core AMD EPYC Zen 5).
#define SY_AVX512 __attribute__((target("avx512f")))
SY_INTRINSICS_BEGIN
constexpr int64_t kRegisterRow = 64;

SY_AVX512 void TopKRowInRegisters(const float* __restrict__ row, int64_t n, int64_t k, int64_t* __restrict__ idx) {
  const __m512i taken = _mm512_set1_epi64(kTakenPacked);
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  __m512i v[8];
  for (int i = 0; i < 8; i += 2) {
    const int64_t left = n - 8 * i;
    const __mmask16 live = left >= 16 ? 0xffff : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
    __m512 x = _mm512_maskz_loadu_ps(live, live != 0 ? row + 8 * i : row);  // no pointer past the row
    x = _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_ps(-INFINITY));  // NaN as -inf
    x = _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_EQ_OQ), _mm512_setzero_ps());  // -0 as +0
    __m512i key = _mm512_castps_si512(x);
    key = _mm512_mask_xor_epi32(key, _mm512_cmplt_epi32_mask(key, _mm512_setzero_si512()), key,
                                _mm512_set1_epi32(0x7fffffff));  // OrderKey
    for (int half = 0; half < 2; ++half) {
      const __m512i wide = _mm512_cvtepi32_epi64(half == 0 ? _mm512_castsi512_si256(key) : _mm512_extracti64x4_epi64(key, 1));
      const int64_t first = 8 * (i + half);
      const __m512i packed = _mm512_or_si512(_mm512_slli_epi64(wide, 32),
                                             _mm512_sub_epi64(_mm512_set1_epi64(n - 1 - first), lane));
      const __mmask8 in_row = static_cast<__mmask8>(half == 0 ? live : live >> 8);
      v[i + half] = _mm512_mask_mov_epi64(taken, in_row, packed);
    }
  }
  for (int64_t r = 0; r < k; ++r) {
    __m512i m = _mm512_max_epi64(_mm512_max_epi64(_mm512_max_epi64(v[0], v[1]), _mm512_max_epi64(v[2], v[3])),
                                 _mm512_max_epi64(_mm512_max_epi64(v[4], v[5]), _mm512_max_epi64(v[6], v[7])));
    m = _mm512_max_epi64(m, _mm512_shuffle_i64x2(m, m, 0x4E));        // swap the 256-bit halves
    m = _mm512_max_epi64(m, _mm512_shuffle_i64x2(m, m, 0xB1));        // swap neighbouring 128-bit lanes
    m = _mm512_max_epi64(m, _mm512_shuffle_epi32(m, _MM_PERM_BADC));  // swap the 64-bit halves of each
    // Every lane holds the maximum now; packed keys are distinct, so it marks one entry.
    for (int i = 0; i < 8; ++i) v[i] = _mm512_mask_mov_epi64(v[i], _mm512_cmpeq_epi64_mask(v[i], m), taken);
    idx[r] = n - 1 - (_mm_cvtsi128_si64(_mm512_castsi512_si128(m)) & 0xffffffff);
  }
}
SY_INTRINSICS_END
#undef SY_AVX512

bool UseRegisterTopK() {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512;
}

// Indices of the k largest entries of each row, largest first; among equal values the
// lower index wins (at::topk leaves ties to its partial selection, which on the CPU is not
// index order). NaN counts as -inf. Up to kRoundsMaxK by rounds, beyond by a partial sort
// (expert choice, where k is an expert's capacity of tokens).
constexpr int64_t kRoundsMaxK = 32;

at::Tensor TopKRows(const at::Tensor& scores_in, int64_t k) {
  const at::Tensor scores = scores_in.to(at::kFloat).contiguous();
  const int64_t rows = scores.size(0), n = scores.size(1);
  TORCH_CHECK(k >= 0 && k <= n && n < std::numeric_limits<int32_t>::max(), "TopKRows: k = ", k,
              " of ", n);
  at::Tensor out = at::empty({rows, k}, scores.options().dtype(at::kLong));
  const float* s = scores.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    const bool rounds = k > 1 && k <= kRoundsMaxK, in_registers = rounds && n <= kRegisterRow && UseRegisterTopK();
    std::vector<int32_t> key(rounds ? 0 : n);
    std::vector<int64_t> packed(rounds ? n : 0), order(k <= kRoundsMaxK ? 0 : n);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = s + r * n;
      int64_t* idx = o + r * k;
      if (rounds) {
        if (in_registers) {
          TopKRowInRegisters(row, n, k, idx);
        } else {
          PackKeys(row, n, packed.data());
          TopKByRounds(packed.data(), n, k, idx);
        }
        continue;
      }
      if (k == 0) continue;
      OrderKeys(row, n, key.data());
      if (k == 1) {
        idx[0] = ArgMaxKey(key.data(), static_cast<int32_t>(n));
        continue;
      }
      std::iota(order.begin(), order.end(), int64_t{0});
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
        return key[a] > key[b] || (key[a] == key[b] && a < b);
      });
      std::copy(order.begin(), order.begin() + k, idx);
    }
  });
  return out;
}

// The routing map of top-k indices ([T, k], distinct within a row) and its column sums, in
// one pass each instead of ATen's scatter and bool reduction (0.23 ms at 4096 × 64, k = 8,
// on the development machine, for one of the two maps a routing step makes).
std::pair<at::Tensor, at::Tensor> MapAndCounts(const at::Tensor& idx_in, int64_t E) {
  const at::Tensor idx = idx_in.to(at::kLong).contiguous();
  const int64_t T = idx.size(0), k = idx.size(1);
  at::Tensor map = at::zeros({T, E}, idx.options().dtype(at::kBool));
  at::Tensor counts = at::zeros({E}, idx.options());
  bool* m = map.data_ptr<bool>();
  int64_t* n = counts.data_ptr<int64_t>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < T * k; ++j) {
    TORCH_CHECK(ip[j] >= 0 && ip[j] < E, "router: expert index ", ip[j], " of ", E);
    m[(j / k) * E + ip[j]] = true;
    ++n[ip[j]];
  }
  return {map, counts};
}

at::Tensor TopKIndices(const at::Tensor& scores, int64_t k, int64_t dim) {
  return dim == 1 ? TopKRows(scores, k) : TopKRows(scores.t(), k).t();
}

// Top-k of `scores` (within the best groups when group-limited); returns the indices.
at::Tensor ChooseTopK(const at::Tensor& scores, const TopKOptions& o) {
  if (o.group_topk <= 0) return TopKIndices(scores, o.top_k, /*dim=*/1);
  const int64_t T = scores.size(0), E = scores.size(1);
  const at::Tensor grouped = scores.view({T, o.num_groups, E / o.num_groups});
  const int per_group = o.group_score_topk > 0 ? o.group_score_topk : o.top_k / o.group_topk;
  const at::Tensor group_scores = std::get<0>(at::topk(grouped, per_group, /*dim=*/-1)).sum(-1);
  const at::Tensor group_idx = TopKIndices(group_scores, o.group_topk, /*dim=*/1);
  const at::Tensor group_mask = at::zeros_like(group_scores).scatter_(1, group_idx, 1.0);
  const at::Tensor score_mask =
      group_mask.unsqueeze(-1).expand({T, o.num_groups, E / o.num_groups}).reshape({T, E});
  const at::Tensor masked = scores.masked_fill(score_mask.logical_not(), -INFINITY);
  return TopKIndices(masked, o.top_k, /*dim=*/1);
}

// For each expert, the `capacity` slots it keeps, as rows [row0, row0 + rows) of the
// block's [N, E] bool mask. `idx`: [N, k], each token's choices, best first; `key`: [N, k],
// the weights at idx, which kByScore ranks (unused by the other policies).
//
// The order is that of a stable descending sort of each expert's column of [N, E] keys with
// ties by token index, but only the N·k routed slots are ranked (a sort of [N, E] took 3.3 s
// at N = 65536, E = 256 here, 15 times the whole dropless routing):
//   kByScore: routed slots of positive weight by (weight desc, token asc); after them every
//     token whose key for the expert is 0, routed (weight exactly 0, as Megatron-Core, which
//     then ties by index) or not, in token order.
//   kByPosition: routed slots in token order, then unrouted ones in token order.
//   kByChoiceThenPosition: routed slots by (choice rank asc, token asc), then unrouted ones.
// Unrouted slots matter only to pad_to_capacity, which keeps them as padding.
at::Tensor CapacityKeep(const at::Tensor& idx_in, const at::Tensor& key_in, int64_t E, int64_t capacity,
                        DropPolicy policy, int64_t row0, int64_t rows) {
  const at::Tensor idx = idx_in.to(at::kLong).contiguous();
  const int64_t N = idx.size(0), k = idx.size(1);
  const at::TensorOptions bools = idx.options().dtype(at::kBool);
  if (capacity >= N) return at::ones({rows, E}, bools);
  at::Tensor keep = at::zeros({rows, E}, bools);
  if (capacity <= 0) return keep;
  const bool by_score = policy == DropPolicy::kByScore;
  const at::Tensor key = by_score ? key_in.detach().to(at::kFloat).contiguous() : at::Tensor();
  TORCH_CHECK(!by_score || (key.size(0) == N && key.size(1) == k), "CapacityKeep: key must be [N, k] like idx");
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* kp = by_score ? key.data_ptr<float>() : nullptr;
  // Slots j = t·k + c bucketed by expert, each bucket in token order (a counting sort).
  std::vector<int64_t> start(E + 1, 0), slot(N * k);
  for (int64_t j = 0; j < N * k; ++j) {
    TORCH_CHECK(ip[j] >= 0 && ip[j] < E, "router: expert index ", ip[j], " of ", E);
    ++start[ip[j] + 1];
  }
  std::partial_sum(start.begin(), start.end(), start.begin());
  {
    std::vector<int64_t> cursor(start.begin(), start.end() - 1);
    for (int64_t j = 0; j < N * k; ++j) slot[cursor[ip[j]]++] = j;
  }
  bool* out = keep.data_ptr<bool>();
  auto mark = [&](int64_t t, int64_t e) {
    if (t >= row0 && t < row0 + rows) out[(t - row0) * E + e] = true;
  };
  at::parallel_for(0, E, 1, [&](int64_t e_begin, int64_t e_end) {
    std::vector<int64_t> first;  // the slots ranked before every key-0 / unrouted slot
    for (int64_t e = e_begin; e < e_end; ++e) {
      first.assign(slot.begin() + start[e], slot.begin() + start[e + 1]);
      if (by_score) {
        first.erase(std::remove_if(first.begin(), first.end(), [&](int64_t j) { return !(kp[j] > 0.0f); }),
                    first.end());
      }
      const int64_t n = static_cast<int64_t>(first.size());
      if (n > capacity) {
        auto before = [&](int64_t a, int64_t b) {  // a ranks before b; ties: the lower token
          if (by_score && kp[a] != kp[b]) return kp[a] > kp[b];
          if (policy == DropPolicy::kByChoiceThenPosition && a % k != b % k) return a % k < b % k;
          return a < b;  // slot order is token order (one slot per token and expert)
        };
        if (policy != DropPolicy::kByPosition) std::nth_element(first.begin(), first.begin() + capacity, first.end(), before);
        for (int64_t i = 0; i < capacity; ++i) mark(first[i] / k, e);
        continue;
      }
      // All of `first`, then the lowest tokens not in it (`first` is in token order).
      for (int64_t j : first) mark(j / k, e);
      int64_t left = capacity - n, p = 0;
      for (int64_t t = 0; t < N && left > 0; ++t) {
        if (p < n && first[p] / k == t) {
          ++p;
          continue;
        }
        mark(t, e);
        --left;
      }
    }
  });
  return keep;
}

// Each row divided by its sum, at least FLT_EPSILON (DeepSpeed's clamp), so a token with
// every slot dropped keeps weights 0 rather than NaN.
at::Tensor NormalizeKept(const at::Tensor& w) {
  return w / w.sum(-1, /*keepdim=*/true).clamp_min(std::numeric_limits<float>::epsilon());
}

}  // namespace

int64_t ExpertCapacity(int64_t tokens, int top_k, int num_experts, double capacity_factor) {
  const double c = std::ceil(static_cast<double>(tokens) * top_k / num_experts * capacity_factor);
  // An expert gets each token at most once: more slots change nothing, and a huge factor
  // must not overflow the conversion (to a capacity of 0, which would drop every token).
  return c >= static_cast<double>(tokens) ? tokens : static_cast<int64_t>(c);
}

namespace {

// A part of a block must lie inside it and have a way to gather the block (null: no block).
absl::Status CheckBlock(const BlockOfTokens* block, int64_t T) {
  if (block == nullptr) return absl::OkStatus();
  if (block->block_tokens < 0 || block->offset < 0 || T > block->block_tokens - block->offset || !block->gather) {
    return Invalid(absl::StrFormat("router: tokens [%d, %d) of a block of %d need a gather over the block",
                                   block->offset, block->offset + T, block->block_tokens));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckTopKOptions(const TopKOptions& o, int64_t E) {
  if (o.top_k < 1 || o.top_k > E) {
    return Invalid(absl::StrFormat("router: top_k = %d must be between 1 and the number of "
                                   "experts %d", o.top_k, E));
  }
  if (o.group_topk > 0 || o.num_groups > 0 || o.group_score_topk != 0) {
    if (o.num_groups < 1 || E % o.num_groups != 0) {
      return Invalid(absl::StrFormat("router: num_groups = %d must divide the %d experts",
                                     o.num_groups, E));
    }
    if (o.group_topk < 1 || o.group_topk > o.num_groups) {
      return Invalid(absl::StrFormat("router: group_topk = %d must be between 1 and num_groups = %d",
                                     o.group_topk, o.num_groups));
    }
    if (o.top_k < o.group_topk || o.top_k > o.group_topk * (E / o.num_groups)) {
      return Invalid(absl::StrFormat(
          "router: top_k = %d must be between group_topk = %d and the %d experts of the chosen "
          "groups", o.top_k, o.group_topk, o.group_topk * (E / o.num_groups)));
    }
    if (o.group_score_topk < 0 || o.group_score_topk > E / o.num_groups) {
      return Invalid(absl::StrFormat("router: group_score_topk = %d must be between 0 and the %d "
                                     "experts of a group", o.group_score_topk, E / o.num_groups));
    }
  }
  if (!(o.capacity_factor >= 0) || !std::isfinite(o.capacity_factor)) {
    return Invalid(absl::StrFormat("router: capacity_factor = %g must be >= 0 (0: dropless)",
                                   o.capacity_factor));
  }
  if (o.min_capacity < 0) {
    return Invalid(absl::StrFormat("router: min_capacity = %d must be >= 0", o.min_capacity));
  }
  if (o.pad_to_capacity && o.capacity_factor == 0) {
    return Invalid("router: pad_to_capacity needs capacity_factor > 0");
  }
  if (!(o.scaling_factor > 0) || !std::isfinite(o.scaling_factor)) {
    return Invalid(absl::StrFormat("router: scaling_factor = %g must be > 0", o.scaling_factor));
  }
  return absl::OkStatus();
}

absl::StatusOr<Routing> TopKRoute(const at::Tensor& logits, const TopKOptions& o,
                                  const at::Tensor& expert_bias, const BlockOfTokens* block) {
  if (absl::Status s = CheckLogits(logits); !s.ok()) return s;
  const int64_t T = logits.size(0), E = logits.size(1);
  if (absl::Status s = CheckTopKOptions(o, E); !s.ok()) return s;
  if (expert_bias.defined() && (expert_bias.dim() != 1 || expert_bias.size(0) != E)) {
    return Invalid(absl::StrFormat("router: expert_bias must have shape [%d]", E));
  }

  const at::Tensor x = logits.to(at::kFloat);  // router math in fp32
  const at::Tensor bias = expert_bias.defined() ? expert_bias.detach().to(at::kFloat) : at::Tensor();
  auto choose = [&](const at::Tensor& s) { return ChooseTopK(bias.defined() ? s.detach() + bias : s.detach(), o); };
  at::Tensor idx, weights, softmax_scores;
  if (o.score == ScoreFunction::kSoftmax && o.pre_softmax) {
    const at::Tensor s = at::softmax(x, -1);
    idx = choose(s);
    weights = s.gather(1, idx);
    softmax_scores = s;
  } else if (o.score == ScoreFunction::kSoftmax) {
    idx = choose(x);
    weights = at::softmax(x.gather(1, idx), -1);
  } else {
    const at::Tensor s = at::sigmoid(x);
    idx = choose(s);
    weights = s.gather(1, idx);
  }
  if (o.weight_norm == WeightNorm::kTopK ||
      (o.weight_norm == WeightNorm::kSigmoidTopK && o.score == ScoreFunction::kSigmoid && o.top_k > 1)) {
    weights = weights / (weights.sum(-1, /*keepdim=*/true) + 1e-20);
  }
  auto scale = [&](const at::Tensor& w) { return o.scaling_factor != 1.0f ? w * o.scaling_factor : w; };
  const bool norm_kept = o.weight_norm == WeightNorm::kKept;
  const at::Tensor raw = weights;
  weights = scale(norm_kept ? NormalizeKept(weights) : weights);

  Routing r;
  r.topk_indices = idx;
  r.topk_weights = weights;
  // kKept normalises a row of [T, E] (zeros where not kept), summing in expert order as
  // DeepSpeed does, so that even the gradients round alike.
  const at::Tensor raw_probs = norm_kept ? at::zeros_like(x).scatter(1, idx, raw) : at::Tensor();
  r.probs = norm_kept ? scale(NormalizeKept(raw_probs)) : at::zeros_like(x).scatter(1, idx, weights);
  std::tie(r.routing_map, r.tokens_per_expert) = MapAndCounts(idx, E);
  if (softmax_scores.defined() && o.group_topk <= 0 && !bias.defined()) {
    r.softmax_scores = softmax_scores;
    r.chosen = r.routing_map;
  }
  if (o.capacity_factor > 0) {
    const bool part = block != nullptr;
    if (absl::Status s = CheckBlock(block, T); !s.ok()) return s;
    const int64_t counted = part ? block->block_tokens : T;
    r.capacity = std::max(ExpertCapacity(counted, o.top_k, static_cast<int>(E), o.capacity_factor),
                          o.min_capacity);
    // The key at idx ([T, k]): a dense [T, E] key is 0 elsewhere.
    const at::Tensor key_k = o.drop_policy == DropPolicy::kByScore ? (norm_kept ? raw : weights).detach() : at::Tensor();
    at::Tensor keep;
    if (part) {
      // Rank the whole block's slots, then keep this part's rows. Only the chosen slots
      // travel: [T, k] experts and (ranking by score) their keys.
      const at::Tensor block_idx = block->gather(idx.contiguous());
      const at::Tensor block_key = key_k.defined() ? block->gather(key_k.contiguous()) : at::Tensor();
      keep = CapacityKeep(block_idx, block_key, E, r.capacity, o.drop_policy, block->offset, T);
    } else {
      keep = CapacityKeep(idx, key_k, E, r.capacity, o.drop_policy, 0, T);
    }
    const at::Tensor final_map = o.pad_to_capacity && !part ? keep : r.routing_map.logical_and(keep);
    r.dropped = r.routing_map.logical_and(keep.logical_not());
    r.probs = norm_kept ? scale(NormalizeKept(raw_probs * final_map)) : r.probs * final_map;
    r.routing_map = final_map;
  } else {
    r.dropped = at::zeros_like(r.routing_map);
  }
  return r;
}

absl::StatusOr<Routing> ExpertChoiceRoute(const at::Tensor& logits, double capacity_factor,
                                          const BlockOfTokens* block) {
  if (absl::Status s = CheckLogits(logits); !s.ok()) return s;
  if (!(capacity_factor > 0) || !std::isfinite(capacity_factor)) {
    return Invalid(absl::StrFormat("router: expert-choice routing needs capacity_factor > 0 "
                                   "(each expert takes that many tokens); got %g", capacity_factor));
  }
  const int64_t T = logits.size(0), E = logits.size(1);
  if (absl::Status s = CheckBlock(block, T); !s.ok()) return s;
  const at::Tensor s = at::softmax(logits.to(at::kFloat), -1);
  Routing r;
  const int64_t counted = block != nullptr ? block->block_tokens : T;
  r.capacity = std::min<int64_t>(counted, ExpertCapacity(counted, 1, static_cast<int>(E), capacity_factor));
  if (block != nullptr) {
    // Every expert picks from the whole block's tokens; this part keeps its rows.
    const at::Tensor all = block->gather(s.detach().contiguous());
    const at::Tensor chosen = TopKIndices(all, r.capacity, /*dim=*/0);
    r.routing_map = at::zeros({counted, E}, s.options().dtype(at::kBool))
                        .scatter_(0, chosen, true)
                        .narrow(0, block->offset, T)
                        .contiguous();
  } else {
    const at::Tensor chosen = TopKIndices(s.detach(), r.capacity, /*dim=*/0);  // [C, E] token ids
    r.routing_map = at::zeros({T, E}, s.options().dtype(at::kBool)).scatter_(0, chosen, true);
  }
  r.probs = s * r.routing_map;
  r.tokens_per_expert = r.routing_map.sum(0);
  r.dropped = at::zeros_like(r.routing_map);
  return r;
}

absl::StatusOr<AuxLossInputs> AuxLossScores(const at::Tensor& logits, int top_k, ScoreFunction score) {
  if (absl::Status s = CheckLogits(logits); !s.ok()) return s;
  if (top_k < 1 || top_k > logits.size(1)) {
    return Invalid(absl::StrFormat("router: top_k = %d must be between 1 and the number of "
                                   "experts %d", top_k, logits.size(1)));
  }
  const at::Tensor x = logits.to(at::kFloat);
  AuxLossInputs out;
  if (score == ScoreFunction::kSoftmax) {
    out.scores = at::softmax(x, -1);
  } else {
    const at::Tensor s = at::sigmoid(x);
    out.scores = s / (s.sum(-1, /*keepdim=*/true) + 1e-20);
  }
  const at::Tensor idx = TopKIndices(out.scores.detach(), top_k, 1);
  std::tie(out.routing_map, out.tokens_per_expert) = MapAndCounts(idx, x.size(1));
  return out;
}

absl::StatusOr<at::Tensor> SequenceLoadBalancingLoss(const at::Tensor& scores,
                                                     const at::Tensor& routing_map,
                                                     int64_t num_sequences, int top_k,
                                                     double coeff, SequenceOrder order) {
  const int64_t T = scores.size(0), E = scores.size(1);
  if (num_sequences < 1 || T % num_sequences != 0) {
    return Invalid(absl::StrFormat("router: %d tokens do not split into %d sequences", T,
                                   num_sequences));
  }
  if (T == 0) return scores.sum() * 0.0;  // no tokens, no load (and no 0/0)
  const int64_t S = T / num_sequences;
  // [sequence, position, E] or [position, sequence, E]: the sums over the positions.
  const bool whole = order == SequenceOrder::kWhole;
  const std::vector<int64_t> shape = whole ? std::vector<int64_t>{num_sequences, S, E}
                                           : std::vector<int64_t>{S, num_sequences, E};
  const int64_t positions = whole ? 1 : 0;
  const at::Tensor per_seq_scores = scores.reshape(shape).sum(positions);
  const at::Tensor per_seq_counts = routing_map.reshape(shape).to(scores.scalar_type()).sum(positions);
  return (per_seq_scores * per_seq_counts).sum() *
         (static_cast<double>(E) * coeff /
          (static_cast<double>(top_k) * S * S * static_cast<double>(num_sequences)));
}

namespace {

absl::Status CheckPart(int64_t part_tokens, int64_t first_token, int64_t block_tokens, int64_t num_sequences) {
  if (num_sequences < 1 || block_tokens < 0 || block_tokens % num_sequences != 0) {
    return Invalid(absl::StrFormat("router: a block of %d tokens does not split into %d sequences", block_tokens,
                                   num_sequences));
  }
  if (first_token < 0 || part_tokens > block_tokens - first_token) {
    return Invalid(absl::StrFormat("router: tokens [%d, %d) are not inside the block of %d", first_token,
                                   first_token + part_tokens, block_tokens));
  }
  return absl::OkStatus();
}

// Each of the part's tokens' sequence in the block.
at::Tensor SequenceOfToken(int64_t part_tokens, int64_t first_token, int64_t block_tokens, int64_t num_sequences,
                           SequenceOrder order, const at::Device& device) {
  const at::Tensor t =
      at::arange(first_token, first_token + part_tokens, at::TensorOptions().dtype(at::kLong).device(device));
  return order == SequenceOrder::kWhole ? t.div(block_tokens / num_sequences, "floor") : t.remainder(num_sequences);
}

}  // namespace

absl::StatusOr<at::Tensor> SequenceCounts(const at::Tensor& routing_map, int64_t first_token,
                                          int64_t block_tokens, int64_t num_sequences, SequenceOrder order) {
  const int64_t T = routing_map.size(0), E = routing_map.size(1);
  if (absl::Status s = CheckPart(T, first_token, block_tokens, num_sequences); !s.ok()) return s;
  at::Tensor counts = at::zeros({num_sequences, E}, routing_map.options().dtype(at::kFloat));
  if (T == 0) return counts;
  return counts.index_add_(0, SequenceOfToken(T, first_token, block_tokens, num_sequences, order, routing_map.device()),
                           routing_map.to(at::kFloat));
}

absl::StatusOr<at::Tensor> SequenceLoadBalancingLossOfPart(const at::Tensor& scores, int64_t first_token,
                                                           int64_t block_tokens, const at::Tensor& block_counts,
                                                           int top_k, double coeff, SequenceOrder order) {
  const int64_t T = scores.size(0), E = scores.size(1), N = block_counts.defined() ? block_counts.size(0) : 0;
  if (!block_counts.defined() || block_counts.dim() != 2 || block_counts.size(1) != E) {
    return Invalid(absl::StrFormat("router: block_counts must be [num_sequences, %d]", E));
  }
  if (absl::Status s = CheckPart(T, first_token, block_tokens, N); !s.ok()) return s;
  if (T == 0) return scores.sum() * 0.0;  // nothing of the block here (or an empty block)
  const double len = static_cast<double>(block_tokens / N);
  const at::Tensor seq = SequenceOfToken(T, first_token, block_tokens, N, order, scores.device());
  const at::Tensor part_scores = at::zeros({N, E}, scores.options()).index_add(0, seq, scores);
  return (part_scores * block_counts.to(scores.scalar_type())).sum() *
         (static_cast<double>(E) * coeff / (static_cast<double>(top_k) * len * len * static_cast<double>(N)));
}

at::Tensor UpdateExpertBias(const at::Tensor& expert_bias, const at::Tensor& tokens_per_expert,
                            double rate, bool center) {
  const at::Tensor n = tokens_per_expert.detach().to(at::kDouble);  // counts exact past 2^24
  at::Tensor step = at::sign(n.mean() - n).to(expert_bias.scalar_type()) * rate;
  if (center) step = step - step.mean();
  return expert_bias.detach() + step;
}

at::Tensor LoadBalancingLoss(const at::Tensor& scores, const at::Tensor& tokens_per_expert,
                             int64_t total_tokens, int top_k, double coeff) {
  const double E = static_cast<double>(scores.size(1));
  const double T = static_cast<double>(total_tokens);
  // No tokens (a rank that got none): no load to balance, and no 0/0.
  if (total_tokens == 0) return scores.sum() * 0.0;
  return (scores.sum(0) * tokens_per_expert.to(scores.scalar_type())).sum() *
         (E * coeff / (top_k * T * T));
}

at::Tensor ZLoss(const at::Tensor& logits, double coeff, int64_t total_tokens) {
  const int64_t n = total_tokens >= 0 ? total_tokens : logits.size(0);
  const at::Tensor sq = at::logsumexp(logits.to(at::kFloat), {-1}).square();
  if (n == 0) return sq.sum() * 0.0;
  return sq.sum() * (coeff / static_cast<double>(n));
}

}  // namespace switchyard::gate
