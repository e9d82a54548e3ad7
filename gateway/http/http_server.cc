#include "gateway/http/http_server.h"

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <deque>
#include <optional>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/rpc/address.h"

namespace dsmoe::http {

namespace {

namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using ErrorCode = boost::system::error_code;

// What sessions and exchanges share with the server; it outlives the server while any of them
// exists (a gRPC callback may hold an exchange after the server stopped).
struct Shared {
  HttpServerOptions options;
  HttpHandler handler;
  HttpServerStats stats;
  absl::Mutex mu;
  // False once the I/O threads stopped: nothing is posted to the io_context any more.
  bool alive ABSL_GUARDED_BY(mu) = true;
};

std::string StatusLine(int status) {
  const auto reason = bhttp::obsolete_reason(bhttp::int_to_status(static_cast<unsigned>(status)));
  return absl::StrCat("HTTP/1.1 ", status, " ", std::string(reason.data(), reason.size()), "\r\n");
}

// A session's side the exchange talks to, independent of the stream type.
class SessionBase {
 public:
  virtual ~SessionBase() = default;
  virtual void Post(std::function<void()> f) = 0;
  // On the strand. `id` names the exchange: calls of an earlier one are ignored.
  virtual void Queue(uint64_t id, std::string bytes, bool answer_done) = 0;
  virtual void SetOnGone(uint64_t id, std::function<void()> on_gone) = 0;
  virtual void StartEventsOn(uint64_t id) = 0;
  virtual void Close() = 0;
};

class Exchange final : public HttpExchange {
 public:
  Exchange(std::shared_ptr<Shared> shared, std::weak_ptr<SessionBase> session, uint64_t id,
           bool keep_alive)
      : shared_(std::move(shared)),
        session_(std::move(session)),
        id_(id),
        keep_alive_(keep_alive) {}

  void Respond(int status, std::string content_type, std::string body,
               std::vector<HttpHeader> headers) override {
    std::string out = StatusLine(status);
    absl::StrAppend(&out, "Content-Type: ", content_type, "\r\nContent-Length: ", body.size(),
                    "\r\n");
    for (const HttpHeader& h : headers) absl::StrAppend(&out, h.name, ": ", h.value, "\r\n");
    if (!keep_alive_) out += "Connection: close\r\n";
    out += "\r\n";
    out += body;
    Run([id = id_, out = std::move(out)](SessionBase& s) mutable {
      s.Queue(id, std::move(out), /*answer_done=*/true);
    });
  }
  void StartEvents() override {
    std::string out = StatusLine(200);
    out +=
        "Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        "Transfer-Encoding: chunked\r\n";
    if (!keep_alive_) out += "Connection: close\r\n";
    out += "\r\n";
    Run([id = id_, out = std::move(out)](SessionBase& s) mutable {
      s.StartEventsOn(id);
      s.Queue(id, std::move(out), false);
    });
  }
  void SendEvent(std::string data) override {
    std::string event = absl::StrCat("data: ", data, "\n\n");
    std::string chunk = absl::StrFormat("%x\r\n", event.size());
    chunk += event;
    chunk += "\r\n";
    Run([id = id_, chunk = std::move(chunk)](SessionBase& s) mutable {
      s.Queue(id, std::move(chunk), false);
    });
  }
  void EndEvents() override {
    Run([id = id_](SessionBase& s) { s.Queue(id, "0\r\n\r\n", true); });
  }
  void OnGone(std::function<void()> on_gone) override {
    bool posted =
        Run([id = id_, on_gone](SessionBase& s) mutable { s.SetOnGone(id, std::move(on_gone)); });
    if (!posted) on_gone();  // the connection or the server is gone already
  }

 private:
  // Posts f to the session's strand; false if the session or the server is gone.
  bool Run(std::function<void(SessionBase&)> f) {
    absl::MutexLock lock(&shared_->mu);
    if (!shared_->alive) return false;
    std::shared_ptr<SessionBase> s = session_.lock();
    if (s == nullptr) return false;
    s->Post([s, f = std::move(f)] { f(*s); });
    return true;
  }

