#include "core/rpc/transport_security.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include <vector>

#include "core/io/mapped_file.h"

namespace dsmoe::rpc {

namespace {

// OpenSSL objects owned by unique_ptrs (the checks below are the only OpenSSL use; gRPC links
// the same libssl).
struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct KeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct StoreFree {
  void operator()(X509_STORE* s) const { X509_STORE_free(s); }
};
struct StoreCtxFree {
  void operator()(X509_STORE_CTX* c) const { X509_STORE_CTX_free(c); }
};
struct StackFree {
  void operator()(STACK_OF(X509) * s) const { sk_X509_free(s); }
};
using X509Ptr = std::unique_ptr<X509, X509Free>;

std::unique_ptr<BIO, BioFree> MemBio(const std::string& pem) {
  return std::unique_ptr<BIO, BioFree>(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
}

// Every certificate of a PEM file, in order.
absl::StatusOr<std::vector<X509Ptr>> ParseCertificates(const std::string& pem,
                                                       const std::string& file) {
  auto bio = MemBio(pem);
  std::vector<X509Ptr> out;
  while (X509* x = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) out.emplace_back(x);
  ERR_clear_error();  // the end of the input reads as an error
  if (out.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": no PEM certificate (expected -----BEGIN CERTIFICATE-----)"));
  }
  return out;
}

std::string TimeString(const ASN1_TIME* t) {
  auto bio = std::unique_ptr<BIO, BioFree>(BIO_new(BIO_s_mem()));
  ASN1_TIME_print(bio.get(), t);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

std::string SubjectOf(X509* x) {
  char buf[256];
  X509_NAME_oneline(X509_get_subject_name(x), buf, sizeof(buf));
  return buf;
}

absl::Status CheckValidity(X509* x, const std::string& file) {
  if (X509_cmp_current_time(X509_get0_notBefore(x)) > 0) {
    return absl::FailedPreconditionError(absl::StrCat(file, ": certificate ", SubjectOf(x),
                                                      " is not valid before ",
                                                      TimeString(X509_get0_notBefore(x))));
  }
  if (X509_cmp_current_time(X509_get0_notAfter(x)) < 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        file, ": certificate ", SubjectOf(x), " expired on ", TimeString(X509_get0_notAfter(x))));
  }
  return absl::OkStatus();
}

// Checks that `chain[0]` is signed (through chain[1..]) by a CA of `cas`, as a peer would.
absl::Status VerifyAgainstCa(const std::vector<X509Ptr>& chain, const std::vector<X509Ptr>& cas,
                             const TransportSecurityOptions& o) {
  std::unique_ptr<X509_STORE, StoreFree> store(X509_STORE_new());
  for (const X509Ptr& ca : cas) X509_STORE_add_cert(store.get(), ca.get());
  std::unique_ptr<STACK_OF(X509), StackFree> untrusted(sk_X509_new_null());
  for (size_t i = 1; i < chain.size(); ++i) sk_X509_push(untrusted.get(), chain[i].get());
  std::unique_ptr<X509_STORE_CTX, StoreCtxFree> ctx(X509_STORE_CTX_new());
  X509_STORE_CTX_init(ctx.get(), store.get(), chain[0].get(), untrusted.get());
  if (X509_verify_cert(ctx.get()) != 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        o.cert_file, ": certificate ", SubjectOf(chain[0].get()), " does not verify against ",
        o.ca_file, " (", X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx.get())),
        "); peers using that CA would refuse it"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TransportSecurity> TransportSecurity::Load(const TransportSecurityOptions& o) {
  TransportSecurity t;
  t.options_ = o;
  if (o.insecure) return t;
  if (o.cert_file.empty() != o.key_file.empty()) {
    return absl::InvalidArgumentError(
        "a TLS certificate needs its key and a key its certificate: give --tls-cert and "
        "--tls-key together");
  }
  constexpr size_t kMaxPem = 1 << 20;
  std::vector<X509Ptr> chain, cas;
  if (!o.cert_file.empty()) {
    DSMOE_ASSIGN_OR_RETURN(t.cert_pem_, ReadTextFile(o.cert_file, kMaxPem));
    DSMOE_ASSIGN_OR_RETURN(chain, ParseCertificates(t.cert_pem_, o.cert_file));
    DSMOE_RETURN_IF_ERROR(CheckValidity(chain[0].get(), o.cert_file));
    DSMOE_ASSIGN_OR_RETURN(t.key_pem_, ReadTextFile(o.key_file, kMaxPem));
    auto bio = MemBio(t.key_pem_);
    std::unique_ptr<EVP_PKEY, KeyFree> key(
        PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
    ERR_clear_error();
    if (key == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(o.key_file, ": no unencrypted PEM private key"));
    }
    if (X509_check_private_key(chain[0].get(), key.get()) != 1) {
      ERR_clear_error();
      return absl::InvalidArgumentError(
          absl::StrCat("the key ", o.key_file, " does not match the certificate ", o.cert_file,
                       " (", SubjectOf(chain[0].get()), "): they are not a pair"));
    }
  }
  if (!o.ca_file.empty()) {
    DSMOE_ASSIGN_OR_RETURN(t.ca_pem_, ReadTextFile(o.ca_file, kMaxPem));
    DSMOE_ASSIGN_OR_RETURN(cas, ParseCertificates(t.ca_pem_, o.ca_file));
    if (!chain.empty()) DSMOE_RETURN_IF_ERROR(VerifyAgainstCa(chain, cas, o));
  }
  return t;
}

TransportSecurity TransportSecurity::Insecure() {
  TransportSecurity t;
  t.options_.insecure = true;
  return t;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> TransportSecurity::ServerCredentials()
    const {
  if (options_.insecure) return grpc::InsecureServerCredentials();
  if (cert_pem_.empty()) {
    return absl::InvalidArgumentError(
        "TLS needs a server certificate and key (--tls-cert, --tls-key); plain text only with "
        "--insecure");
  }
  if (options_.require_client_cert && ca_pem_.empty()) {
    return absl::InvalidArgumentError(
        "client certificates are required (mutual TLS) but no CA verifies them: give --tls-ca "
        "or --tls-client-auth=none");
  }
  grpc::SslServerCredentialsOptions o(
      options_.require_client_cert ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                   : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  o.pem_root_certs = ca_pem_;
  o.pem_key_cert_pairs.push_back({key_pem_, cert_pem_});
  return grpc::SslServerCredentials(o);
}

std::shared_ptr<grpc::ChannelCredentials> TransportSecurity::ChannelCredentials() const {
  if (options_.insecure) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions o;
  o.pem_root_certs = ca_pem_;  // empty: gRPC's default roots
  o.pem_private_key = key_pem_;
  o.pem_cert_chain = cert_pem_;
  return grpc::SslCredentials(o);
}

void TransportSecurity::ConfigureChannel(grpc::ChannelArguments* args) const {
  if (!options_.insecure && !options_.server_name.empty()) {
    args->SetSslTargetNameOverride(options_.server_name);
  }
}

std::string TransportSecurity::Describe() const {
  if (options_.insecure) return "PLAINTEXT";
  return absl::StrCat("TLS (",
                      options_.require_client_cert ? "client certificates required"
                                                   : "no client certificate required",
                      cert_pem_.empty() ? ", no certificate of its own" : "", ")");
}

}  // namespace dsmoe::rpc
