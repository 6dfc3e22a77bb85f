// Store's c10d side. Only dist/groups includes this.
#ifndef DIST_GROUPS_STORE_IMPL_H_
#define DIST_GROUPS_STORE_IMPL_H_

#include <torch/csrc/distributed/c10d/Store.hpp>

#include "dist/groups/store.h"

namespace switchyard::groups {

struct Store::Impl {
  c10::intrusive_ptr<c10d::Store> store;
};

}  // namespace switchyard::groups

#endif  // DIST_GROUPS_STORE_IMPL_H_
