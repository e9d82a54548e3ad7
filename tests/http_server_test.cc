// The gateway's HTTP/1.1 server (gateway/http/http_server) with raw sockets: what it answers to
// bad input (malformed request, oversized body, header flood), slow and idle clients (timeouts),
// more connections than allowed, 1,000 idle connections at once, keep-alive and pipelining,
// Server-Sent Events in chunked encoding, and a client hanging up while its answer is made.
#include "gateway/http/http_server.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"

namespace dsmoe::http {
namespace {

using namespace std::chrono_literals;

int Connect(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

void Send(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return;
    off += n;
  }
}

// Reads until the peer closes, `until` appears, or `timeout` passes.
std::string Read(int fd, std::chrono::milliseconds timeout, const std::string& until = "") {
  std::string out;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return out;
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left.count())) <= 0) return out;
    char buf[4096];
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) return out + "<closed>";
    out.append(buf, n);
    if (!until.empty() && out.find(until) != std::string::npos) return out;
  }
}

std::string Request(const std::string& method, const std::string& target, const std::string& body,
                    const std::string& extra = "") {
  return absl::StrCat(method, " ", target, " HTTP/1.1\r\nHost: t\r\n", extra,
                      "Content-Length: ", body.size(), "\r\n\r\n", body);
}

struct Fixture {
  std::unique_ptr<HttpServer> server;
  std::atomic<int> handled{0};
  std::atomic<int> gone{0};
  std::shared_ptr<HttpExchange> held;  // the /hold request's exchange (answered later or never)
  std::mutex mu;

  explicit Fixture(HttpServerOptions o = {}) {
    auto s = HttpServer::Start(o, [this](HttpRequest r, std::shared_ptr<HttpExchange> e) {
      ++handled;
      if (r.target == "/hold") {
        e->OnGone([this] { ++gone; });
        std::lock_guard<std::mutex> lock(mu);
        held = e;
        return;
      }
      if (r.target == "/events") {
        e->StartEvents();
        e->SendEvent("one");
        e->SendEvent("{\"two\": 2}");
        e->EndEvents();
        return;
      }
      e->Respond(200, "text/plain", absl::StrCat(r.method, " ", r.target, " ", r.body.size()));
    });
    EXPECT_TRUE(s.ok()) << s.status();
    server = std::move(*s);
  }
};

bool WaitForOpen(Fixture& f, int64_t n) {
  for (int i = 0; i < 1000; ++i) {
    if (f.server->stats().connections_open.load() == n) return true;
    std::this_thread::sleep_for(5ms);
  }
  return false;
}

TEST(HttpServer, AnswersAndKeepsTheConnectionAlive) {
  Fixture f;
  int fd = Connect(f.server->port());
  ASSERT_GE(fd, 0);
  // Two requests pipelined in one write, then a third: three answers in order on one connection.
  Send(fd, Request("POST", "/a", "xyz") + Request("GET", "/b", ""));
  std::string got = Read(fd, 5s, "GET /b 0");
  EXPECT_NE(got.find("HTTP/1.1 200 OK"), std::string::npos) << got;
  EXPECT_LT(got.find("POST /a 3"), got.find("GET /b 0")) << got;
  Send(fd, Request("GET", "/c", ""));
  EXPECT_NE(Read(fd, 5s, "GET /c 0").find("GET /c 0"), std::string::npos);
  close(fd);
  EXPECT_EQ(f.handled.load(), 3);
}

TEST(HttpServer, ServerSentEventsAreChunked) {
  Fixture f;
  int fd = Connect(f.server->port());
  Send(fd, Request("GET", "/events", ""));
  std::string got = Read(fd, 5s, "0\r\n\r\n");
  close(fd);
  // "data: one\n\n" is 11 bytes (0xb), "data: {\"two\": 2}\n\n" 18 (0x12).
  EXPECT_NE(got.find("Content-Type: text/event-stream\r\n"), std::string::npos) << got;
  EXPECT_NE(got.find("Transfer-Encoding: chunked\r\n"), std::string::npos) << got;
  const std::string body = got.substr(got.find("\r\n\r\n") + 4);
  EXPECT_EQ(body, "b\r\ndata: one\n\n\r\n12\r\ndata: {\"two\": 2}\n\n\r\n0\r\n\r\n");
}

TEST(HttpServer, MalformedRequestIs400AndCloses) {
  Fixture f;
  int fd = Connect(f.server->port());
  Send(fd, "NOT A REQUEST\r\n\r\n");
  std::string got = Read(fd, 5s);
  close(fd);
  EXPECT_NE(got.find("HTTP/1.1 400"), std::string::npos) << got;
  EXPECT_NE(got.find("\"error\""), std::string::npos) << got;
  EXPECT_NE(got.find("<closed>"), std::string::npos) << got;
  EXPECT_EQ(f.handled.load(), 0);
}

TEST(HttpServer, OversizedBodyIs413) {
  HttpServerOptions o;
  o.max_body_bytes = 1000;
  Fixture f(o);
  int fd = Connect(f.server->port());
  Send(fd, Request("POST", "/x", std::string(5000, 'a')));
  std::string got = Read(fd, 5s);
  close(fd);
  EXPECT_NE(got.find("HTTP/1.1 413"), std::string::npos) << got;
  EXPECT_NE(got.find("1000 bytes"), std::string::npos) << got;
  EXPECT_EQ(f.handled.load(), 0);
}

