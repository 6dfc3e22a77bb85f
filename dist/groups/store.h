// A key/value store for rendezvous: c10d's TCPStore across processes and machines, or an
// in-memory store for ranks that are threads of one process. Hides c10d from callers.
//
//   absl::StatusOr<std::shared_ptr<Store>> s = Store::ConnectTcp(
//       {.host = "127.0.0.1", .port = 0, .is_server = true, .timeout = std::chrono::seconds(30)});
//   (*s)->Set("ready", "1");
#ifndef DIST_GROUPS_STORE_H_
#define DIST_GROUPS_STORE_H_

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace switchyard::groups {

struct TcpStoreOptions {
  std::string host = "127.0.0.1";
  int port = 29500;        // 0 with is_server: any free port (see Store::port())
  bool is_server = false;  // this process listens; the others connect
  std::chrono::milliseconds timeout = std::chrono::seconds(300);  // connect and Get
};

class Store {
 public:
  // Listens (is_server) or connects, retrying until `timeout`. A busy port or an unreachable
  // server is an error naming host and port.
  static absl::StatusOr<std::shared_ptr<Store>> ConnectTcp(const TcpStoreOptions& options);
  // A store shared by everything holding the same pointer (threads of one process).
  static std::shared_ptr<Store> InMemory(std::chrono::milliseconds timeout = std::chrono::seconds(60));

  // A view of this store whose keys all start with `prefix` (e.g. one per restart, so a new
  // generation of workers never reads the keys of the one before).
  std::shared_ptr<Store> WithPrefix(const std::string& prefix) const;

  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // The TCP port (the one picked when 0 was asked); 0 for in-memory stores.
  int port() const { return port_; }

  absl::Status Set(const std::string& key, const std::string& value);
  // Waits up to the store's timeout for `key` to exist.
  absl::StatusOr<std::string> Get(const std::string& key);
  // Whether `key` exists now (never waits).
  absl::StatusOr<bool> Check(const std::string& key);
  // Atomically adds `delta` to an integer key and returns the new value.
  absl::StatusOr<int64_t> Add(const std::string& key, int64_t delta);

  // The underlying c10d store, for this package's process groups only.
  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  Store(std::unique_ptr<Impl> impl, int port, std::string where);
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
  std::string where_;  // "127.0.0.1:29500" or "in-memory", for messages
};

}  // namespace switchyard::groups

#endif  // DIST_GROUPS_STORE_H_
