#include "common/matmul.h"

#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common/cpu_clones.h"
#include "common/parallel.h"
#include "gtest/gtest.h"

namespace switchyard::common {
namespace {

// The largest |got - want| over the largest |want| (want computed in fp64 from the same inputs).
double RelErr(const at::Tensor& got, const at::Tensor& want) {
  const double scale = want.abs().max().item<double>();
  return (got.to(at::kDouble) - want).abs().max().item<double>() / (scale > 0 ? scale : 1.0);
}

// fp32 products round each partial sum: ~K·2^-24 relative at worst, far less typically. bf16
// ones accumulate in fp32 and round the result to bf16 once: half a bf16 ulp, 2^-9.
double Tolerance(at::ScalarType dt) { return dt == at::kFloat ? 2e-6 : 4.0 / 512; }

// An [r, c] operand in the given layout: row-major in a wider buffer (row stride > c), or a
// transposed view of a column-major buffer.
at::Tensor Operand(int64_t r, int64_t c, bool transposed, at::ScalarType dt) {
  if (transposed) return at::randn({c, r + 3}).to(dt).narrow(1, 1, r).t();
  return at::randn({r, c + 5}).to(dt).narrow(1, 2, c);
}

// Runs before every other test here (gtest keeps file order), so the cache still has the
// capacity it read at start-up: BUILD sets SWITCHYARD_MATMUL_CACHE_CAPACITY=7 for this test.
TEST(MatmulCache, CapacityComesFromTheEnvironment) {
  EXPECT_EQ(GetMatmulCacheStats().capacity, 7);
  EXPECT_EQ(GetMatmulCacheStats().size, 0);
}

struct Case {
  int64_t m, n, k;
};

class MatmulTest : public ::testing::TestWithParam<at::ScalarType> {
 protected:
  void SetUp() override { SetMatmulCacheCapacity(2048); }
  void TearDown() override { SetMatmulBackend(MatmulBackend::kAuto); }
};

TEST_P(MatmulTest, MatchesFp64ForEveryLayoutAndShape) {
  const at::ScalarType dt = GetParam();
  at::manual_seed(1);
  for (const Case c : {Case{64, 48, 32}, Case{37, 24, 5}, Case{1, 17, 9}, Case{13, 1, 40}, Case{8, 8, 1},
                       Case{300, 96, 257}}) {
    for (int layout = 0; layout < 4; ++layout) {
      for (bool accumulate : {false, true}) {
        const std::string what = "M=" + std::to_string(c.m) + " N=" + std::to_string(c.n) + " K=" +
                                 std::to_string(c.k) + " layout " + std::to_string(layout) +
                                 (accumulate ? " accumulate" : "") + " " + at::toString(dt);
        const at::Tensor a = Operand(c.m, c.k, layout & 1, dt), b = Operand(c.k, c.n, layout & 2, dt);
        // out: a row block of a wider tensor, so its row stride differs from N.
        const at::Tensor out = at::randn({c.m, c.n + 7}).to(dt).narrow(1, 3, c.n);
        const at::Tensor before = out.to(at::kDouble);
        const at::Tensor want = at::mm(a.to(at::kDouble), b.to(at::kDouble)) + (accumulate ? before : before * 0);
        MatmulOut(out, a, b, accumulate);
        EXPECT_LE(RelErr(out, want), Tolerance(dt)) << what;
      }
    }
  }
}

TEST_P(MatmulTest, AgreesWithLibTorch) {
  const at::ScalarType dt = GetParam();
  at::manual_seed(2);
  const at::Tensor a = at::randn({129, 70}).to(dt), b = at::randn({70, 33}).to(dt);
  const at::Tensor ours = at::empty({129, 33}, a.options()), theirs = at::empty({129, 33}, a.options());
  MatmulOut(ours, a, b);
  // fp32, and bf16 where the CPU has bf16 units, ran on a primitive.
  EXPECT_EQ(GetMatmulCacheStats().misses, dt == at::kFloat || HasAvx512Bf16() ? 1 : 0);
  SetMatmulBackend(MatmulBackend::kAten);
  MatmulOut(theirs, a, b);
  const at::Tensor want = at::mm(a.to(at::kDouble), b.to(at::kDouble));
  EXPECT_LE(RelErr(ours, want), Tolerance(dt));
  EXPECT_LE(RelErr(theirs, want), Tolerance(dt));
  EXPECT_EQ(GetMatmulCacheStats().misses + GetMatmulCacheStats().hits, dt == at::kFloat || HasAvx512Bf16() ? 1 : 0);
}

TEST_P(MatmulTest, EmptyDimensions) {
  const at::ScalarType dt = GetParam();
  // K = 0: the product is zero; accumulating adds nothing.
  const at::Tensor a = at::empty({4, 0}, at::TensorOptions().dtype(dt)), b = at::empty({0, 6}, a.options());
  const at::Tensor out = at::full({4, 6}, 3.0, a.options());
  MatmulOut(out, a, b, /*accumulate=*/true);
  EXPECT_TRUE(out.eq(3).all().item<bool>());
  MatmulOut(out, a, b);
  EXPECT_TRUE(out.eq(0).all().item<bool>());
  // M = 0 or N = 0: nothing to write, nothing read.
  const at::Tensor none = at::empty({0, 6}, a.options());
  MatmulOut(none, at::empty({0, 5}, a.options()), at::randn({5, 6}).to(dt));
  const at::Tensor thin = at::empty({4, 0}, a.options());
  MatmulOut(thin, at::randn({4, 5}).to(dt), at::empty({5, 0}, a.options()));
}

// bf16 operands into an fp32 out: the exact products of the bf16 values summed in fp32, on
// the primitive path and on LibTorch's, accumulating too; a sum of several products stays
// unrounded (within fp32 of the fp64 sum, where a bf16 out would round each step).
TEST(MatmulMixed, Bf16OperandsIntoFp32Out) {
  SetMatmulCacheCapacity(2048);
  at::manual_seed(5);
  for (MatmulBackend backend : {MatmulBackend::kAuto, MatmulBackend::kAten}) {
    SetMatmulBackend(backend);
    for (int layout = 0; layout < 4; ++layout) {
      const at::Tensor out = at::zeros({40, 24}, at::kFloat);
      at::Tensor want = at::zeros({40, 24}, at::kDouble);
      for (int step = 0; step < 8; ++step) {
        const at::Tensor a = Operand(40, 33, layout & 1, at::kBFloat16), b = Operand(33, 24, layout & 2, at::kBFloat16);
        MatmulOut(out, a, b, /*accumulate=*/step > 0);
        want += at::mm(a.to(at::kDouble), b.to(at::kDouble));
      }
      EXPECT_EQ(out.scalar_type(), at::kFloat);
      EXPECT_LE(RelErr(out, want), 1e-6) << "layout " << layout << (backend == MatmulBackend::kAten ? " aten" : "");
    }
  }
  SetMatmulBackend(MatmulBackend::kAuto);
  // With bf16 units, oneDNN took every one of these problems (none fell back to LibTorch).
  EXPECT_EQ(GetMatmulCacheStats().misses > 0, HasAvx512Bf16());
  EXPECT_EQ(GetMatmulCacheStats().refused, 0);
  // An out sharing an operand's memory: through a temporary, still unrounded.
  const at::Tensor a = at::randn({16, 16}).to(at::kBFloat16);
  const at::Tensor both = at::zeros({16, 32}, at::kFloat);
  const at::Tensor b16 = both.narrow(1, 0, 16).view(at::kBFloat16).narrow(1, 0, 16);  // bf16 view of out's bytes
  b16.copy_(at::randn({16, 16}).to(at::kBFloat16));
  const at::Tensor b = b16.clone();
  const at::Tensor out = both.narrow(1, 0, 16);
  MatmulOut(out, a, b16);
  EXPECT_LE(RelErr(out, at::mm(a.to(at::kDouble), b.to(at::kDouble))), 1e-6);
  // Other mixed pairs are refused by name.
  EXPECT_THROW(MatmulOut(at::empty({4, 4}, at::kBFloat16), at::randn({4, 4}), at::randn({4, 4})), c10::Error);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, MatmulTest, ::testing::Values(at::kFloat, at::kBFloat16),
                         [](const auto& info) { return std::string(at::toString(info.param)); });

TEST(MatmulCache, ReusesPrimitivesAndEvictsTheLeastRecentlyUsed) {
  SetMatmulCacheCapacity(2);
  at::manual_seed(3);
  auto product = [](int64_t m) {
    const at::Tensor a = at::randn({m, 16}), b = at::randn({16, 8}), out = at::empty({m, 8});
    MatmulOut(out, a, b);
    EXPECT_LE(RelErr(out, at::mm(a.to(at::kDouble), b.to(at::kDouble))), Tolerance(at::kFloat)) << "M=" << m;
  };
  product(10), product(10);
  MatmulCacheStats s = GetMatmulCacheStats();
  EXPECT_EQ(s.size, 1);
  EXPECT_EQ(s.misses, 1);
  EXPECT_EQ(s.hits, 1);
  product(11), product(10), product(12);  // 12 evicts 11, the least recently used
  s = GetMatmulCacheStats();
  EXPECT_EQ(s.size, 2);
  EXPECT_EQ(s.misses, 3);
  product(10);  // still cached
  EXPECT_EQ(GetMatmulCacheStats().misses, 3);
  product(11);  // evicted: created again, same answer
  EXPECT_EQ(GetMatmulCacheStats().misses, 4);
  // The same shape in another layout or with accumulation is another primitive.
  const at::Tensor a = at::randn({16, 10}).t(), b = at::randn({16, 8}), out = at::zeros({10, 8});
  MatmulOut(out, a, b, true);
  EXPECT_EQ(GetMatmulCacheStats().misses, 5);
  EXPECT_LE(RelErr(out, at::mm(a.to(at::kDouble), b.to(at::kDouble))), Tolerance(at::kFloat));
  // Another intra-op thread count: another primitive (oneDNN splits the work for it).
  product(10);  // evicted by the last one: created again
  EXPECT_EQ(GetMatmulCacheStats().misses, 6);
  const int threads = at::get_num_threads();
  at::set_num_threads(threads == 1 ? 2 : 1);
  product(10);
  EXPECT_EQ(GetMatmulCacheStats().misses, 7);
  at::set_num_threads(threads);
  product(10);  // both thread counts' primitives are kept
  EXPECT_EQ(GetMatmulCacheStats().misses, 7);
  // Capacity 0: nothing is kept, every product still computed.
  SetMatmulCacheCapacity(0);
  product(10), product(10);
  EXPECT_EQ(GetMatmulCacheStats().size, 0);
  EXPECT_EQ(GetMatmulCacheStats().misses, 2);
  SetMatmulCacheCapacity(2048);
}

TEST(MatmulFallback, OtherDtypesAndLayoutsGoThroughLibTorch) {
  SetMatmulCacheCapacity(2048);
  at::manual_seed(4);
  // fp64, a layout with gaps in both dimensions, an output with a column stride: all computed
  // by LibTorch (no primitive created) and right.
  const at::Tensor a64 = at::randn({9, 7}, at::kDouble), b64 = at::randn({7, 5}, at::kDouble);
  const at::Tensor o64 = at::empty({9, 5}, at::kDouble);
  MatmulOut(o64, a64, b64);
  EXPECT_LE(RelErr(o64, at::mm(a64, b64)), 1e-12);
  const at::Tensor gaps = at::randn({18, 14}).slice(0, 0, 18, 2).slice(1, 0, 14, 2);  // strides {28, 2}
  const at::Tensor b = at::randn({7, 5}), out = at::empty({9, 5});
  MatmulOut(out, gaps, b);
  EXPECT_LE(RelErr(out, at::mm(gaps.to(at::kDouble), b.to(at::kDouble))), Tolerance(at::kFloat));
  const at::Tensor strided_out = at::zeros({9, 10}).slice(1, 0, 10, 2);  // column stride 2
  MatmulOut(strided_out, gaps.contiguous(), b, true);
  EXPECT_LE(RelErr(strided_out, at::mm(gaps.to(at::kDouble), b.to(at::kDouble))), Tolerance(at::kFloat));
  EXPECT_EQ(GetMatmulCacheStats().misses, 0);
  // Mismatched shapes: LibTorch's own error.
  const at::Tensor bad = at::empty({9, 5});
  EXPECT_THROW(MatmulOut(bad, at::randn({9, 6}), at::randn({7, 5})), c10::Error);
}

// out = a (or b, or a view into either): the product of the operands as they were.
TEST(MatmulAliasing, OutputSharingAnOperandGetsTheProductOfTheOldValues) {
  at::manual_seed(6);
  for (bool accumulate : {false, true}) {
    at::Tensor a = at::randn({32, 32}), b = at::randn({32, 32});
    const at::Tensor want = at::mm(a.to(at::kDouble), b.to(at::kDouble)) + (accumulate ? a.to(at::kDouble) : 0 * a.to(at::kDouble));
    MatmulOut(a, a, b, accumulate);
    EXPECT_LE(RelErr(a, want), 1e-5) << "out = a" << (accumulate ? ", accumulate" : "");
    at::Tensor buf = at::randn({40, 32}), c = at::randn({32, 32});
    const at::Tensor bv = buf.narrow(0, 8, 32);  // b, partly overlapped by out
    const at::Tensor want2 = at::mm(c.to(at::kDouble), bv.to(at::kDouble));
    MatmulOut(buf.narrow(0, 0, 32), c, bv);
    EXPECT_LE(RelErr(buf.narrow(0, 0, 32), want2), 1e-5) << "out overlaps b";
  }
}

TEST(MatmulThreads, ConcurrentCallersGetTheirOwnAnswers) {
  SetMatmulCacheCapacity(2048);
  at::manual_seed(5);
  std::vector<at::Tensor> as, bs, outs;
  for (int t = 0; t < 4; ++t) {
    as.push_back(at::randn({100 + 7 * t, 64}));
    bs.push_back(at::randn({64, 48 + t}));
    outs.push_back(at::empty({100 + 7 * t, 48 + t}));
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 20; ++rep) MatmulOut(outs[t], as[t], bs[t], /*accumulate=*/rep > 0);
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) {
    EXPECT_LE(RelErr(outs[t], 20 * at::mm(as[t].to(at::kDouble), bs[t].to(at::kDouble))), 1e-5) << "thread " << t;
  }
}

// Inside a parallel region (one task per thread, as the grouped experts run whole experts
// side by side) each product runs on its thread on a primitive planned for one thread: the
// right answers, bit for bit those of a one-thread run, which then creates no primitive.
// Each task's first product too (on a thread's first call LibTorch resets its OpenMP count).
TEST(MatmulThreads, ProductsInAParallelRegionRunOnOneThreadEach) {
  const int threads = at::get_num_threads();
  SetMatmulCacheCapacity(2048);
  at::manual_seed(6);
  std::vector<at::Tensor> as, bs;
  for (int t = 0; t < 6; ++t) {
    as.push_back(at::randn({90 + 11 * t, 40}).to(t % 2 == 0 ? at::kFloat : at::kBFloat16));
    bs.push_back(at::randn({40, 30 + t}).to(as.back().scalar_type()));
  }
  auto all = [&] {
    std::vector<at::Tensor> outs(6);
    at::parallel_for(0, 6, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        outs[t] = at::empty({as[t].size(0), bs[t].size(1)}, as[t].options());
        MatmulOut(outs[t], as[t], bs[t]);
      }
    });
    return outs;
  };
  at::set_num_threads(3);
  const std::vector<at::Tensor> side = all();
  const int64_t made = GetMatmulCacheStats().misses;
  at::set_num_threads(1);
  const std::vector<at::Tensor> one = all();
  at::set_num_threads(threads);
  EXPECT_EQ(GetMatmulCacheStats().misses, made);
  for (int t = 0; t < 6; ++t) {
    EXPECT_TRUE(at::equal(side[t], one[t])) << t;
    EXPECT_LE(RelErr(side[t], at::mm(as[t].to(at::kDouble), bs[t].to(at::kDouble))), Tolerance(as[t].scalar_type())) << t;
  }
}

}  // namespace
}  // namespace switchyard::common
