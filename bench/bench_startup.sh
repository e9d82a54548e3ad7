#!/usr/bin/env bash
# Start-up of the DeepSeekMoE 16B shape in Q8_0 (issue 18): process start to first generated
# token, cold and warm, peak RSS and decode speed of `dsmoe generate`, for each way of placing
# the weights, beside the disk's raw sequential read speed. Prints one Markdown table.
#
#   bench/bench_startup.sh [--layers 28] [--dir /tmp/dsmoe-startup] [--dsmoe build/bin/dsmoe]
#                          [--baseline OTHER_DSMOE] [--threads 2] [--tokens 32] [--keep]
#                          [--modes auto,copy,mmap] [--baseline-modes default,mmap]
#
# The checkpoint is the 16B shape (hidden 2048, 16 heads, 64 routed experts of width 1408 + 2
# shared, top-6, a first dense layer of width 10944, vocabulary 102400) at --layers layers: 28
# is the real model (17.4 GB in Q8_0: check MemAvailable first), 8 about 5 GB. It is made once
# (BF16, then `dsmoe quantize`; the BF16 copy is deleted) and removed at the end unless --keep.
#
# Cold: the checkpoint's files are dropped from the page cache (posix_fadvise DONTNEED, which
# touches nothing else) before the start. Warm: the start right after, so the page cache holds
# whatever the previous start of the same mode left there (the state a restart meets).
# --baseline runs another dsmoe binary (e.g. main's, which copies through the mapping) the same way.
set -euo pipefail

LAYERS=28 DIR=/tmp/dsmoe-startup DSMOE=build/bin/dsmoe BASELINE="" THREADS=2 TOKENS=32 KEEP=0
MODES=auto,copy,mmap BASELINE_MODES=default,mmap
while [[ $# -gt 0 ]]; do
  case "$1" in
    --layers) LAYERS=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --dsmoe) DSMOE=$2; shift 2 ;;
    --baseline) BASELINE=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --tokens) TOKENS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --modes) MODES=$2; shift 2 ;;
    --baseline-modes) BASELINE_MODES=$2; shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
MODEL=$DIR/q8-$LAYERS
if [[ ! -f $MODEL/config.json ]]; then
  mkdir -p "$DIR"
  "$DSMOE" make-model --preset medium --dtype bf16 --layers "$LAYERS" --hidden 2048 --heads 16 \
    --routed-experts 64 --expert-width 1408 --shared-experts 2 --top-k 6 --first-dense 1 \
    --intermediate 10944 --vocab 102400 --out "$DIR/bf16-$LAYERS" >&2
  "$DSMOE" quantize --model "$DIR/bf16-$LAYERS" --out "$MODEL" >&2
  rm -rf "$DIR/bf16-$LAYERS"
fi
[[ $KEEP == 1 ]] || trap 'rm -rf "$MODEL"' EXIT

/usr/bin/python3 - "$MODEL" "$DSMOE" "$BASELINE" "$THREADS" "$TOKENS" "$MODES" "$BASELINE_MODES" <<'EOF'
import glob, os, re, subprocess, sys, time

model, dsmoe, baseline, threads, tokens, modes, baseline_modes = sys.argv[1:8]
shards = sorted(glob.glob(os.path.join(model, "*.safetensors")))
size = sum(os.path.getsize(s) for s in shards)

def evict():
    for s in shards:
        fd = os.open(s, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

def disk_read():
    """Seconds to read every shard once with O_DIRECT (64 MiB requests, one stream)."""
    evict()
    t = time.monotonic()
    for s in shards:
        subprocess.run(["dd", f"if={s}", "of=/dev/null", "bs=64M", "iflag=direct", "status=none"],
                       check=True)
    return time.monotonic() - t

def start(binary, flags):
    """One `generate`: seconds to the first streamed token, decode tok/s, peak RSS, load line."""
    cmd = ["/usr/bin/time", "-v", binary, "generate", "--model", model, "--ids", "1,2,3,4",
           "--max-tokens", tokens, "--ignore-eos", "--threads", threads] + flags
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.read(1)
    ttft = time.monotonic() - t0
    p.stdout.read()
    err = p.stderr.read().decode()
    p.wait()
    if p.returncode != 0 or not first:
        sys.exit(f"{' '.join(cmd)} failed:\n{err}")
    decode = re.search(r"decode \d+ tokens in [\d.]+ s \(([\d.]+) tok/s\)", err)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    load = re.search(r"^weights: .*$", err, re.M)
    return (ttft, float(decode.group(1)) if decode else 0.0, int(rss.group(1)) * 1024 if rss else 0,
            load.group(0) if load else "")

raw = disk_read()
print(f"checkpoint {model}: {size / 1e9:.2f} GB in {len(shards)} file(s); disk: {raw:.2f} s "
      f"to read it with O_DIRECT ({size / 1e9 / raw:.2f} GB/s)")
print(f"threads {threads}, {tokens} tokens; {os.uname().release}; "
      f"{open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()}")
print()
print("| binary | mode | start | first token (s) | x disk read | peak RSS (GB) | decode tok/s | load |")
print("|---|---|---|---|---|---|---|---|")
flags_of = {"auto": [], "default": [], "copy": ["--copy-weights"], "mmap": ["--mmap-weights"]}
runs = [(dsmoe, m, flags_of[m]) for m in modes.split(",") if m]
if baseline:
    runs += [(baseline, m, flags_of[m]) for m in baseline_modes.split(",") if m]
for binary, mode, flags in runs:
    evict()
    for state in ("cold", "warm"):
        ttft, tps, rss, load = start(binary, flags)
        print(f"| {'this' if binary == dsmoe else 'baseline'} | {mode} | {state} | {ttft:.2f} | "
              f"{ttft / raw:.2f} | {rss / 1e9:.2f} | {tps:.2f} | {load[9:]} |", flush=True)
EOF
