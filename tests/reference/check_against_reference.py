#!/usr/bin/python3
"""Checks the `dsmoe` tool against the float64 PyTorch reference for one model variant:

  * `dsmoe logits`: every position within 1e-4 relative L2 of the reference;
  * `dsmoe route --json`: the same top-k experts (as a set, in descending weight) with weights
    within 1e-5, except where the reference itself shows a near-tie (reported, not hidden);
  * `dsmoe generate --json` (greedy, KV cache): the same tokens as the reference's greedy
    decoding that recomputes the whole sequence every step.

These run with an F32 KV cache (--kv-dtype f32), whatever the checkpoint. Then a BF16 KV cache
(--kv-dtype bf16, the default for BF16/F16/Q8_0 checkpoints) is held to issue 19's bound: logits
within 1e-2 relative L2 of the reference, and the same top-1 token at 99% of positions at
least, a different one only at a near-tie of the reference. A gate whose top-k is a near-tie
(margin below 1e-3) may swap an expert under the BF16 perturbation: a discrete change, not a
rounding error, which later positions see through the keys and values they attend to. So
`dsmoe route --kv-dtype bf16` is compared with the reference's routing too: a swap must be at
such a near-tie, and from the first swapped position on, positions are held to the top-1 check
only (reported).

Usage: check_against_reference.py --dsmoe PATH --variant NAME [--keep DIR]
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepseek_reference import Reference  # noqa: E402

# variant → (make-model flags, prompt length)
VARIANTS = {
    "tiny_f32": (["--preset", "tiny", "--dtype", "f32"], 12),
    "tiny_bf16": (["--preset", "tiny", "--dtype", "bf16"], 12),
    "tiny_f16": (["--preset", "tiny", "--dtype", "f16"], 12),
    "gshard_f32": (["--preset", "gshard", "--dtype", "f32"], 12),
    "gshard_bf16": (["--preset", "gshard", "--dtype", "bf16"], 12),
    "gqa": (["--preset", "tiny", "--kv-heads", "2", "--dtype", "bf16"], 12),
    "mqa": (["--preset", "tiny", "--kv-heads", "1"], 12),
    "tied_embeddings": (["--preset", "tiny", "--tie-embeddings", "true"], 12),
    "attention_bias": (["--preset", "tiny", "--attention-bias", "true", "--dtype", "bf16"], 12),
    "moe_layer_freq_2": (["--preset", "tiny", "--layers", "5", "--moe-layer-freq", "2"], 12),
    "norm_topk_prob": (["--preset", "tiny", "--norm-topk-prob", "true", "--dtype", "bf16"], 12),
    "sharded": (["--preset", "tiny", "--shards", "3", "--dtype", "bf16"], 12),
    "rope_linear": (["--preset", "tiny", "--rope-linear-factor", "2.5"], 40),
    # Q8_0 weights (dsmoe quantize of a BF16 checkpoint), against the dequantized reference.
    "tiny_q8": (["--preset", "tiny", "--dtype", "bf16", "QUANTIZE"], 12),
    "gshard_q8": (["--preset", "gshard", "--dtype", "bf16", "QUANTIZE"], 12),
    # Longer than the engine's 256-token batch: prefill runs in chunks through the KV cache.
    "long_prompt_chunked": (["--preset", "tiny", "--layers", "2", "--max-position", "512"], 300),
}

LOGITS_RTOL = 1e-4
BF16_KV_LOGITS_RTOL = 1e-2
BF16_KV_NEAR_TIE = 1e-3  # a gate margin below this may swap an expert under BF16 KV
ROUTE_ATOL = 1e-5
NEAR_TIE = 1e-5  # a router-score gap below this may legitimately flip between fp32 and fp64


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"FAILED: {' '.join(cmd)}\nstdout: {r.stdout}\nstderr: {r.stderr}")
    return r.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsmoe", required=True)
    ap.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    ap.add_argument("--keep", help="write the checkpoint here instead of a temporary directory")
    a = ap.parse_args()
    flags, prompt_len = VARIANTS[a.variant]
    failures = []

    with tempfile.TemporaryDirectory() as tmp:
        model = a.keep or os.path.join(tmp, "model")
        quantize = "QUANTIZE" in flags
        make_flags = [f for f in flags if f != "QUANTIZE"]
        if quantize:
            source = os.path.join(tmp, "source")
            run([a.dsmoe, "make-model", *make_flags, "--seed", "7", "--out", source])
            run([a.dsmoe, "quantize", "--model", source, "--out", model])
        else:
            run([a.dsmoe, "make-model", *make_flags, "--seed", "7", "--out", model])
        ref = Reference(model)
        vocab = ref.cfg["vocab_size"]
        rng = random.Random(zlib.crc32(a.variant.encode()))
        ids = [rng.randrange(2, vocab) for _ in range(prompt_len)]
        ids_arg = ",".join(map(str, ids))

        # 1) logits at every position
        npy = os.path.join(tmp, "logits.npy")
        run([a.dsmoe, "logits", "--model", model, "--ids", ids_arg, "--out", npy, "--kv-dtype", "f32"])
        got = np.load(npy).astype(np.float64)
        routing = {}
        want = ref.forward(ids, routing).numpy()
        if got.shape != want.shape:
            failures.append(f"logits shape {got.shape} != reference {want.shape}")
        else:
            rel = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
            print(f"logits: {len(ids)} positions, max relative L2 error {rel.max():.2e} (limit {LOGITS_RTOL:.0e})")
            for t in np.nonzero(rel > LOGITS_RTOL)[0]:
                failures.append(f"logits at position {t}: relative L2 error {rel[t]:.3e} > {LOGITS_RTOL}")

        # 2) routing
        route = json.loads(run([a.dsmoe, "route", "--model", model, "--ids", ids_arg, "--json",
                                "--kv-dtype", "f32"]))
        got_layers = {l["layer"]: l["positions"] for l in route["layers"]}
        if sorted(got_layers) != sorted(routing):
            failures.append(f"route: MoE layers {sorted(got_layers)} != reference {sorted(routing)}")
        max_w_err, ties, checked = 0.0, 0, 0
        for layer, (idx, wts, margin) in routing.items():
            for t, pos in enumerate(got_layers.get(layer, [])):
                want_e = [int(e) for e in idx[t]]
                want_w = [float(w) for w in wts[t]]
                if float(margin[t]) < NEAR_TIE:
                    ties += 1
                    print(f"route: layer {layer} position {t}: near-tie (margin {float(margin[t]):.1e}); not compared")
                    continue
                checked += 1
                if sorted(pos["experts"]) != sorted(want_e):
                    failures.append(f"route: layer {layer} position {t}: experts {pos['experts']} != reference {want_e}")
                    continue
                if pos["weights"] != sorted(pos["weights"], reverse=True):
                    failures.append(f"route: layer {layer} position {t}: weights not in descending order")
                by_expert = dict(zip(want_e, want_w))
                for e, w in zip(pos["experts"], pos["weights"]):
                    err = abs(w - by_expert[e])
                    max_w_err = max(max_w_err, err)
                    if err > ROUTE_ATOL:
                        failures.append(f"route: layer {layer} position {t} expert {e}: weight {w} vs {by_expert[e]}")
        print(f"route: {checked} (layer, position) choices identical, max weight error {max_w_err:.1e}, {ties} near-ties skipped")
        if checked == 0 and routing:
            failures.append("route: nothing compared")

        # 3) greedy generation with the KV cache vs recomputation from scratch
        n_gen = 6
        gen = json.loads(run([a.dsmoe, "generate", "--model", model, "--ids", ids_arg, "--max-tokens",
                              str(n_gen), "--ignore-eos", "--json", "--kv-dtype", "f32"]))
        want_ids, margins = ref.greedy(ids, n_gen)
        for step, (g, w) in enumerate(zip(gen["ids"], want_ids)):
            if g != w:
                if margins[step] < 1e-4:
                    print(f"generate: step {step} diverged at a logit near-tie (margin {margins[step]:.1e})")
                else:
                    failures.append(f"generate: step {step}: token {g} != reference {w} (margin {margins[step]:.3f}); "
                                    f"got {gen['ids']} want {want_ids}")
                break
        else:
            if len(gen["ids"]) != n_gen or gen["finish_reason"] != "length":
                failures.append(f"generate: {gen} should hold {n_gen} ids and finish by length")
            print(f"generate: {len(gen['ids'])} greedy tokens identical to the reference: {gen['ids']}")

        # 4) BF16 KV cache: within issue 19's bound of the reference.
        route16 = json.loads(run([a.dsmoe, "route", "--model", model, "--ids", ids_arg, "--json",
                                  "--kv-dtype", "bf16"]))
        first_swap = len(ids)
        for l in route16["layers"]:
            idx, _, margin = routing[l["layer"]]
            for t, pos in enumerate(l["positions"]):
                if sorted(pos["experts"]) == sorted(int(e) for e in idx[t]):
                    continue
                print(f"bf16 KV: layer {l['layer']} position {t}: an expert swapped at a gate margin of "
                      f"{float(margin[t]):.1e}")
                first_swap = min(first_swap, t)
                if float(margin[t]) >= BF16_KV_NEAR_TIE:
                    failures.append(f"bf16 KV: layer {l['layer']} position {t}: experts {pos['experts']} != "
                                    f"reference {[int(e) for e in idx[t]]} at margin {float(margin[t]):.3e}, "
                                    f"not a near-tie")
        npy16 = os.path.join(tmp, "logits_bf16_kv.npy")
        run([a.dsmoe, "logits", "--model", model, "--ids", ids_arg, "--out", npy16, "--kv-dtype", "bf16"])
        got16 = np.load(npy16).astype(np.float64)
        if got16.shape == want.shape:
            rel16 = np.linalg.norm(got16 - want, axis=1) / np.linalg.norm(want, axis=1)
            for t in np.nonzero(rel16[:first_swap] > BF16_KV_LOGITS_RTOL)[0]:
                failures.append(f"bf16 KV: logits at position {t}: relative L2 error {rel16[t]:.3e} > "
                                f"{BF16_KV_LOGITS_RTOL}")
            agree = 0
            for t in range(len(ids)):
                top_want, top_got = int(np.argmax(want[t])), int(np.argmax(got16[t]))
                if top_want == top_got:
                    agree += 1
                    continue
                # A near-tie: the reference's own gap between the two is within the error.
                gap = want[t][top_want] - want[t][top_got]
                if gap > 2 * np.abs(got16[t] - want[t]).max():
                    failures.append(f"bf16 KV: position {t}: top-1 {top_got} != reference {top_want} "
                                    f"(reference gap {gap:.3e}, not a near-tie)")
            bounded = f"{rel16[:first_swap].max():.2e}" if first_swap > 0 else "-"
            after = (f"; from position {first_swap} on (after an expert swap) up to "
                     f"{rel16[first_swap:].max():.2e}" if first_swap < len(ids) else "")
            print(f"bf16 KV: max relative L2 error {bounded} (limit {BF16_KV_LOGITS_RTOL:.0e}){after}, "
                  f"top-1 agreement {agree}/{len(ids)}")
            if agree < 0.99 * len(ids) and len(ids) >= 100:
                failures.append(f"bf16 KV: top-1 agreement {agree}/{len(ids)} below 99%")
        else:
            failures.append(f"bf16 KV: logits shape {got16.shape} != reference {want.shape}")

    if failures:
        print("\n".join(["FAILURES:"] + failures))
        sys.exit(1)
    print(f"variant {a.variant}: OK")


if __name__ == "__main__":
    main()