  std::shared_ptr<Shared> shared_;
  std::weak_ptr<SessionBase> session_;
  const uint64_t id_;
  const bool keep_alive_;
};

// One connection. Everything runs on its strand. Alive while an operation of it is pending;
// while an answer is pending a read is always outstanding (it notices a hang-up at once).
template <class Stream>
class Session final : public SessionBase, public std::enable_shared_from_this<Session<Stream>> {
 public:
  Session(std::shared_ptr<Shared> shared, Stream stream)
      : shared_(std::move(shared)), stream_(std::move(stream)), timer_(stream_.get_executor()) {
    shared_->stats.connections_open.fetch_add(1);
  }
  ~Session() override { shared_->stats.connections_open.fetch_sub(1); }

  void Post(std::function<void()> f) override { net::post(stream_.get_executor(), std::move(f)); }

  void Start() {
    Arm(shared_->options.read_timeout);
    if constexpr (kTls) {
      stream_.async_handshake(net::ssl::stream_base::server,
                              [self = this->shared_from_this()](ErrorCode ec) {
                                if (ec) return self->Close();
                                self->ReadRequest();
                              });
    } else {
      ReadRequest();
    }
  }

  void Close() override {
    if (closed_) return;
    closed_ = true;
    timer_.cancel();
    Gone();
    ErrorCode ec;
    beast::get_lowest_layer(stream_).socket().shutdown(tcp::socket::shutdown_both, ec);
    beast::get_lowest_layer(stream_).socket().close(ec);
  }

  void StartEventsOn(uint64_t id) override {
    if (id == exchange_id_) events_ = true;
  }

  void SetOnGone(uint64_t id, std::function<void()> on_gone) override {
    if (id != exchange_id_ || !answering_) return;  // answered already
    if (gone_) return on_gone();
    on_gone_ = std::move(on_gone);
  }

  void Queue(uint64_t id, std::string bytes, bool answer_done) override {
    if (id != exchange_id_ || !answering_ || answer_done_ || closed_) return;
    pending_bytes_ += bytes.size();
    writes_.push_back(std::move(bytes));
    if (answer_done) answer_done_ = true;
    if (pending_bytes_ > shared_->options.max_pending_write_bytes) return Close();  // not read
    Write();
  }

 private:
  static constexpr bool kTls = !std::is_same_v<Stream, beast::tcp_stream>;

  // The connection closes when the timer fires (no operation of ours has a timeout of its own).
  void Arm(std::chrono::milliseconds timeout) {
    if (closed_) return;  // a completion that raced with Close must not keep the session alive
    timer_.expires_after(timeout);
    timer_.async_wait([self = this->shared_from_this()](ErrorCode ec) {
      if (!ec) self->Close();
    });
  }

  void ReadRequest() {
    parser_.emplace();
    parser_->header_limit(static_cast<uint32_t>(shared_->options.max_header_bytes));
    parser_->body_limit(shared_->options.max_body_bytes);
    bhttp::async_read_header(
        stream_, buffer_, *parser_,
        [self = this->shared_from_this()](ErrorCode ec, size_t) { self->OnHeader(ec); });
  }

  void OnHeader(ErrorCode ec) {
    if (ec) return OnReadError(ec);
    auto& req = parser_->get();
    const auto expect = req[bhttp::field::expect];
    if (absl::EqualsIgnoreCase(absl::string_view(expect.data(), expect.size()), "100-continue")) {
      // curl waits for this before it sends a body over 1 KiB.
      std::string cont = "HTTP/1.1 100 Continue\r\n\r\n";
      net::async_write(stream_, net::buffer(*(continue_ = std::make_unique<std::string>(cont))),
                       [self = this->shared_from_this()](ErrorCode write_ec, size_t) {
                         if (write_ec) return self->Close();
                         self->ReadBody();
                       });
      return;
    }
    ReadBody();
  }

  void ReadBody() {
    bhttp::async_read(
        stream_, buffer_, *parser_,
        [self = this->shared_from_this()](ErrorCode ec, size_t) { self->OnRequest(ec); });
  }

