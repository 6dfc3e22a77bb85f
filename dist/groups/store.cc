#include "dist/groups/store.h"

#include <exception>
#include <string>
#include <thread>
#include <vector>

#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "absl/strings/match.h"
#include "dist/groups/store_impl.h"

namespace switchyard::groups {
namespace {

std::vector<uint8_t> Bytes(const std::string& s) { return {s.begin(), s.end()}; }

}  // namespace

Store::Store(std::unique_ptr<Impl> impl, int port, std::string where)
    : impl_(std::move(impl)), port_(port), where_(std::move(where)) {}
Store::~Store() = default;

absl::StatusOr<std::shared_ptr<Store>> Store::ConnectTcp(const TcpStoreOptions& o) {
  if (o.port < 0 || o.port > 65535) {
    return absl::InvalidArgumentError(absl::StrFormat("store port %d is not a TCP port", o.port));
  }
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<uint16_t>(o.port);
  opts.isServer = o.is_server;
  opts.waitWorkers = false;
  opts.timeout = o.timeout;
  const std::string where = absl::StrFormat("%s:%d", o.host, o.port);
  try {
    auto store = c10::make_intrusive<c10d::TCPStore>(o.host, opts);
    auto impl = std::make_unique<Impl>();
    int port = store->getPort();
    impl->store = std::move(store);
    return std::shared_ptr<Store>(
        new Store(std::move(impl), port, absl::StrFormat("%s:%d", o.host, port)));
  } catch (const std::exception& e) {
    std::string msg = FirstLine(e);
    if (o.is_server && (absl::StrContains(msg, "in use") || absl::StrContains(msg, "EADDRINUSE"))) {
      return absl::UnavailableError(absl::StrFormat(
          "cannot listen on %s: the port is already in use (another job? pick another "
          "launch.master_port, or 0 for any free port on one node)", where));
    }
    return absl::UnavailableError(absl::StrFormat(
        "cannot %s the rendezvous store at %s within %d s: %s",
        o.is_server ? "start" : "reach", where,
        std::chrono::duration_cast<std::chrono::seconds>(o.timeout).count(), msg));
  }
}

std::shared_ptr<Store> Store::InMemory(std::chrono::milliseconds timeout) {
  auto impl = std::make_unique<Impl>();
  impl->store = c10::make_intrusive<c10d::HashStore>();
  impl->store->setTimeout(timeout);
  return std::shared_ptr<Store>(new Store(std::move(impl), 0, "in-memory store"));
}

std::shared_ptr<Store> Store::WithPrefix(const std::string& prefix) const {
  auto impl = std::make_unique<Impl>();
  impl->store = c10::make_intrusive<c10d::PrefixStore>(prefix, impl_->store);
  return std::shared_ptr<Store>(new Store(std::move(impl), port_, where_ + " [" + prefix + "]"));
}

absl::Status Store::Set(const std::string& key, const std::string& value) {
  try {
    impl_->store->set(key, Bytes(value));
    return absl::OkStatus();
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrFormat("store %s: set \"%s\" failed: %s", where_, key, FirstLine(e)));
  }
}

absl::StatusOr<std::string> Store::Get(const std::string& key) {
  try {
    std::vector<uint8_t> v = impl_->store->get(key);
    return std::string(v.begin(), v.end());
  } catch (const std::exception& e) {
    return absl::DeadlineExceededError(
        absl::StrFormat("store %s: get \"%s\" failed: %s", where_, key, FirstLine(e)));
  }
}

absl::StatusOr<bool> Store::Check(const std::string& key) {
  try {
    return impl_->store->check({key});
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrFormat("store %s: check \"%s\" failed: %s", where_, key, FirstLine(e)));
  }
}

absl::StatusOr<int64_t> Store::Add(const std::string& key, int64_t delta) {
  try {
    return impl_->store->add(key, delta);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrFormat("store %s: add \"%s\" failed: %s", where_, key, FirstLine(e)));
  }
}

}  // namespace switchyard::groups
