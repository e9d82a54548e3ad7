#include "cli/cluster_certs.h"

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "cli/process.h"
#include "core/io/mapped_file.h"
#include "gateway/api_keys.h"

namespace dsmoe::cli {

namespace {

namespace fs = std::filesystem;

// Certificates outlive any demo or test run; `cluster up` makes new ones every time.
constexpr char kDays[] = "90";

constexpr char kConfig[] = R"(# openssl configuration of `dsmoe cluster up` (throw-away cluster CA)
[req]
distinguished_name = dn
prompt = no
[dn]
CN = dsmoe
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
)";

absl::Status WriteFile(const fs::path& path, const std::string& text, fs::perms perms) {
  {
    std::ofstream out(path, std::ios::trunc);
    out << text;
    if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", path.string()));
  }
  std::error_code ec;
  fs::permissions(path, perms, ec);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ClusterCredentials> MakeClusterCredentials(const std::string& directory) {
  const fs::path dir = fs::absolute(directory);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat(dir.string(), ": ", ec.message()));
  fs::permissions(dir, fs::perms::owner_all, ec);
  const std::string log = (dir / "openssl.log").string();
  const std::string config = (dir / "openssl.cnf").string();
  DSMOE_RETURN_IF_ERROR(WriteFile(config, kConfig, fs::perms::owner_read | fs::perms::owner_write));
  auto path = [&](const char* name) { return (dir / name).string(); };
  const std::vector<std::string> new_key = {"-newkey", "ec", "-pkeyopt",
                                            "ec_paramgen_curve:prime256v1", "-nodes"};
  auto openssl = [&](std::vector<std::string> args) {
    args.insert(args.begin(), "openssl");
    return RunToCompletion(args, log);
  };
  auto with_key = [&](std::vector<std::string> args) {
    args.insert(args.begin() + 1, new_key.begin(), new_key.end());
    return args;
  };
  ClusterCredentials c;
  c.ca = path("ca.pem");
  DSMOE_RETURN_IF_ERROR(openssl(
      with_key({"req", "-x509", "-config", config, "-extensions", "ca", "-subj",
                "/CN=dsmoe cluster CA", "-days", kDays, "-keyout", path("ca.key"), "-out", c.ca})));
  for (const char* role : {"server", "client"}) {
    const std::string key = path(absl::StrCat(role, ".key").c_str());
    const std::string csr = path(absl::StrCat(role, ".csr").c_str());
    const std::string cert = path(absl::StrCat(role, ".pem").c_str());
    DSMOE_RETURN_IF_ERROR(
        openssl(with_key({"req", "-new", "-config", config, "-subj",
                          absl::StrCat("/CN=dsmoe-", role), "-keyout", key, "-out", csr})));
    DSMOE_RETURN_IF_ERROR(
        openssl({"x509", "-req", "-in", csr, "-CA", c.ca, "-CAkey", path("ca.key"),
                 "-CAcreateserial", "-CAserial", path("ca.srl"), "-days", kDays, "-extfile", config,
                 "-extensions", role, "-out", cert}));
    fs::permissions(key, fs::perms::owner_read | fs::perms::owner_write, ec);
    fs::remove(csr, ec);
    (role == std::string("server") ? c.server_cert : c.client_cert) = cert;
    (role == std::string("server") ? c.server_key : c.client_key) = key;
  }
  fs::remove(path("ca.key"), ec);  // nothing more will be signed by this CA
  fs::remove(path("ca.srl"), ec);

  // The API key: 32 random bytes as hex; the gateway gets only its digest.
  std::ifstream urandom("/dev/urandom", std::ios::binary);
  std::string bytes(32, '\0');
  if (!urandom.read(bytes.data(), static_cast<std::streamsize>(bytes.size()))) {
    return absl::InternalError("cannot read /dev/urandom for the API key");
  }
  ApiKeyStore::Digest raw;
  std::copy(bytes.begin(), bytes.end(), raw.begin());
  const std::string key = "dsmoe-" + ApiKeyStore::Hex(raw);
  c.api_key_file = path("api-key");
  c.api_key_hashes_file = path("api-keys.sha256");
  DSMOE_RETURN_IF_ERROR(
      WriteFile(c.api_key_file, key + "\n", fs::perms::owner_read | fs::perms::owner_write));
  DSMOE_RETURN_IF_ERROR(WriteFile(
      c.api_key_hashes_file,
      "# API keys of the gateway of `dsmoe cluster up` (digests only; the key is in api-key)\n"
      "sha256:" +
          ApiKeyStore::Hex(ApiKeyStore::Sha256(key)) + "\n",
      fs::perms::owner_read | fs::perms::owner_write));
  return c;
}

}  // namespace dsmoe::cli