  void OnReadError(ErrorCode ec) {
    if (ec == bhttp::error::body_limit) {
      return Reject(413, absl::StrCat("the request body exceeds the limit of ",
                                      shared_->options.max_body_bytes, " bytes"));
    }
    if (ec == bhttp::error::header_limit) {
      return Reject(431, absl::StrCat("the request headers exceed the limit of ",
                                      shared_->options.max_header_bytes, " bytes"));
    }
    if (ec.category() == bhttp::make_error_code(bhttp::error::end_of_stream).category() &&
        ec != bhttp::error::end_of_stream && ec != bhttp::error::partial_message) {
      return Reject(400, absl::StrCat("malformed HTTP request: ", ec.message()));
    }
    Close();  // the client hung up, or the timer closed the socket
  }

  // A request the parser refused: one error, then the connection closes.
  void Reject(int status, const std::string& message) {
    ++exchange_id_;
    answering_ = true;
    answer_done_ = false;
    keep_alive_ = false;
    // The messages are ours (no character JSON would escape).
    std::string body =
        absl::StrCat(R"({"error":{"message":")", message,
                     R"(","type":"invalid_request_error","param":null,)", R"("code":null}})");
    Exchange(shared_, this->weak_from_this(), exchange_id_, false)
        .Respond(status, "application/json", std::move(body), {});
  }

  void OnRequest(ErrorCode ec) {
    if (ec) return OnReadError(ec);
    if (closed_) return;
    timer_.cancel();  // no deadline while the answer is made; a hang-up is noticed
    shared_->stats.requests.fetch_add(1);
    auto& req = parser_->get();
    HttpRequest r;
    r.method = std::string(req.method_string());
    r.target = std::string(req.target());
    r.content_type = std::string(req[bhttp::field::content_type]);
    r.authorization = std::string(req[bhttp::field::authorization]);
    r.body = std::move(req.body());
    keep_alive_ = req.keep_alive();
    parser_.reset();
    ++exchange_id_;
    answering_ = true;
    answer_done_ = false;
    events_ = false;
    on_gone_ = nullptr;
    auto exchange =
        std::make_shared<Exchange>(shared_, this->weak_from_this(), exchange_id_, keep_alive_);
    Watch();
    shared_->handler(std::move(r), std::move(exchange));
  }

  // Reads what the client sends while its answer is made (a hang-up ends the request at once)
  // or while it is idle (the next request's first bytes).
  void Watch() {
    if (watching_ || closed_) return;
    // Bytes of a pipelined request are waiting already: they are read once this answer is out
    // (a hang-up is then noticed at the next write).
    if (answering_ && buffer_.size() > 0) return;
    watching_ = true;
    stream_.async_read_some(
        buffer_.prepare(4096),
        [self = this->shared_from_this()](ErrorCode ec, size_t n) { self->OnWatch(ec, n); });
  }

  void OnWatch(ErrorCode ec, size_t n) {
    watching_ = false;
    if (ec || closed_) return Close();
    buffer_.commit(n);
    if (answering_) return Watch();
    Arm(shared_->options.read_timeout);  // a request began: it must arrive whole in time
    ReadRequest();
  }

  void Gone() {
    if (gone_) return;
    gone_ = true;
    if (answering_ && on_gone_ != nullptr) {
      auto f = std::move(on_gone_);
      on_gone_ = nullptr;
      f();
    }
  }

  void Write() {
    if (writing_ || writes_.empty() || closed_) return;
    writing_ = true;
    net::async_write(
        stream_, net::buffer(writes_.front()),
        [self = this->shared_from_this()](ErrorCode ec, size_t) { self->OnWritten(ec); });
  }

  void OnWritten(ErrorCode ec) {
    writing_ = false;
    if (ec || closed_) return Close();
    pending_bytes_ -= writes_.front().size();
    writes_.pop_front();
    if (!writes_.empty()) return Write();
    if (!answer_done_) return;
    // The answer went out whole.
    answering_ = false;
    on_gone_ = nullptr;
    if (!keep_alive_) {
      closed_ = true;  // no on-gone: the answer was complete
      timer_.cancel();
      ErrorCode ignored;
      beast::get_lowest_layer(stream_).socket().shutdown(tcp::socket::shutdown_send, ignored);
      beast::get_lowest_layer(stream_).socket().close(ignored);
      return;
    }
    Arm(shared_->options.idle_timeout);
    if (watching_) return;  // its bytes start the next request
    if (buffer_.size() > 0) {
      Arm(shared_->options.read_timeout);
      return ReadRequest();
    }
    Watch();
  }

  std::shared_ptr<Shared> shared_;
  Stream stream_;
  net::steady_timer timer_;
  beast::flat_buffer buffer_;
  std::optional<bhttp::request_parser<bhttp::string_body>> parser_;
  std::unique_ptr<std::string> continue_;
  uint64_t exchange_id_ = 0;
  bool answering_ = false;    // a request was read and its answer has not gone out whole
  bool answer_done_ = false;  // the answer's last bytes are queued
  bool events_ = false;
  bool keep_alive_ = true;
  bool watching_ = false;
  bool writing_ = false;
  bool gone_ = false;
  bool closed_ = false;
  std::function<void()> on_gone_;
  std::deque<std::string> writes_;
  size_t pending_bytes_ = 0;
};

