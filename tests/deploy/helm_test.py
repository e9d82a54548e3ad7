#!/usr/bin/python3
"""The Helm chart (deploy/helm/dsmoe) with the real tools, offline: `helm lint --strict` and
`helm template` over the values files in ci/ (minimal, GPU, replicas) and the defaults, every
rendered object validated against the Kubernetes schemas (validate_k8s.mjs: kubernetes-models,
prometheus-operator models), values.schema.json refusing bad values, and the generated
placement: it covers every routed expert of the model, the real expert server loads it, and a
local cluster started from it generates what a single process does; and the security values:
TLS, mutual TLS and API keys by default, the cert-manager Certificate naming every address the
servers dial, plain text only when asked, every rendered flag known to the real binaries.

Needs tests/deploy/setup_tools.sh (helm, node packages) and the built dsmoe binaries.
Usage: helm_test.py --dsmoe build/bin/dsmoe [unittest args]"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import unittest

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CHART = os.path.join(ROOT, "deploy", "helm", "dsmoe")
HELM = os.path.join(HERE, ".tools", "bin", "helm")
VALIDATE = os.path.join(HERE, "validate_k8s.mjs")
VALUES = {name: os.path.join(CHART, "ci", f"{name}-values.yaml")
          for name in ("minimal", "gpu", "replicas", "certmanager", "insecure")}
VALUES["default"] = None
DSMOE = None


def helm(*args, check=True):
    # A private HOME-less environment: helm writes no cache or config outside the temp dir.
    env = dict(os.environ, HELM_CACHE_HOME=TMP.name, HELM_CONFIG_HOME=TMP.name, HELM_DATA_HOME=TMP.name)
    r = subprocess.run([HELM, *args], capture_output=True, text=True, env=env, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def render(values, *sets):
    args = ["template", "rel", CHART, "--namespace", "llm"]
    if values:
        args += ["-f", values]
    for s in sets:
        args += ["--set", s]
    return helm(*args).stdout


def objects(text):
    return [d for d in yaml.safe_load_all(text) if d]


def values_of(values):
    with open(os.path.join(CHART, "values.yaml")) as f:
        merged = yaml.safe_load(f)
    if values:
        def merge(a, b):
            for k, v in b.items():
                if isinstance(v, dict) and isinstance(a.get(k), dict):
                    merge(a[k], v)
                else:
                    a[k] = v
        with open(values) as f:
            merge(merged, yaml.safe_load(f))
    return merged


def placement_of(rendered):
    for o in objects(rendered):
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-placement"):
            return json.loads(o["data"]["placement.json"])
    raise AssertionError("no placement ConfigMap rendered")


def moe_layers(arch):
    return [l for l in range(arch["numHiddenLayers"])
            if l >= arch["firstKDenseReplace"] and l % arch["moeLayerFreq"] == 0]


def make_model(directory, arch):
    """A checkpoint of the values' shape (tiny widths: only its config and layout matter)."""
    path = os.path.join(directory, "model-{numHiddenLayers}-{nRoutedExperts}-{firstKDenseReplace}-{moeLayerFreq}".format(**arch))
    if not os.path.exists(os.path.join(path, "config.json")):
        subprocess.run([DSMOE, "make-model", "--preset", "tiny", "--seed", "5", "--out", path,
                        "--layers", str(arch["numHiddenLayers"]), "--routed-experts", str(arch["nRoutedExperts"]),
                        "--first-dense", str(arch["firstKDenseReplace"]), "--moe-layer-freq", str(arch["moeLayerFreq"])],
                       check=True, capture_output=True, timeout=300)
    return path


