"""Helpers for the cluster integration tests: models, a cluster started with `dsmoe cluster up`,
gRPC stubs for the public and internal APIs, and the single-process reference outputs."""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import unittest

import grpc

DSMOE = None      # path of the dsmoe binary, set by the test runner
PY_STUBS = None   # directory of the generated Python stubs
TMP = None        # the test run's scratch directory, made by main() and removed after the run
ARGS = None       # main()'s parsed flags


def main(**flags):
    """Runs the tests of the calling file as ctest invokes it: `<name>_test.py --dsmoe BIN
    --stubs DIR [--flag VALUE for each of `flags` ({name: help}, optional)] [unittest args, e.g.
    a suite]`. Loads the stubs, makes TMP (prefix dsmoe-<name>-test-), keeps the flags in ARGS;
    exits with unittest's status."""
    global ARGS, TMP
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsmoe", required=True)
    ap.add_argument("--stubs", required=True)
    for name, help in flags.items():
        ap.add_argument("--" + name.replace("_", "-"), help=help)
    ARGS, rest = ap.parse_known_args()
    setup(os.path.abspath(ARGS.dsmoe), os.path.abspath(ARGS.stubs))
    name = os.path.basename(sys.argv[0]).removesuffix(".py").removesuffix("_test")
    with tempfile.TemporaryDirectory(prefix=f"dsmoe-{name}-test-") as TMP:
        unittest.main(module="__main__", argv=[sys.argv[0], *rest], verbosity=2)


def setup(dsmoe, py_stubs):
    global DSMOE, PY_STUBS, pb, pbg, apb, apbg, epb, epbg, health_pb2
    DSMOE, PY_STUBS = dsmoe, py_stubs
    sys.path.insert(0, py_stubs)
    from dsmoe.v1 import gateway_pb2 as pb, gateway_pb2_grpc as pbg  # noqa: F401
    from dsmoe.internal.v1 import attention_pb2 as apb, attention_pb2_grpc as apbg  # noqa: F401
    from dsmoe.internal.v1 import expert_pb2 as epb, expert_pb2_grpc as epbg  # noqa: F401
    globals().update(pb=pb, pbg=pbg, apb=apb, apbg=apbg, epb=epb, epbg=epbg)
    # grpc.health.v1's messages, generated as dsmoe_std (proto/CMakeLists.txt says why).
    from dsmoe_std.health.v1 import health_pb2
    globals()["health_pb2"] = health_pb2


def run(*args, check=True, timeout=300):
    r = subprocess.run([DSMOE, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"dsmoe {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def make_model(directory, name, preset, *flags):
    path = os.path.join(directory, name)
    if not os.path.exists(os.path.join(path, "config.json")):
        run("make-model", "--preset", preset, "--seed", "11", "--out", path, *flags)
    return path


def single_process_generate(model, ids, max_tokens, **kw):
    args = ["generate", "--model", model, "--ids", ",".join(map(str, ids)), "--max-tokens", str(max_tokens),
            "--json", "--threads", "1"]
    if kw.get("ignore_eos", True):
        args.append("--ignore-eos")
    if "temperature" in kw:
        args += ["--temperature", str(kw["temperature"]), "--seed", str(kw.get("seed", 0))]
    return json.loads(run(*args).stdout)


def read(path, mode="rb"):
    with open(path, mode) as f:
        return f.read()


def tls_credentials(ca, cert=None, key=None):
    """grpc channel credentials: TLS trusting `ca`, presenting `cert`/`key` if given."""
    return grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key) if key else None,
                                        certificate_chain=read(cert) if cert else None)


