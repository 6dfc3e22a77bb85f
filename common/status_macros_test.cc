#include "common/status_macros.h"

#include <memory>
#include <string>

#include "gtest/gtest.h"

namespace {

absl::StatusOr<int> Half(int x) {
  if (x % 2 != 0) return absl::InvalidArgumentError("odd: " + std::to_string(x));
  return x / 2;
}

absl::StatusOr<int> Quarter(int x) {
  SY_ASSIGN_OR_RETURN(int h, Half(x));
  SY_ASSIGN_OR_RETURN(int q, Half(h));
  return q;
}

absl::Status CheckQuarter(int x, int* out) {
  SY_ASSIGN_OR_RETURN(*out, Quarter(x));
  SY_RETURN_IF_ERROR(x > 100 ? absl::OutOfRangeError("too big") : absl::OkStatus());
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<int>> MakeOwned(int x) { return std::make_unique<int>(x); }

TEST(StatusMacros, PropagatesFirstError) {
  EXPECT_EQ(*Quarter(12), 3);
  absl::StatusOr<int> r = Quarter(6);  // 6 -> 3 is odd
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(), "odd: 3");
  int out = -1;
  EXPECT_TRUE(CheckQuarter(8, &out).ok());
  EXPECT_EQ(out, 2);
  EXPECT_EQ(CheckQuarter(104, &out).code(), absl::StatusCode::kOutOfRange);
}

TEST(StatusMacros, MovesOnlyTypes) {
  auto f = []() -> absl::Status {
    SY_ASSIGN_OR_RETURN(std::unique_ptr<int> p, MakeOwned(7));
    return *p == 7 ? absl::OkStatus() : absl::InternalError("wrong value");
  };
  EXPECT_TRUE(f().ok());
}

}  // namespace
