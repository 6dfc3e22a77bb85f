#include "common/heap.h"

#include <malloc.h>

namespace switchyard::common {

bool RetainFreedMemory() {
  // No mmap'd chunks (every block from the heap), and never trim the heap's top.
  const bool mmap_off = mallopt(M_MMAP_MAX, 0) == 1;
  const bool no_trim = mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 && mallopt(M_TOP_PAD, 64 << 20) == 1;
  return mmap_off && no_trim;
}

}  // namespace switchyard::common