class Cluster:
    """A cluster from `dsmoe cluster up` (by default TLS, mutual TLS between the servers and an
    API key at the gateway: the clients below use the cluster's CA, client certificate and
    key), stopped by close()."""

    def __init__(self, model, attention=1, experts=2, replicas=1, extra=()):
        self.tmp = tempfile.TemporaryDirectory(prefix="dsmoe-cluster-")
        self.state_dir = os.path.join(self.tmp.name, "state")
        r = run("cluster", "up", "--model", model, "--attention-servers", str(attention), "--expert-servers",
                str(experts), "--replicas", str(replicas), "--state-dir", self.state_dir, "--json", *extra)
        self.state = json.loads(r.stdout)
        self.security = self.state["security"]
        key_file = self.security["api_key_file"]
        self.api_key = read(key_file, "r").strip() if key_file else None
        self.gateway_address = self.state["gateway"]
        self.channel = self.channel_to(self.gateway_address, api_key=True)
        self.gateway = pbg.GatewayStub(self.channel)

    def channel_to(self, address, api_key=False):
        """A channel to one of the cluster's processes, as an authorised client reaches it."""
        if not self.security["tls"]:
            return grpc.insecure_channel(address)
        creds = tls_credentials(self.security["ca"], self.security["client_cert"], self.security["client_key"])
        if api_key and self.api_key:
            # `authorization: Bearer <key>` on every call (what the gateway asks for).
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(self.api_key))
        return grpc.secure_channel(address, creds)

    def health(self, address, service=""):
        """health_status() of one of the cluster's processes, reached as its peers reach it."""
        return health_status(address, service, channel=self.channel_to(address))

    def processes(self, role):
        return [p for p in self.state["processes"] if p["role"] == role]

    def attention(self, index=0):
        return apbg.AttentionServiceStub(self.channel_to(self.processes("attention-server")[index]["address"]))

    def expert(self, index=0):
        return epbg.ExpertServiceStub(self.channel_to(self.processes("expert-server")[index]["address"]))

    def generate(self, ids, max_tokens, timeout=120, **kw):
        """Streams one request; returns (ids, finish_reason name, messages)."""
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), max_tokens=max_tokens,
                                 temperature=kw.get("temperature", 0.0), ignore_eos=kw.get("ignore_eos", True))
        if "seed" in kw:
            req.seed = kw["seed"]
        out, msgs = [], []
        for m in self.gateway.Generate(req, timeout=timeout):
            out.extend(m.token_ids)
            msgs.append(m)
        return out, pb.FinishReason.Name(msgs[-1].finish_reason), msgs

    def close(self):
        self.channel.close()
        run("cluster", "down", "--state-dir", self.state_dir, check=False)
        self.tmp.cleanup()


def health_status(address, service="", timeout=2, channel=None):
    """grpc.health.v1 Check of `service` ("" = the server as a whole): "SERVING", "NOT_SERVING",
    or the gRPC code's name if the check itself failed (e.g. "UNAVAILABLE"). Plain text unless
    `channel` (e.g. Cluster.channel_to(address)) is given."""
    ch = channel or grpc.insecure_channel(address)
    try:
        check = ch.unary_unary("/grpc.health.v1.Health/Check",
                               request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                               response_deserializer=health_pb2.HealthCheckResponse.FromString)
        resp = check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    except grpc.RpcError as e:
        return e.code().name
    finally:
        ch.close()


def wait_for(predicate, timeout, what, interval=0.05):
    """Polls `predicate` until it is true; fails naming `what` after `timeout` seconds."""
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Stream:
    """One greedy Generate call (ignoring eos) on a thread of its own: the tokens as they arrive, then the outcome."""

    def __init__(self, gateway, ids, max_tokens, timeout=60):
        self.ids, self.tokens, self.code, self.details = ids, [], None, ""
        self.first, self.done = threading.Event(), threading.Event()
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), max_tokens=max_tokens, temperature=0.0,
                                 ignore_eos=True)
        self.call = gateway.Generate(req, timeout=timeout)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        try:
            for m in self.call:
                self.tokens.extend(m.token_ids)
                if self.tokens:
                    self.first.set()
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.code, self.details = e.code(), e.details() or ""
        finally:
            self.first.set()
            self.done.set()

    def wait(self, timeout=60):
        assert self.done.wait(timeout), f"stream {self.ids} did not end within {timeout} s"
        return self


# Processes started and stopped by hand (fault and restart tests).
def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def spawn(argv, log):
    with open(log, "a") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def command_line(pid):
    with open(f"/proc/{pid}/cmdline") as f:
        return f.read().split("\0")[:-1]


def same_port(argv, address):
    """`argv` with --listen set to `address` and no ready file (the test polls health instead)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--listen", "--ready-file"):
            skip = True
            continue
        out.append(a)
    return out + ["--listen", address]


def stop(proc):
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def metric(url, name, **labels):
    """The value of one series on a /metrics page (None if absent)."""
    import urllib.request
    with urllib.request.urlopen(url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if not line.startswith(name):
                continue
            rest = line[len(name):]
            if rest.startswith("{") and all(f'{k}="{v}"' in rest for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
            if rest.startswith(" ") and not labels:
                return float(rest.split()[-1])
    return None