class LintAndTemplate(unittest.TestCase):
    def test_lint_strict_with_every_values_file(self):
        for name, values in VALUES.items():
            with self.subTest(values=name):
                args = ["lint", "--strict", CHART] + (["-f", values] if values else [])
                r = helm(*args)
                self.assertIn("0 chart(s) failed", r.stdout)

    def test_rendered_objects_are_valid_kubernetes(self):
        for name, values in VALUES.items():
            with self.subTest(values=name):
                rendered = render(values)
                r = subprocess.run(["node", VALIDATE, "-"], input=rendered, capture_output=True, text=True, timeout=120)
                self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
                self.assertIn(" 0 error(s)", r.stdout)
                kinds = sorted(f'{o["kind"]}/{o["metadata"]["name"]}' for o in objects(rendered))
                for want in ("Deployment/rel-dsmoe-gateway", "StatefulSet/rel-dsmoe-attention", "StatefulSet/rel-dsmoe-expert",
                             "Service/rel-dsmoe-gateway", "Service/rel-dsmoe-attention", "Service/rel-dsmoe-expert",
                             "ConfigMap/rel-dsmoe-placement"):
                    self.assertIn(want, kinds)

    def test_components_follow_the_values(self):
        v = values_of(VALUES["replicas"])
        objs = {f'{o["kind"]}/{o["metadata"]["name"]}': o for o in objects(render(VALUES["replicas"]))}
        gw = objs["Deployment/rel-dsmoe-gateway"]
        self.assertEqual(gw["spec"]["replicas"], 2)
        args = gw["spec"]["template"]["spec"]["containers"][0]["args"]
        attention = [a for a in args if a.startswith("--attention-servers=")][0].split("=", 1)[1].split(",")
        self.assertEqual(attention, [f"rel-dsmoe-attention-{i}.rel-dsmoe-attention.llm.svc.cluster.local:50051" for i in range(3)])
        self.assertIn("--model-name=deepseek-moe-16b-base", args)
        self.assertEqual(objs["StatefulSet/rel-dsmoe-expert"]["spec"]["replicas"], v["experts"]["replicas"])
        self.assertEqual(objs["Service/rel-dsmoe-expert"]["spec"]["clusterIP"], "None")
        self.assertIn("PodMonitor/rel-dsmoe", objs)
        for kind in ("Deployment/rel-dsmoe-gateway", "StatefulSet/rel-dsmoe-attention", "StatefulSet/rel-dsmoe-expert"):
            c = objs[kind]["spec"]["template"]["spec"]["containers"][0]
            # Probes reach the plain-text health port (kubelet cannot do mutual TLS).
            self.assertEqual(c["readinessProbe"]["grpc"]["port"], 8081, kind)
            self.assertEqual(c["livenessProbe"]["grpc"]["port"], 8081, kind)
            self.assertIn({"name": "health", "containerPort": 8081}, c["ports"], kind)
            # Readiness is the overall status ("can serve"); liveness and startup the process's
            # own service, so a server waiting for its dependencies is not restarted.
            self.assertNotIn("service", c["readinessProbe"]["grpc"], kind)
            own = {"Deployment/rel-dsmoe-gateway": "dsmoe.v1.Gateway",
                   "StatefulSet/rel-dsmoe-attention": "dsmoe.internal.v1.AttentionService",
                   "StatefulSet/rel-dsmoe-expert": "dsmoe.internal.v1.ExpertService"}[kind]
            self.assertEqual(c["livenessProbe"]["grpc"]["service"], own, kind)
            self.assertEqual(c["startupProbe"]["grpc"]["service"], own, kind)
            self.assertIn({"name": "metrics", "containerPort": 9400}, c["ports"], kind)
            self.assertTrue(any(a == "--metrics-listen=0.0.0.0:9400" for a in c["args"]), kind)
            self.assertFalse(any(a.startswith("--device") for a in c["args"]), kind)  # CPU: the default
            vol = objs[kind]["spec"]["template"]["spec"]["volumes"][0]
            self.assertEqual(vol["persistentVolumeClaim"]["claimName"], "deepseek-moe-16b", kind)

    def test_ingress_reaches_the_gateways_http_port_and_streams_unbuffered(self):
        self.assertNotIn("Ingress", [o["kind"] for o in objects(render(None))], "off by default")
        objs = {f'{o["kind"]}/{o["metadata"]["name"]}': o for o in objects(render(VALUES["replicas"]))}
        ing = objs["Ingress/rel-dsmoe-gateway"]
        self.assertEqual(ing["spec"]["ingressClassName"], "nginx")
        self.assertEqual(ing["spec"]["tls"], [{"secretName": "llm-example-com-tls", "hosts": ["llm.example.com"]}])
        rule = ing["spec"]["rules"][0]
        self.assertEqual(rule["host"], "llm.example.com")
        backend = rule["http"]["paths"][0]["backend"]["service"]
        # The backend is the gateway Service's port named http, which targets the container's
        # --http-listen port.
        svc = objs["Service/rel-dsmoe-gateway"]
        self.assertEqual(backend["name"], svc["metadata"]["name"])
        http_port = [p for p in svc["spec"]["ports"] if p["name"] == backend["port"]["name"]]
        self.assertEqual(len(http_port), 1)
        container = objs["Deployment/rel-dsmoe-gateway"]["spec"]["template"]["spec"]["containers"][0]
        target = [p["containerPort"] for p in container["ports"] if p["name"] == http_port[0]["targetPort"]]
        self.assertIn(f"--http-listen=0.0.0.0:{target[0]}", container["args"])
        notes = ing["metadata"]["annotations"]
        self.assertEqual(notes["nginx.ingress.kubernetes.io/backend-protocol"], "HTTPS", "the gateway speaks TLS")
        self.assertEqual(notes["nginx.ingress.kubernetes.io/proxy-buffering"], "off", "SSE must not be buffered")
        # Plain text when TLS is off; the user's own annotation wins over the chart's.
        plain = [o for o in objects(render(VALUES["replicas"], "tls.enabled=false")) if o["kind"] == "Ingress"][0]
        self.assertNotIn("nginx.ingress.kubernetes.io/backend-protocol", plain["metadata"]["annotations"])
        mine = [o for o in objects(render(VALUES["replicas"], "gateway.http.ingress.annotations.nginx\\.ingress\\.kubernetes\\.io/backend-protocol=GRPCS"))
                if o["kind"] == "Ingress"][0]
        self.assertEqual(mine["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"], "GRPCS")
        # No HTTP API, no Ingress.
        self.assertNotIn("Ingress", [o["kind"] for o in objects(render(VALUES["replicas"], "gateway.http.enabled=false"))])

    def test_expert_copies_spread_over_nodes_and_survive_drains(self):
        """Copies of an expert on different nodes, and a drain never takes every copy."""
        for copies, when, budget in ((1, "ScheduleAnyway", 1), (2, "DoNotSchedule", 1), (3, "DoNotSchedule", 2)):
            objs = {f'{o["kind"]}/{o["metadata"]["name"]}': o
                    for o in objects(render(None, "experts.replicas=4", f"experts.placement.copies={copies}"))}
            spread = objs["StatefulSet/rel-dsmoe-expert"]["spec"]["template"]["spec"]["topologySpreadConstraints"]
            self.assertEqual(len(spread), 1, copies)
            self.assertEqual(spread[0]["topologyKey"], "kubernetes.io/hostname")
            self.assertEqual(spread[0]["whenUnsatisfiable"], when, copies)
            self.assertEqual(spread[0]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"], "expert")
            pdb = objs["PodDisruptionBudget/rel-dsmoe-expert"]["spec"]
            self.assertEqual(pdb["maxUnavailable"], budget, copies)
            self.assertEqual(pdb["selector"]["matchLabels"]["app.kubernetes.io/component"], "expert")
            for role in ("gateway", "attention"):
                self.assertEqual(objs[f"PodDisruptionBudget/rel-dsmoe-{role}"]["spec"]["maxUnavailable"], 1)
        off = {f'{o["kind"]}/{o["metadata"]["name"]}': o
               for o in objects(render(None, "experts.spreadOverNodes=off", "podDisruptionBudget.enabled=false"))}
        self.assertNotIn("topologySpreadConstraints", off["StatefulSet/rel-dsmoe-expert"]["spec"]["template"]["spec"])
        self.assertFalse(any(k.startswith("PodDisruptionBudget/") for k in off))
        args = objects(render(VALUES["replicas"]))
        attention = [o for o in args if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "rel-dsmoe-attention"][0]
        self.assertIn("--min-copies=2", attention["spec"]["template"]["spec"]["containers"][0]["args"])

    def test_gpu_values_request_gpus_and_download_the_model(self):
        objs = {f'{o["kind"]}/{o["metadata"]["name"]}': o for o in objects(render(VALUES["gpu"]))}
        for kind in ("StatefulSet/rel-dsmoe-attention", "StatefulSet/rel-dsmoe-expert"):
            spec = objs[kind]["spec"]["template"]["spec"]
            self.assertEqual(spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"], 1, kind)
            self.assertIn("--device=cuda", spec["containers"][0]["args"], kind)
            self.assertEqual(spec["initContainers"][0]["name"], "download-model", kind)
            env = {e["name"]: e["value"] for e in spec["initContainers"][0]["env"]}
            self.assertEqual(env["DSMOE_MODEL_FILES"], "*", kind)
            self.assertIn("emptyDir", spec["volumes"][0])
            self.assertEqual(spec["tolerations"][0]["key"], "nvidia.com/gpu")
        # The gateway downloads the config and tokenizer, not the weights.
        init = objs["Deployment/rel-dsmoe-gateway"]["spec"]["template"]["spec"]["initContainers"][0]
        env = {e["name"]: e["value"] for e in init["env"]}
        self.assertEqual((env["DSMOE_ROLE"], env["DSMOE_MODEL_FILES"]),
                         ("gateway", "config.json generation_config.json tokenizer.json tokenizer_config.json"))
        self.assertIn("--include $DSMOE_MODEL_FILES", init["command"][-1])
        attention_args = objs["StatefulSet/rel-dsmoe-attention"]["spec"]["template"]["spec"]["containers"][0]["args"]
        self.assertIn("--expert-transport=nccl", attention_args)
        self.assertNotIn("nvidia.com/gpu", objs["Deployment/rel-dsmoe-gateway"]["spec"]["template"]["spec"]["containers"][0]
                         ["resources"].get("limits", {}))
        self.assertIn("ServiceMonitor/rel-dsmoe", objs)
        dashboard = objs["ConfigMap/rel-dsmoe-dashboard"]
        self.assertEqual(dashboard["metadata"]["labels"]["grafana_dashboard"], "1")
        with open(os.path.join(ROOT, "deploy", "grafana", "dsmoe-cluster.json")) as f:
            self.assertEqual(json.loads(dashboard["data"]["dsmoe-cluster.json"]), json.load(f))

    def test_cpu_limits_per_role_and_threads_that_follow_them(self):
        """Every role has a CPU request and limit as values; the compute servers get no --threads
        by default (they take the cgroup quota the limit sets: core/util/cpu_quota.h), an explicit
        one is passed on, and one above the limit's whole CPUs is refused naming both values."""
        objs = {f'{o["kind"]}/{o["metadata"]["name"]}': o for o in objects(render(None))}
        for kind in COMPONENTS:
            c = objs[kind]["spec"]["template"]["spec"]["containers"][0]
            with self.subTest(kind=kind):
                self.assertIn("cpu", c["resources"]["requests"])
                self.assertIn("cpu", c["resources"]["limits"])
                self.assertFalse(any(a.startswith("--threads") for a in c["args"]))
        objs = {f'{o["kind"]}/{o["metadata"]["name"]}': o for o in objects(render(
            None, "attention.resources.limits.cpu=2", "attention.resources.requests.cpu=2", "attention.threads=2",
            "experts.resources.limits.cpu=3500m", "experts.threads=3", "gateway.resources.limits.cpu=250m"))}
        spec = lambda k: objs[k]["spec"]["template"]["spec"]["containers"][0]  # noqa: E731
        self.assertEqual(spec("StatefulSet/rel-dsmoe-attention")["resources"]["limits"]["cpu"], 2)
        self.assertEqual(flags(spec("StatefulSet/rel-dsmoe-attention"))["--threads"], "2")
        self.assertEqual(flags(spec("StatefulSet/rel-dsmoe-expert"))["--threads"], "3")
        self.assertEqual(spec("Deployment/rel-dsmoe-gateway")["resources"]["limits"]["cpu"], "250m")
        for sets, message in [(["experts.resources.limits.cpu=3500m", "experts.threads=4"],
                               "experts.threads=4 exceeds experts.resources.limits.cpu=3500m (3 whole CPUs)"),
                              (["attention.threads=5"], "attention.threads=5 exceeds attention.resources.limits.cpu=4")]:
            with self.subTest(sets=sets):
                r = helm("template", "rel", CHART, *[a for s in sets for a in ("--set", s)], check=False)
                self.assertNotEqual(r.returncode, 0)
                self.assertIn(message, r.stderr)

    def test_schema_refuses_bad_values(self):
        for bad, message in [("experts.placement.copies=0", "minimum"), ("gateway.port=notaport", "want integer"),
                             ("model.source=s3", "model/source"), ("model.path=relative/dir", "pattern"),
                             ("model.source=download", "minItems"), ("attention.gpu.enabled=maybe", "want boolean"),
                             ("attention.expertTransport=rdma", "expertTransport"),
                             ("gateway.http.ingress.hosts[0].paths[0].path=v1", "pattern")]:
            with self.subTest(bad=bad):
                r = helm("lint", CHART, "--set", bad, check=False)
                self.assertNotEqual(r.returncode, 0, bad)
                self.assertIn(message, r.stdout + r.stderr)
        r = helm("template", "rel", CHART, "--set", "experts.replicas=2", "--set", "experts.placement.copies=3", check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("must not exceed experts.replicas", r.stderr)


COMPONENTS = {"Deployment/rel-dsmoe-gateway": "dsmoe-gateway", "StatefulSet/rel-dsmoe-attention": "dsmoe-attention-server",
              "StatefulSet/rel-dsmoe-expert": "dsmoe-expert-server"}


def flags(container):
    return dict(a.split("=", 1) if "=" in a else (a, None) for a in container["args"])


def dns_matches(pattern, host):
    """RFC 6125 matching as TLS clients do it: a wildcard stands for exactly the leftmost label."""
    if pattern.startswith("*."):
        return "." in host and host.split(".", 1)[1] == pattern[2:]
    return pattern == host


class Security(unittest.TestCase):
    """tls.* and auth.*: secure by default, cert-manager wired, plain text only when asked."""

    def rendered(self, values, *sets):
        return {f'{o["kind"]}/{o["metadata"]["name"]}': o for o in objects(render(values, *sets))}

    def pod(self, objs, kind):
        return objs[kind]["spec"]["template"]["spec"]

    def test_defaults_are_tls_mutual_tls_and_api_keys(self):
        objs = self.rendered(None)
        for kind in COMPONENTS:
            spec = self.pod(objs, kind)
            f = flags(spec["containers"][0])
            self.assertEqual(f["--tls-cert"], "/var/run/secrets/dsmoe/tls/tls.crt", kind)
            self.assertEqual(f["--tls-key"], "/var/run/secrets/dsmoe/tls/tls.key", kind)
            self.assertEqual(f["--tls-ca"], "/var/run/secrets/dsmoe/tls/ca.crt", kind)
            self.assertNotIn("--insecure", f, kind)
            self.assertEqual(f["--health-listen"], "0.0.0.0:8081", kind)
            volumes = {v["name"]: v for v in spec["volumes"]}
            self.assertEqual(volumes["tls"]["secret"]["secretName"], "rel-dsmoe-tls", kind)
            mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
            self.assertTrue(mounts["/var/run/secrets/dsmoe/tls"]["readOnly"], kind)
        # Internal servers keep their default (client certificates required); the gateway's
        # public port asks for none but requires an API key.
        for kind in ("StatefulSet/rel-dsmoe-attention", "StatefulSet/rel-dsmoe-expert"):
            self.assertNotIn("--tls-client-auth", flags(self.pod(objs, kind)["containers"][0]))
            self.assertNotIn("api-keys", {v["name"] for v in self.pod(objs, kind)["volumes"]})
        gw = self.pod(objs, "Deployment/rel-dsmoe-gateway")
        f = flags(gw["containers"][0])
        self.assertEqual(f["--tls-client-auth"], "none")
        self.assertEqual(f["--api-keys"], "/var/run/secrets/dsmoe/api-keys/api-keys")
        self.assertNotIn("--no-auth", f)
        self.assertFalse(any(a.startswith("--rate-limit") for a in f))
        self.assertEqual({v["name"]: v for v in gw["volumes"]}["api-keys"]["secret"]["secretName"], "rel-dsmoe-api-keys")
        # Nothing secret is made by default: the operator provides both Secrets (fail closed).
        self.assertFalse([k for k in objs if k.startswith(("Secret/", "Certificate/"))], sorted(objs))

    def test_cert_manager_certificate_covers_every_address_the_servers_dial(self):
        objs = self.rendered(VALUES["certmanager"])
        cert = objs["Certificate/rel-dsmoe-tls"]["spec"]
        self.assertEqual(cert["issuerRef"], {"name": "dsmoe-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"})
        self.assertIn("server auth", cert["usages"])
        self.assertIn("client auth", cert["usages"])
        for kind in COMPONENTS:
            secret = {v["name"]: v for v in self.pod(objs, kind)["volumes"]}["tls"]["secret"]["secretName"]
            self.assertEqual(secret, cert["secretName"], kind)
        gw = flags(self.pod(objs, "Deployment/rel-dsmoe-gateway")["containers"][0])
        att = flags(self.pod(objs, "StatefulSet/rel-dsmoe-attention")["containers"][0])
        self.assertNotIn("--expert-servers", gw)  # GetModelInfo asks an attention server
        dialled = gw["--attention-servers"].split(",") + att["--expert-servers"].split(",")
        dialled += ["rel-dsmoe-gateway.llm.svc.cluster.local:443", "moe.example.com:443"]
        for address in dialled:
            host = address.rsplit(":", 1)[0]
            self.assertTrue(any(dns_matches(n, host) for n in cert["dnsNames"]), (host, cert["dnsNames"]))
        self.assertEqual(gw["--tls-client-auth"], "require")
        self.assertEqual((gw["--rate-limit-rps"], gw["--rate-limit-burst"], gw["--rate-limit-tokens-per-minute"]),
                         ("5", "10", "20000"))
        # The key Secret the chart made holds the digests (the key file format the gateway reads).
        secret = objs["Secret/rel-dsmoe-api-keys"]["stringData"]["api-keys"].split()
        self.assertEqual(secret[0], "sha256:" + __import__("hashlib").sha256(b"team-a-key-0123456789").hexdigest())
        self.assertEqual(len(secret), 2)

    def test_insecure_only_when_asked(self):
        objs = self.rendered(VALUES["insecure"])
        for kind in COMPONENTS:
            spec = self.pod(objs, kind)
            f = flags(spec["containers"][0])
            self.assertIn("--insecure", f, kind)
            self.assertFalse(any(a.startswith("--tls-") for a in f), kind)
            self.assertNotIn("tls", {v["name"] for v in spec["volumes"]}, kind)
        self.assertIn("--no-auth", flags(self.pod(objs, "Deployment/rel-dsmoe-gateway")["containers"][0]))
        self.assertNotIn("Certificate/rel-dsmoe-tls", objs)

    def test_the_binaries_take_every_rendered_flag(self):
        """Each flag the chart renders exists in the real server's --help (chart and binaries agree)."""
        for values in (None, VALUES["certmanager"], VALUES["insecure"], VALUES["gpu"], VALUES["replicas"]):
            objs = self.rendered(values)
            for kind, binary in COMPONENTS.items():
                with self.subTest(values=values, kind=kind):
                    path = os.path.join(os.path.dirname(DSMOE), binary)
                    usage = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60).stdout
                    for flag in flags(self.pod(objs, kind)["containers"][0]):
                        self.assertIn(flag, usage, f"{binary} has no {flag}")

    def test_schema_refuses_bad_security_values(self):
        for bad, message in [("tls.gatewayClientAuth=maybe", "tls/gatewayClientAuth"),
                             ("auth.keys[0]=short", "auth/keys/0"), ("tls.healthPort=0", "minimum"),
                             ("tls.certManager.issuerRef.kind=Foo", "tls/certManager/issuerRef/kind")]:
            with self.subTest(bad=bad):
                r = helm("lint", CHART, "--set", bad, check=False)
                self.assertNotEqual(r.returncode, 0, bad)
                self.assertIn(message, r.stdout + r.stderr)
        r = helm("template", "rel", CHART, "--set", "tls.certManager.enabled=true", check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("needs tls.certManager.issuerRef.name", r.stderr)


class Placement(unittest.TestCase):
    def test_rendered_placement_covers_every_routed_expert(self):
        for name, values in VALUES.items():
            with self.subTest(values=name):
                v = values_of(values)
                arch, servers, copies = v["model"]["architecture"], v["experts"]["replicas"], v["experts"]["placement"]["copies"]
                p = placement_of(render(values))
                self.assertEqual(p["num_servers"], servers)
                self.assertEqual([l["layer"] for l in p["layers"]], moe_layers(arch))
                load = [0] * servers
                for layer in p["layers"]:
                    self.assertEqual(len(layer["servers"]), arch["nRoutedExperts"])
                    for e, holders in enumerate(layer["servers"]):
                        self.assertEqual(len(set(holders)), copies, (layer["layer"], e))
                        self.assertTrue(all(0 <= s < servers for s in holders))
                        for s in holders:
                            load[s] += 1
                # Round-robin spreads experts evenly: no server holds more than one extra per layer.
                self.assertLessEqual(max(load) - min(load), len(p["layers"]), load)

    def test_expert_servers_load_the_rendered_placement(self):
        """The real loader (Placement::FromJson, which requires every routed expert of every
        MoE layer to be held) accepts it, and the servers together hold copies × all experts."""
        for name, values in VALUES.items():
            with self.subTest(values=name):
                v = values_of(values)
                arch, servers, copies = v["model"]["architecture"], v["experts"]["replicas"], v["experts"]["placement"]["copies"]
                model = make_model(TMP.name, arch)
                placement = os.path.join(TMP.name, f"placement-{name}.json")
                with open(placement, "w") as f:
                    json.dump(placement_of(render(values)), f)
                held = 0
                for i in range(servers):
                    held += self.start_expert_server(model, placement, i)
                self.assertEqual(held, copies * len(moe_layers(arch)) * arch["nRoutedExperts"])

    def start_expert_server(self, model, placement, index):
        server = os.path.join(os.path.dirname(DSMOE), "dsmoe-expert-server")
        ready = os.path.join(TMP.name, f"ready-{index}")
        if os.path.exists(ready):
            os.remove(ready)
        p = subprocess.Popen([server, "--model", model, "--placement", placement, "--server-index", str(index),
                              "--threads", "1", "--ready-file", ready, "--metrics-listen", "", "--insecure"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.time() + 60
            while not os.path.exists(ready):
                if p.poll() is not None:
                    self.fail(f"expert server {index} exited: {p.stdout.read()}")
                self.assertLess(time.time(), deadline, "expert server did not start")
                time.sleep(0.05)
            # "dsmoe-expert-server I serving N routed experts on ..." (after the plain-text warning)
            for line in p.stdout:
                if line.startswith(f"dsmoe-expert-server {index} serving "):
                    return int(line.split(" serving ")[1].split()[0])
            self.fail(f"expert server {index} did not say what it serves")
        finally:
            p.terminate()
            p.wait(timeout=30)
            p.stdout.close()

    def test_local_cluster_from_the_minimal_placement_generates_like_one_process(self):
        v = values_of(VALUES["minimal"])
        model = make_model(TMP.name, v["model"]["architecture"])
        placement = os.path.join(TMP.name, "placement-cluster.json")
        with open(placement, "w") as f:
            json.dump(placement_of(render(VALUES["minimal"])), f)
        state = os.path.join(TMP.name, "cluster")
        up = subprocess.run([DSMOE, "cluster", "up", "--model", model, "--expert-servers", str(v["experts"]["replicas"]),
                             "--placement", placement, "--state-dir", state, "--json"],
                            capture_output=True, text=True, timeout=300)
        self.assertEqual(up.returncode, 0, up.stderr)
        try:
            gateway = json.loads(up.stdout)["gateway"]
            ids = "3,14,15,92,65"
            # The cluster runs with TLS, mutual TLS and an API key; the client reads them from the state.
            got = subprocess.run([DSMOE, "client", "generate", "--gateway", gateway, "--state-dir", state, "--ids", ids, "--max-tokens", "8",
                                  "--ignore-eos", "--json"], capture_output=True, text=True, timeout=120, check=True)
            want = subprocess.run([DSMOE, "generate", "--model", model, "--ids", ids, "--max-tokens", "8", "--ignore-eos",
                                   "--json", "--threads", "1"], capture_output=True, text=True, timeout=120, check=True)
            self.assertEqual(json.loads(got.stdout)["ids"], json.loads(want.stdout)["ids"])
        finally:
            subprocess.run([DSMOE, "cluster", "down", "--state-dir", state], capture_output=True, timeout=120)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsmoe", required=True)
    args, rest = ap.parse_known_args()
    DSMOE = os.path.abspath(args.dsmoe)
    for tool in (HELM, os.path.join(HERE, "node_modules", "kubernetes-models")):
        if not os.path.exists(tool):
            sys.exit(f"{tool} is missing: run tests/deploy/setup_tools.sh")
    TMP = tempfile.TemporaryDirectory(prefix="dsmoe-helm-")
    try:
        unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
    finally:
        TMP.cleanup()
