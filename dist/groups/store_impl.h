// Store's c10d side, and helpers shared by this package's c10d code. Only dist/groups
// includes this.
#ifndef DIST_GROUPS_STORE_IMPL_H_
#define DIST_GROUPS_STORE_IMPL_H_

#include <exception>
#include <string>

#include <torch/csrc/distributed/c10d/Store.hpp>

#include "dist/groups/store.h"

namespace switchyard::groups {

// c10d's exception messages carry a C++ stack trace after the first line; keep the first.
inline std::string FirstLine(const std::exception& e) {
  std::string w = e.what();
  const size_t nl = w.find('\n');
  return nl == std::string::npos ? w : w.substr(0, nl);
}

struct Store::Impl {
  c10::intrusive_ptr<c10d::Store> store;
};

}  // namespace switchyard::groups

#endif  // DIST_GROUPS_STORE_IMPL_H_