using PlainSession = Session<beast::tcp_stream>;
using TlsSession = Session<beast::ssl_stream<beast::tcp_stream>>;

}  // namespace

struct HttpServer::Impl {
  std::shared_ptr<Shared> shared = std::make_shared<Shared>();
  std::optional<net::ssl::context> ssl;
  // Declared after `shared`: destroyed first (its queued handlers hold sessions).
  net::io_context ioc;
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work;
  std::optional<tcp::acceptor> acceptor;
  std::vector<std::thread> threads;
  absl::Mutex sessions_mu;
  std::vector<std::weak_ptr<SessionBase>> sessions ABSL_GUARDED_BY(sessions_mu);
  bool stopped = false;

  void Accept() {
    acceptor->async_accept(net::make_strand(ioc), [this](ErrorCode ec, tcp::socket socket) {
      if (ec == net::error::operation_aborted || !acceptor->is_open()) return;
      if (!ec) OnAccept(std::move(socket));
      Accept();
    });
  }

  void OnAccept(tcp::socket socket) {
    HttpServerStats& stats = shared->stats;
    if (stats.connections_open.load() >= shared->options.max_connections) {
      stats.connections_refused.fetch_add(1);
      ErrorCode ec;
      if (!ssl) {
        // A fresh socket's send buffer takes this at once: no wait.
        static const std::string kBusy = [] {
          const std::string body =
              R"({"error":{"message":"too many open connections","type":"server_error",)"
              R"("param":null,"code":null}})";
          return absl::StrCat(
              "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
              "Content-Length: ",
              body.size(), "\r\nConnection: close\r\nRetry-After: 1\r\n\r\n", body);
        }();
        socket.non_blocking(true, ec);
        socket.write_some(net::buffer(kBusy), ec);
      }
      socket.close(ec);
      return;
    }
    std::shared_ptr<SessionBase> session;
    if (ssl) {
      auto s = std::make_shared<TlsSession>(
          shared, beast::ssl_stream<beast::tcp_stream>(beast::tcp_stream(std::move(socket)), *ssl));
      s->Start();
      session = s;
    } else {
      auto s = std::make_shared<PlainSession>(shared, beast::tcp_stream(std::move(socket)));
      s->Start();
      session = s;
    }
    absl::MutexLock lock(&sessions_mu);
    // Forget the ended ones now and then, so the list stays as long as the open connections.
    if (sessions.size() >= 64 && sessions.size() % 64 == 0) {
      std::erase_if(sessions, [](const std::weak_ptr<SessionBase>& w) { return w.expired(); });
    }
    sessions.push_back(session);
  }
};

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(HttpServerOptions options,
                                                              HttpHandler handler) {
  auto impl = std::make_unique<Impl>();
  const std::string address = options.address;
  absl::StatusOr<rpc::HostPort> split = rpc::SplitHostPort(address);
  if (!split.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("HTTP listen address: ", split.status().message()));
  }
  std::string host = split->host;
  const int port = split->port;
  if (host.empty()) host = "0.0.0.0";
  if (!options.security.insecure()) {
    const auto& tls = options.security.options();
    if (tls.cert_file.empty() || tls.key_file.empty()) {
      return absl::InvalidArgumentError(
          "the HTTP API serves TLS with the gateway's certificate: give --tls-cert and --tls-key "
          "(or --insecure)");
    }
    impl->ssl.emplace(net::ssl::context::tls_server);
    impl->ssl->set_options(net::ssl::context::default_workarounds | net::ssl::context::no_sslv2 |
                           net::ssl::context::no_sslv3 | net::ssl::context::no_tlsv1 |
                           net::ssl::context::no_tlsv1_1);
    ErrorCode ec;
    impl->ssl->use_certificate_chain_file(tls.cert_file, ec);
    if (!ec) impl->ssl->use_private_key_file(tls.key_file, net::ssl::context::pem, ec);
    if (ec) {
      return absl::InvalidArgumentError(absl::StrCat("HTTP TLS: cannot use ", tls.cert_file, " / ",
                                                     tls.key_file, ": ", ec.message()));
    }
  }
  impl->shared->options = std::move(options);
  impl->shared->handler = std::move(handler);
  ErrorCode ec;
  auto ip = net::ip::make_address(host, ec);
  if (ec) {
    tcp::resolver resolver(impl->ioc);
    auto results = resolver.resolve(host, std::to_string(port), ec);
    if (ec || results.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("HTTP listen address '", address, "': cannot resolve '", host, "'"));
    }
    ip = results.begin()->endpoint().address();
  }
  tcp::endpoint endpoint(ip, static_cast<uint16_t>(port));
  impl->acceptor.emplace(net::make_strand(impl->ioc));
  impl->acceptor->open(endpoint.protocol(), ec);
  if (!ec) impl->acceptor->set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) impl->acceptor->bind(endpoint, ec);
  if (!ec) impl->acceptor->listen(net::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("HTTP: cannot listen on ", address, ": ", ec.message()));
  }
  std::unique_ptr<HttpServer> server(new HttpServer(std::move(impl)));
  Impl& i = *server->impl_;
  server->port_ = i.acceptor->local_endpoint().port();
  i.work.emplace(i.ioc.get_executor());
  i.Accept();
  const int threads = std::max(1, i.shared->options.num_threads);
  for (int t = 0; t < threads; ++t) i.threads.emplace_back([&i] { i.ioc.run(); });
  return server;
}

