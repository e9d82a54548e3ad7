"""An independent reference for DeepSeekMoE (v1) inference, in PyTorch float64.

It follows Hugging Face's DeepseekForCausalLM (the hub repo deepseek-ai/deepseek-moe-16b-base,
modeling_deepseek.py) operation by operation, written from its semantics rather than copied:
pre-norm blocks, RMSNorm, rotate_half RoPE (optionally linear-scaled), grouped-query attention
with a causal mask and no KV cache, SwiGLU MLPs, and the MoE layer = softmax gate over all
routed experts, top-k, optional renormalisation, weighted routed experts + shared experts.

It reads the checkpoint with its own safetensors parser (no dsmoe code), so a bug in dsmoe's
loader cannot hide in both. float64 throughout, so it is the exact value the fp32 engine
approximates.
"""
import json
import math
import os
import struct

import numpy as np
import torch

torch.set_grad_enabled(False)
DT = torch.float64


def _read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        buf = raw[base + b: base + e]
        shape = info["shape"]
        if info["dtype"] == "F32":
            arr = np.frombuffer(buf, dtype="<f4").astype(np.float64)
        elif info["dtype"] == "F16":
            arr = np.frombuffer(buf, dtype="<f2").astype(np.float64)
        elif info["dtype"] == "I8":
            arr = np.frombuffer(buf, dtype="i1").astype(np.float64)
        elif info["dtype"] == "BF16":
            u16 = np.frombuffer(buf, dtype="<u2").astype(np.uint32)
            arr = (u16 << 16).view(np.float32).astype(np.float64)
        else:
            raise ValueError(f"{path}: {name}: dtype {info['dtype']} not handled by the reference")
        out[name] = torch.from_numpy(arr.reshape(shape).copy())
    return out


def load_checkpoint(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    index = os.path.join(model_dir, "model.safetensors.index.json")
    tensors = {}
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    for fn in files:
        tensors.update(_read_safetensors(os.path.join(model_dir, fn)))
    # Q8_0 (dsmoe quantize): W[r, k] = q[r, k] * scale[r, k // 32], scales stored in F16.
    for name in [n for n in tensors if n.endswith("_scale")]:
        base = name[: -len("_scale")]
        scale = tensors.pop(name)
        tensors[base] = tensors[base] * scale.repeat_interleave(32, dim=1)
    return cfg, tensors


class Reference:
    def __init__(self, model_dir):
        self.cfg, self.w = load_checkpoint(model_dir)
        c = self.cfg
        self.H = c["hidden_size"]
        self.nh = c["num_attention_heads"]
        self.nkv = c.get("num_key_value_heads") or self.nh
        self.hd = self.H // self.nh
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.theta = c.get("rope_theta", 10000.0)
        rs = c.get("rope_scaling")
        self.rope_factor = rs["factor"] if rs else 1.0
        self.n_routed = c.get("n_routed_experts") or 0
        self.n_shared = c.get("n_shared_experts") or 0
        self.top_k = c.get("num_experts_per_tok") or 0
        self.norm_topk = c.get("norm_topk_prob", False)
        self.first_dense = c.get("first_k_dense_replace", 0)
        self.freq = c.get("moe_layer_freq", 1)
        self.tied = c.get("tie_word_embeddings", False)
        self.bias = c.get("attention_bias", False)

    def is_moe(self, i):
        return self.n_routed > 0 and i >= self.first_dense and i % self.freq == 0

    def rms_norm(self, x, w):
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + self.eps))

    def linear(self, x, name, bias=False):
        y = x @ self.w[name + ".weight"].T
        if bias:
            y = y + self.w[name + ".bias"]
        return y

    def mlp(self, x, prefix):
        g = self.linear(x, prefix + ".gate_proj")
        u = self.linear(x, prefix + ".up_proj")
        return self.linear(torch.nn.functional.silu(g) * u, prefix + ".down_proj")

    def rope(self, x, positions):
        # x: [heads, T, hd]; rotate_half: (-x2, x1)
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.hd, 2, dtype=DT) / self.hd))
        t = positions.to(DT) / self.rope_factor
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2:]
        rotated = torch.cat((-x2, x1), dim=-1)
        return x * cos + rotated * sin

    def gate(self, x, layer):
        """Returns (top-k indices sorted by descending weight, weights, k-th vs (k+1)-th margin)."""
        logits = x @ self.w[f"model.layers.{layer}.mlp.gate.weight"].T
        scores = logits.softmax(dim=-1)
        srt, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
        w = srt[:, : self.top_k]
        if self.top_k < self.n_routed:
            margin = srt[:, self.top_k - 1] - srt[:, self.top_k]
        else:
            margin = torch.full((x.shape[0],), float("inf"), dtype=DT)
        if self.top_k > 1 and self.norm_topk:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx[:, : self.top_k], w, margin

    def forward(self, ids, routing=None):
        """Logits [T, vocab] for every position; fills `routing[layer]` if a dict is given."""
        T = len(ids)
        pos = torch.arange(T)
        h = self.w["model.embed_tokens.weight"][torch.tensor(ids)]
        mask = torch.full((T, T), float("-inf"), dtype=DT).triu(1)
        for i in range(self.cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = self.rms_norm(h, self.w[p + "input_layernorm.weight"])
            q = self.linear(x, p + "self_attn.q_proj", self.bias).view(T, self.nh, self.hd).transpose(0, 1)
            k = self.linear(x, p + "self_attn.k_proj", self.bias).view(T, self.nkv, self.hd).transpose(0, 1)
            v = self.linear(x, p + "self_attn.v_proj", self.bias).view(T, self.nkv, self.hd).transpose(0, 1)
            q, k = self.rope(q, pos), self.rope(k, pos)
            rep = self.nh // self.nkv
            k = k.repeat_interleave(rep, dim=0)
            v = v.repeat_interleave(rep, dim=0)
            att = (q @ k.transpose(1, 2)) / math.sqrt(self.hd) + mask
            att = att.softmax(dim=-1)
            o = (att @ v).transpose(0, 1).reshape(T, self.nh * self.hd)
            h = h + self.linear(o, p + "self_attn.o_proj", self.bias)
            x = self.rms_norm(h, self.w[p + "post_attention_layernorm.weight"])
            if not self.is_moe(i):
                h = h + self.mlp(x, p + "mlp")
                continue
            idx, wts, margin = self.gate(x, i)
            if routing is not None:
                routing[i] = (idx, wts, margin)
            y = torch.zeros_like(x)
            for t in range(T):
                for j in range(self.top_k):
                    e = int(idx[t, j])
                    y[t] += wts[t, j] * self.mlp(x[t:t + 1], p + f"mlp.experts.{e}")[0]
            if self.n_shared > 0:
                y = y + self.mlp(x, p + "mlp.shared_experts")
            h = h + y
        h = self.rms_norm(h, self.w["model.norm.weight"])
        head = self.w["model.embed_tokens.weight"] if self.tied else self.w["lm_head.weight"]
        return h @ head.T

    def greedy(self, ids, max_tokens, stop_ids=()):
        """Greedy decoding by recomputing the whole sequence each step (no cache).
        Returns (generated ids, per-step margin between the best and second-best logit)."""
        seq = list(ids)
        out, margins = [], []
        for _ in range(max_tokens):
            logits = self.forward(seq)[-1]
            top2 = torch.topk(logits, 2)
            margins.append(float(top2.values[0] - top2.values[1]))
            nxt = int(top2.indices[0])
            out.append(nxt)
            seq.append(nxt)
            if nxt in stop_ids:
                break
        return out, margins
