// Status propagation macros (Debian's Abseil 20220623 predates absl's own).
//
//   absl::StatusOr<int> ParsePort(absl::string_view s);
//   absl::Status Run() {
//     SY_ASSIGN_OR_RETURN(int port, ParsePort("29500"));
//     SY_RETURN_IF_ERROR(Listen(port));
//     return absl::OkStatus();
//   }
#ifndef COMMON_STATUS_MACROS_H_
#define COMMON_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define SY_STATUS_CONCAT_INNER_(a, b) a##b
#define SY_STATUS_CONCAT_(a, b) SY_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function when `expr` (an absl::Status) is not OK.
#define SY_RETURN_IF_ERROR(expr)                                       \
  do {                                                                 \
    ::absl::Status sy_status_ = (expr);                                \
    if (!sy_status_.ok()) return sy_status_;                           \
  } while (false)

// `lhs` = the value of `rexpr` (an absl::StatusOr<T>), or returns its status.
#define SY_ASSIGN_OR_RETURN(lhs, rexpr) \
  SY_ASSIGN_OR_RETURN_IMPL_(SY_STATUS_CONCAT_(sy_statusor_, __LINE__), lhs, rexpr)

#define SY_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                              \
  if (!statusor.ok()) return statusor.status();         \
  lhs = std::move(statusor).value()

#endif  // COMMON_STATUS_MACROS_H_
