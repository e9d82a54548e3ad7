// Validates Kubernetes manifests (multi-document YAML, e.g. `helm template` output) offline
// against the API schemas bundled in npm kubernetes-models (core Kubernetes, ~1.34) and
// @kubernetes-models/prometheus-operator (ServiceMonitor, PodMonitor) and
// @kubernetes-models/cert-manager (Certificate). `kubectl apply
// --dry-run=client` cannot do this: it needs a cluster for API discovery.
// Usage: node validate_k8s.mjs FILE.yaml... ('-' = stdin). Exit 1 on any invalid object.
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";

// apiVersion → the module holding its models.
async function modelsFor(apiVersion) {
  if (apiVersion.startsWith("monitoring.coreos.com/")) {
    return import(`@kubernetes-models/prometheus-operator/${apiVersion}`);
  }
  if (apiVersion.startsWith("cert-manager.io/")) {
    return import(`@kubernetes-models/cert-manager/${apiVersion}`);
  }
  return import(`kubernetes-models/${apiVersion}`);
}

const inputs = process.argv.slice(2);
if (inputs.length === 0) inputs.push("-");
let errors = 0, checked = 0;
for (const file of inputs) {
  for (const doc of parseAllDocuments(readFileSync(file === "-" ? 0 : file, "utf8"))) {
    if (doc.errors.length) {
      console.error(`${file}: YAML error: ${doc.errors[0].message}`);
      errors++;
      continue;
    }
    const obj = doc.toJS();
    if (!obj) continue;  // an empty document (a template that rendered nothing)
    const { apiVersion, kind } = obj;
    const where = `${file}: ${kind}/${obj?.metadata?.name}`;
    if (!apiVersion || !kind) {
      console.error(`${where}: missing apiVersion/kind`);
      errors++;
      continue;
    }
    let cls;
    try { cls = (await modelsFor(apiVersion))[kind]; } catch { cls = undefined; }
    if (!cls) {
      console.error(`${where}: unknown apiVersion/kind ${apiVersion} ${kind}`);
      errors++;
      continue;
    }
    try {
      new cls(obj).validate();
      checked++;
    } catch (e) {
      console.error(`${where}: INVALID: ${e.message}`);
      errors++;
    }
  }
}
console.log(`validated ${checked} object(s), ${errors} error(s)`);
process.exit(errors ? 1 : 0);
