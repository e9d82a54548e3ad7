#!/usr/bin/env bash
# Checks the locking contracts (ABSL_GUARDED_BY, ABSL_EXCLUSIVE_LOCKS_REQUIRED, ...) with clang's
# thread-safety analysis over every C++ source of the project. Not a second build: it configures
# ./build-tsa (or $DSMOE_TSA_BUILD_DIR) with clang once, generates the protobuf headers there,
# then runs `clang++ -fsyntax-only` with each file's flags from compile_commands.json. Only the
# thread-safety warnings are on, as errors: a violation fails the script, nothing else does.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD_DIR=${DSMOE_TSA_BUILD_DIR:-build-tsa}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_COMPILER=clang \
  -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_EXPORT_COMPILE_COMMANDS=ON >/dev/null
# The generated protobuf/gRPC headers are all the sources need from a build.
mapfile -t generated < <(ninja -C "$BUILD_DIR" -t targets all | sed -n 's/^\([^:]*\.pb\.h\): .*/\1/p')
ninja -C "$BUILD_DIR" "${generated[@]}" >/dev/null

# One command per project .cc (not the generated ones, not CUDA): the compile command with its
# output dropped, -fsyntax-only, and every warning off except the thread-safety ones.
commands="$BUILD_DIR/thread-safety-commands.txt"
python3 - "$ROOT" "$BUILD_DIR/compile_commands.json" >"$commands" <<'EOF'
import json, os, shlex, sys
root, db = sys.argv[1], sys.argv[2]
build = os.path.realpath(os.path.dirname(db))
for entry in json.load(open(db)):
    src = os.path.realpath(os.path.join(entry["directory"], entry["file"]))
    if not src.endswith(".cc") or not src.startswith(root + "/") or src.startswith(build + "/"):
        continue
    args = entry.get("arguments") or shlex.split(entry["command"])
    out, skip = [], False
    for a in args[1:]:
        if skip:
            skip = False
        elif a in ("-o", "-MF", "-MT", "-MQ"):
            skip = True
        elif a not in ("-c", "-MD", "-MMD") and not a.startswith("-Werror"):
            out.append(a)
    cmd = ["clang++", "-fsyntax-only", *out, "-Wno-everything", "-Wthread-safety",
           "-Werror=thread-safety"]
    print("cd " + shlex.quote(entry["directory"]) + " && " + shlex.join(cmd))
EOF
echo "thread-safety analysis of $(wc -l <"$commands") files"
if ! xargs -d '\n' -P "$(nproc)" -I{} sh -c '{}' <"$commands"; then
  echo "thread-safety analysis failed: see the errors above" >&2
  exit 1
fi
echo "thread-safety analysis passed"
