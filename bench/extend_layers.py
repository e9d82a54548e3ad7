#!/usr/bin/env python3
"""Writes a deeper copy of a DeepSeekMoE checkpoint without its BF16 original: layers past the
source's last are copies of its MoE layers (1..L-1 in turn), so a 28-layer Q8_0 16B shape
(17.4 GB) can be made from an 8-layer one without writing 33 GB of BF16 first (the disk of a
shared box may not hold both). The weights are real quantized values, only repeated; start-up
and decode speed do not depend on which values they are.

    bench/extend_layers.py SRC_DIR DST_DIR LAYERS
"""
import json, os, re, shutil, struct, sys

src, dst, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
src_layers = config["num_hidden_layers"]
first_dense = config.get("first_k_dense_replace", 0)
assert src_layers > first_dense, "the source needs at least one MoE layer"
path = os.path.join(src, "model.safetensors")
with open(path, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
data_start = 8 + n
meta = header.pop("__metadata__", None)
pattern = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
moe_layers = list(range(first_dense, src_layers))
by_layer = {}  # layer → [(suffix, name, entry)] in file order
out = {}  # name → (source name, entry): the source in file order, deeper layers appended
for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
    m = pattern.match(name)
    if m:
        by_layer.setdefault(int(m.group(1)), []).append((m.group(2), name, e))
    if not (m is None and name in ("lm_head.weight", "model.norm.weight")):
        out[name] = (name, e)
for layer in range(src_layers, layers):
    from_layer = moe_layers[(layer - src_layers) % len(moe_layers)]
    for suffix, name, e in by_layer[from_layer]:
        out[f"model.layers.{layer}.{suffix}"] = (name, e)
for name in ("model.norm.weight", "lm_head.weight"):
    if name in header:
        out[name] = (name, header[name])
new_header, offset = {}, 0
if meta is not None:
    new_header["__metadata__"] = meta
for name, (_, e) in out.items():
    size = e["data_offsets"][1] - e["data_offsets"][0]
    new_header[name] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [offset, offset + size]}
    offset += size
text = json.dumps(new_header).encode()
text += b" " * ((8 - len(text) % 8) % 8)
os.makedirs(dst, exist_ok=True)
with open(path, "rb") as fin, open(os.path.join(dst, "model.safetensors"), "wb") as fout:
    fout.write(struct.pack("<Q", len(text)))
    fout.write(text)
    for name, (src_name, e) in out.items():
        begin, end = e["data_offsets"]
        fin.seek(data_start + begin)
        left = end - begin
        while left > 0:
            chunk = fin.read(min(left, 64 << 20))
            fout.write(chunk)
            left -= len(chunk)
config["num_hidden_layers"] = layers
with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
    if os.path.exists(os.path.join(src, extra)):
        shutil.copy(os.path.join(src, extra), dst)
print(f"wrote {dst}: {layers} layers, {offset / 1e9:.2f} GB of tensor data")
