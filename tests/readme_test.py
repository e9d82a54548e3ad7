#!/usr/bin/env python3
"""Runs the README's "servers by hand" block as a user would type it, so it cannot rot.

The block (after the `<!-- by-hand` marker) is executed line by line with bash: `B=...` points at
the build's binaries, `out/` at a scratch directory, and the fixed example ports at free ones on
127.0.0.1; lines ending in `&` start a server. The last line, the client call, is retried until
the servers are up (bounded), and its greedy tokens must equal the single-process engine's
(`dsmoe generate` on the same checkpoint), an independent path through the same model.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def by_hand_block(readme):
    text = open(readme, encoding="utf-8").read()
    start = text.index("<!-- by-hand")
    body = text[text.index("```sh\n", start) + len("```sh\n"):]
    return body[:body.index("```")].strip().splitlines()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--readme", required=True)
    ap.add_argument("--bin", required=True, help="directory of dsmoe and the servers")
    args = ap.parse_args()

    lines = by_hand_block(args.readme)
    assert lines[0].startswith("B="), f"the block should start by naming the binaries: {lines[0]}"
    scratch = tempfile.mkdtemp(prefix="dsmoe-readme-")
    ports = {p: str(free_port()) for p in sorted(set(re.findall(r"127\.0\.0\.1:(\d+)", "\n".join(lines))))}
    servers = []
    try:
        env = dict(os.environ, B=args.bin)
        client = None
        for line in lines[1:]:
            line = line.replace("out/", scratch + "/")
            for old, new in ports.items():
                line = line.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
            if line.endswith("&"):
                servers.append(subprocess.Popen(["bash", "-c", "exec " + line[:-1]], env=env,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                start_new_session=True))
            elif "client generate" in line:
                client = line
            else:
                subprocess.run(["bash", "-c", line], env=env, check=True, timeout=120,
                               capture_output=True)
        assert client is not None, "the block should end with a client call"

        deadline = time.monotonic() + 90
        while True:
            for p in servers:
                assert p.poll() is None, f"a server exited: {p.args}: {p.stderr.read().decode()[-2000:]}"
            r = subprocess.run(["bash", "-c", client], env=env, capture_output=True, text=True,
                               timeout=60)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.returncode == 0, f"the README's client call failed: {r.stderr}"
        through_cluster = r.stdout.split()
        model = os.path.join(scratch, "tiny")
        single = subprocess.run([os.path.join(args.bin, "dsmoe"), "generate", "--model", model,
                                 "--ids", "1,2,3", "--max-tokens", "8", "--json"],
                                capture_output=True, text=True, check=True, timeout=60)
        expected = [str(i) for i in json.loads(single.stdout)["ids"]]
        assert through_cluster[:8] == expected, (through_cluster, expected)
        print(f"README by-hand block: {len(servers)} servers, tokens {' '.join(expected)}: OK")
    finally:
        for p in servers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in servers:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
