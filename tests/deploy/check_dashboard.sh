#!/usr/bin/env bash
# Type-checks Grafana dashboard JSON files against Grafana's own dashboard types
# (@grafana/schema, the schema of current Grafana) with the TypeScript compiler: each file is
# wrapped as `(<json>) satisfies Json<Dashboard>`, so an unknown field, a wrong type or a
# missing required field is a compile error naming the path. Json<T> is T with every string
# enum replaced by the union of its values (what JSON holds: "continuous-BlYlRd", not
# FieldColorModeId.ContinuousBlYlRd). No Grafana server is needed.
# Usage: tests/deploy/check_dashboard.sh DASHBOARD.json...   (after setup_tools.sh)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
TSC="$HERE/node_modules/.bin/tsc"
[[ -x "$TSC" ]] || { echo "check_dashboard.sh: run tests/deploy/setup_tools.sh first" >&2; exit 2; }
# Inside HERE so that node_modules resolves; removed on exit.
TMP="$(mktemp -d "$HERE/.dashcheck.XXXXXX")"; trap 'rm -rf "$TMP"' EXIT
i=0
for f in "$@"; do
  i=$((i + 1))
  # The parentheses keep `satisfies` from starting a statement of its own after the JSON.
  { echo 'import type { Dashboard } from "@grafana/schema";'
    echo 'type Json<T> = T extends string ? `${T}` : T extends (infer U)[] ? Json<U>[] :'
    echo '  T extends object ? { [K in keyof T]: Json<T[K]> } : T;'
    printf 'export const d%d = (\n' "$i"; cat "$f"; echo ') satisfies Json<Dashboard>;'; } > "$TMP/d$i.ts"
done
cat > "$TMP/tsconfig.json" <<JSON
{"compilerOptions": {"strict": true, "noEmit": true, "module": "esnext", "moduleResolution": "bundler",
  "target": "es2022", "skipLibCheck": true, "types": []}, "include": ["*.ts"]}
JSON
"$TSC" -p "$TMP/tsconfig.json"
echo "dashboards OK: $*"