TEST(HttpServer, HeaderFloodIs431) {
  HttpServerOptions o;
  o.max_header_bytes = 4096;
  Fixture f(o);
  int fd = Connect(f.server->port());
  std::string flood;
  for (int i = 0; i < 500; ++i)
    flood += absl::StrCat("X-Flood-", i, ": ", std::string(40, 'v'), "\r\n");
  Send(fd, Request("GET", "/x", "", flood));
  std::string got = Read(fd, 5s);
  close(fd);
  EXPECT_NE(got.find("HTTP/1.1 431"), std::string::npos) << got.substr(0, 200);
  EXPECT_EQ(f.handled.load(), 0);
}

TEST(HttpServer, SlowAndIdleClientsAreClosed) {
  HttpServerOptions o;
  o.read_timeout = 300ms;
  o.idle_timeout = 300ms;
  Fixture f(o);
  // Half a request line, then nothing: closed after the read timeout.
  int slow = Connect(f.server->port());
  Send(slow, "GET /x HTTP/1.1\r\nHos");
  const auto start = std::chrono::steady_clock::now();
  std::string got = Read(slow, 5s);
  const auto waited = std::chrono::steady_clock::now() - start;
  close(slow);
  EXPECT_NE(got.find("<closed>"), std::string::npos);
  EXPECT_GE(waited, 250ms);
  EXPECT_LT(waited, 3s);
  // A kept-alive connection with nothing more to say: closed after the idle timeout.
  int idle = Connect(f.server->port());
  Send(idle, Request("GET", "/x", ""));
  got = Read(idle, 5s);
  close(idle);
  EXPECT_NE(got.find("GET /x 0"), std::string::npos);
  EXPECT_NE(got.find("<closed>"), std::string::npos);
}

TEST(HttpServer, ConnectionsBeyondTheLimitGet503AndTheServerStaysHealthy) {
  HttpServerOptions o;
  o.max_connections = 4;
  Fixture f(o);
  std::vector<int> open;
  for (int i = 0; i < 4; ++i) open.push_back(Connect(f.server->port()));
  ASSERT_TRUE(WaitForOpen(f, 4));
  int extra = Connect(f.server->port());
  std::string got = Read(extra, 5s);
  close(extra);
  EXPECT_NE(got.find("HTTP/1.1 503"), std::string::npos) << got;
  EXPECT_EQ(f.server->stats().connections_refused.load(), 1);
  for (int fd : open) close(fd);
  // Room again.
  ASSERT_TRUE(WaitForOpen(f, 0));
  int fd = Connect(f.server->port());
  Send(fd, Request("GET", "/after", ""));
  EXPECT_NE(Read(fd, 5s, "GET /after 0").find("GET /after 0"), std::string::npos);
  close(fd);
}

TEST(HttpServer, AThousandIdleConnections) {
  Fixture f;
  std::vector<int> open;
  for (int i = 0; i < 1000; ++i) {
    int fd = Connect(f.server->port());
    ASSERT_GE(fd, 0) << i;
    open.push_back(fd);
  }
  ASSERT_TRUE(WaitForOpen(f, 1000));
  // Still answers, with its two I/O threads.
  int fd = Connect(f.server->port());
  Send(fd, Request("GET", "/busy", ""));
  EXPECT_NE(Read(fd, 5s, "GET /busy 0").find("GET /busy 0"), std::string::npos);
  close(fd);
  for (int c : open) close(c);
  EXPECT_TRUE(WaitForOpen(f, 0));
}

TEST(HttpServer, AHangUpIsHeardWhileTheAnswerIsMade) {
  Fixture f;
  int fd = Connect(f.server->port());
  Send(fd, Request("POST", "/hold", "{}"));
  for (int i = 0; i < 500 && f.handled.load() == 0; ++i) std::this_thread::sleep_for(2ms);
  ASSERT_EQ(f.handled.load(), 1);
  EXPECT_EQ(f.gone.load(), 0);
  close(fd);
  for (int i = 0; i < 500 && f.gone.load() == 0; ++i) std::this_thread::sleep_for(2ms);
  EXPECT_EQ(f.gone.load(), 1);
  // Answering a gone client is harmless.
  std::lock_guard<std::mutex> lock(f.mu);
  f.held->Respond(200, "text/plain", "late");
}

TEST(HttpServer, StopEndsAnswersInProgress) {
  Fixture f;
  int fd = Connect(f.server->port());
  Send(fd, Request("POST", "/hold", "{}"));
  for (int i = 0; i < 500 && f.handled.load() == 0; ++i) std::this_thread::sleep_for(2ms);
  f.server->Stop();
  EXPECT_EQ(f.gone.load(), 1);
  close(fd);
  std::lock_guard<std::mutex> lock(f.mu);
  f.held->Respond(200, "text/plain", "after stop");  // ignored, no crash
}

}  // namespace
}  // namespace dsmoe::http
