// A small HTTP/1.1 server on Boost.Asio + Boost.Beast for the gateway's OpenAI-compatible API:
// asynchronous (a few I/O threads serve every connection; no thread per connection), bounded
// (connections, header and body sizes, header/read/idle timeouts, bytes queued for a slow
// reader), plain text or TLS with the gateway's own certificate. It knows nothing of the API:
// each request goes to a handler with an HttpExchange through which the answer (one response,
// or a stream of Server-Sent Events) is sent, from any thread, when it is ready.
//
// A request whose answer is pending keeps reading the connection, so a client that hangs up is
// noticed at once and the exchange's on-gone callback runs (the handler cancels its work).
//
// Thread-safe: Start/Stop from any thread; HttpExchange's methods from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/rpc/transport_security.h"
#include "core/util/status.h"

namespace dsmoe::http {

struct HttpServerOptions {
  std::string address = "127.0.0.1:0";  // host:port; port 0 picks a free one
  // TLS with security's certificate and key unless it is insecure (client certificates are not
  // asked for: API keys say who calls).
  rpc::TransportSecurity security = rpc::TransportSecurity::Insecure();
  int num_threads = 2;  // I/O threads; handlers must not block them
  // Open connections at most; one more is answered 503 and closed (memory stays bounded).
  int max_connections = 2048;
  size_t max_header_bytes = 16 << 10;  // request line + headers; beyond: 431
  size_t max_body_bytes = 4 << 20;     // beyond: 413
  // A request must arrive whole (headers and body) within this of its first byte, or of the
  // connection opening: slow or stalled clients cannot hold a connection forever.
  std::chrono::milliseconds read_timeout{30000};
  // A kept-alive connection with no new request is closed after this.
  std::chrono::milliseconds idle_timeout{60000};
  // Bytes of an answer queued for a client that does not read them; beyond, the connection is
  // closed (and the request cancelled).
  size_t max_pending_write_bytes = 4 << 20;
};

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string target;  // the path (and query), as sent
  std::string content_type;
  std::string authorization;  // the Authorization header, "" if none
  std::string body;
};

struct HttpHeader {
  std::string name, value;
};

// The answer to one request. Exactly one of Respond or StartEvents...EndEvents; calls after the
// connection closed are ignored. Thread-safe; cheap (each call posts to the connection).
class HttpExchange {
 public:
  virtual ~HttpExchange() = default;
  virtual void Respond(int status, std::string content_type, std::string body,
                       std::vector<HttpHeader> headers = {}) = 0;
  // 200, Content-Type: text/event-stream, chunked; then each SendEvent writes
  // "data: <data>\n\n"; EndEvents ends the body (the connection may serve the next request).
  virtual void StartEvents() = 0;
  virtual void SendEvent(std::string data) = 0;
  virtual void EndEvents() = 0;
  // `on_gone` runs once (on an I/O thread, must not block) if the client hangs up, a write
  // fails or the server stops before the answer ended; at once if that happened already.
  virtual void OnGone(std::function<void()> on_gone) = 0;
};

using HttpHandler = std::function<void(HttpRequest, std::shared_ptr<HttpExchange>)>;

// Counters the server keeps (for tests and the start-up log; metrics come from the handler).
struct HttpServerStats {
  std::atomic<int64_t> connections_open{0};
  std::atomic<int64_t> connections_refused{0};
  std::atomic<int64_t> requests{0};
};

class HttpServer {
 public:
  // Binds, then serves on its own threads. Errors name the address or the certificate.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(HttpServerOptions options,
                                                           HttpHandler handler);
  ~HttpServer();  // Stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  int port() const { return port_; }
  std::string address() const;  // "host:port" as bound
  bool tls() const;
  const HttpServerStats& stats() const;

  // Stops accepting, closes every connection (their exchanges' on-gone callbacks run) and joins
  // the threads. Idempotent.
  void Stop();

 private:
  struct Impl;
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

}  // namespace dsmoe::http