std::string HttpServer::address() const {
  const auto endpoint = impl_->acceptor->local_endpoint();
  const auto ip = endpoint.address();
  return ip.is_v6() ? absl::StrCat("[", ip.to_string(), "]:", port_)
                    : absl::StrCat(ip.to_string(), ":", port_);
}

bool HttpServer::tls() const { return impl_->ssl.has_value(); }

const HttpServerStats& HttpServer::stats() const { return impl_->shared->stats; }

void HttpServer::Stop() {
  Impl& i = *impl_;
  if (i.stopped) return;
  i.stopped = true;
  net::post(i.acceptor->get_executor(), [&i] {
    ErrorCode ec;
    i.acceptor->close(ec);
  });
  {
    // Every connection closes; answers in progress hear it (their work is cancelled).
    absl::MutexLock lock(&i.sessions_mu);
    for (auto& w : i.sessions) {
      if (auto s = w.lock()) s->Post([s] { s->Close(); });
    }
    i.sessions.clear();
  }
  // The closes run on the I/O threads; give them a moment before the threads stop.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (i.shared->stats.connections_open.load() > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  {
    absl::MutexLock lock(&i.shared->mu);
    i.shared->alive = false;
  }
  i.work.reset();
  i.ioc.stop();
  for (auto& t : i.threads) t.join();
  i.threads.clear();
}

HttpServer::~HttpServer() { Stop(); }

}  // namespace dsmoe::http
