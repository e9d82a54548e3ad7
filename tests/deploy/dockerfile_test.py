#!/usr/bin/python3
"""deploy/docker/Dockerfile without a container engine (none is available to the tests): its
run stage installs the Debian package of every shared library the built servers link (ldd +
dpkg -S on this Debian 12 machine), its build stage installs what scripts/install-deps.sh lists
for building, and it ships every command the Helm chart runs.
Usage: dockerfile_test.py --bin build/bin"""
import argparse
import os
import re
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DOCKERFILE = os.path.join(ROOT, "deploy", "docker", "Dockerfile")
BINARIES = ["dsmoe", "dsmoe-gateway", "dsmoe-attention-server", "dsmoe-expert-server"]
BIN = None


def stages():
    """{stage name: set of packages its apt-get install lines name}."""
    text = open(DOCKERFILE).read().replace("\\\n", " ")
    out, stage = {}, None
    for line in text.splitlines():
        m = re.match(r"FROM\s+\S+\s+AS\s+(\w+)", line.strip())
        if m:
            stage = m.group(1)
            out[stage] = set()
        if stage and "apt-get install" in line:
            words = line.split("apt-get install", 1)[1].split("&&")[0].split()
            out[stage] |= {w for w in words if not w.startswith("-")}
    return out


def owners(paths):
    """{path: Debian package} (with usrmerge a library may be listed under /lib or /usr/lib)."""
    variants = {v: p for p in paths for v in (p, "/usr" + p, p.removeprefix("/usr"))}
    r = subprocess.run(["dpkg", "-S", *variants], capture_output=True, text=True)
    out = {}
    for line in r.stdout.splitlines():
        pkg, path = line.split(": ", 1)
        out[variants[path.strip()]] = pkg.split(":")[0]
    missing = set(paths) - set(out)
    assert not missing, f"no Debian package owns {missing}"
    return out


class Dockerfile(unittest.TestCase):
    def test_run_stage_has_every_linked_library(self):
        libs = set()
        for b in BINARIES:
            out = subprocess.run(["ldd", os.path.join(BIN, b)], capture_output=True, text=True, check=True).stdout
            self.assertNotIn("not found", out)
            libs |= set(re.findall(r"=> (/\S+)", out))
        need = set(owners(sorted(libs)).values())
        # In every Debian image already (essential / required).
        base = {"libc6", "libgcc-s1", "libstdc++6"}
        missing = need - base - stages()["run"]
        self.assertEqual(missing, set(), f"add to the run stage: {sorted(missing)}")

    def test_build_stage_has_the_build_packages_of_install_deps(self):
        text = open(os.path.join(ROOT, "scripts", "install-deps.sh")).read()
        body = text.split("PACKAGES=(", 1)[1].split("\n)\n", 1)[0]
        groups = [l for l in body.splitlines()]
        wanted, take = set(), False
        for line in groups:
            if line.strip().startswith("#"):
                # The image builds neither tests nor benchmarks (DSMOE_BUILD_TESTS/BENCH=OFF).
                take = not line.strip().startswith(("# tests", "# benchmarks"))
                continue
            if take:
                wanted |= set(line.split())
        self.assertTrue({"libgrpc++-dev", "prometheus-cpp-dev"} <= wanted, wanted)
        self.assertEqual(wanted - stages()["build"], set())

    def test_ships_every_command_the_chart_runs(self):
        text = open(DOCKERFILE).read()
        for b in BINARIES:
            self.assertIn(f"/build/bin/{b}", text)
        chart = os.path.join(ROOT, "deploy", "helm", "dsmoe", "templates")
        commands = set()
        for f in os.listdir(chart):
            for line in open(os.path.join(chart, f)):
                if line.strip().startswith("command:"):
                    commands |= set(re.findall(r"\b(dsmoe-[a-z-]+)", line))
        self.assertTrue(commands, "the chart runs no dsmoe command?")
        self.assertLessEqual(commands, set(BINARIES), commands)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    args, rest = ap.parse_known_args()
    BIN = os.path.abspath(args.bin)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
