#include "common/heap.h"

#include <malloc.h>

#include <cstdlib>
#include <cstring>

#include "gtest/gtest.h"

namespace switchyard::common {
namespace {

// After the call a large block no longer comes from mmap: mallinfo2 counts it in the heap
// (arena), not in mmap'd memory, and freeing it keeps the memory in the process.
TEST(HeapTest, LargeBlocksStayInTheHeap) {
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "under a sanitizer malloc is the sanitizer's allocator, which mallopt and mallinfo2 do not see";
#endif
  ASSERT_TRUE(RetainFreedMemory());
  const size_t bytes = 256u << 20;
  const struct mallinfo2 before = mallinfo2();
  char* p = static_cast<char*>(std::malloc(bytes));
  ASSERT_NE(p, nullptr);
  std::memset(p, 1, bytes);
  const struct mallinfo2 during = mallinfo2();
  EXPECT_EQ(during.hblkhd, before.hblkhd) << "the block was mmap'd";
  EXPECT_GE(during.arena, before.arena + bytes);
  std::free(p);
  const struct mallinfo2 after = mallinfo2();
  EXPECT_GE(after.arena, before.arena + bytes) << "the heap was trimmed back";
}

}  // namespace
}  // namespace switchyard::common
