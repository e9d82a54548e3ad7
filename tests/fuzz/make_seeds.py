#!/usr/bin/python3
"""Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>/): small valid inputs
of every shape the parsers accept, plus a few near misses. The tokenizers are synthetic: the
pipelines of the tokenizer families dsmoe supports (GPT-2 byte-level BPE, DeepSeek/Llama-3
split + byte-level, Llama-2 SentencePiece-style BPE with byte fallback) over a byte alphabet
and merges learned here from a short sample text. Run once; the output is checked in."""
import collections
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = ("The experts are many and small; the shared experts see every token. "
          "Fine-grained experts: 64 routed, 6 active, 2 shared. 混合专家模型 はい 123456 "
          "don't stop, it's fine!\n\n  tabs\tand newlines\r\n")


def byte_alphabet():
    """GPT-2's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def learn_merges(words, rounds):
    """Plain BPE training: merge the most frequent adjacent pair, `rounds` times."""
    seqs = [list(w) for w in words]
    merges = []
    for _ in range(rounds):
        pairs = collections.Counter(p for s in seqs for p in zip(s, s[1:]))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merges.append(f"{a} {b}")
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if s[i] == a and s[i + 1] == b:
                    s[i:i + 2] = [a + b]
                i += 1
    return merges


def byte_level(pre_tokenizer, post_processor, added, name):
    alpha = byte_alphabet()
    words = ["".join(alpha[b] for b in w.encode()) for w in SAMPLE.replace(" ", " \x00").split("\x00")]
    merges = learn_merges(words, 60)
    vocab = {alpha[b]: i for i, b in enumerate(range(256))}
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    tokens = [dict(id=len(vocab) + i, content=c, single_word=False, lstrip=False, rstrip=False, normalized=False,
                   special=True) for i, c in enumerate(added)]
    return dict(version="1.0", truncation=None, padding=None, added_tokens=tokens, normalizer=None,
                pre_tokenizer=pre_tokenizer, post_processor=post_processor,
                decoder=dict(type="ByteLevel", add_prefix_space=True, trim_offsets=True, use_regex=True),
                model=dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix=None,
                           end_of_word_suffix=None, fuse_unk=False, byte_fallback=False, vocab=vocab, merges=merges))


def sentencepiece_like():
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    text = "▁" + SAMPLE.replace(" ", "▁")
    chars = sorted(set(text))
    words = ["▁" + w for w in SAMPLE.split(" ") if w]
    merges = learn_merges(words, 60)
    vocab = {p: i for i, p in enumerate(pieces)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    special = [dict(id=i, content=c, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
               for i, c in enumerate(pieces[:3])]
    return dict(version="1.0", truncation=None, padding=None, added_tokens=special,
                normalizer=dict(type="Sequence", normalizers=[dict(type="Prepend", prepend="▁"),
                                                              dict(type="Replace", pattern=dict(String=" "), content="▁")]),
                pre_tokenizer=None,
                post_processor=dict(type="TemplateProcessing",
                                    single=[dict(SpecialToken=dict(id="<s>", type_id=0)), dict(Sequence=dict(id="A", type_id=0))],
                                    pair=[dict(SpecialToken=dict(id="<s>", type_id=0)), dict(Sequence=dict(id="A", type_id=0)),
                                          dict(SpecialToken=dict(id="<s>", type_id=1)), dict(Sequence=dict(id="B", type_id=1))],
                                    special_tokens={"<s>": dict(id="<s>", ids=[1], tokens=["<s>"])}),
                decoder=dict(type="Sequence", decoders=[dict(type="Replace", pattern=dict(String="▁"), content=" "),
                                                        dict(type="ByteFallback"), dict(type="Fuse"),
                                                        dict(type="Strip", content=" ", start=1, stop=0)]),
                model=dict(type="BPE", dropout=None, unk_token="<unk>", continuing_subword_prefix=None,
                           end_of_word_suffix=None, fuse_unk=True, byte_fallback=True, vocab=vocab, merges=merges))


SPLIT_DEEPSEEK = [
    dict(type="Split", pattern=dict(Regex="\\p{N}{1,3}"), behavior="Isolated", invert=False),
    dict(type="Split", pattern=dict(Regex="[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"), behavior="Isolated", invert=False),
    dict(type="Split", pattern=dict(Regex="[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"),
         behavior="Isolated", invert=False),
    dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=False)]
BYTE_LEVEL_POST = dict(type="ByteLevel", add_prefix_space=True, trim_offsets=False, use_regex=True)


def tokenizers():
    gpt2 = byte_level(dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=True), BYTE_LEVEL_POST,
                      ["<|endoftext|>"], "gpt2")
    deepseek = byte_level(dict(type="Sequence", pretokenizers=SPLIT_DEEPSEEK), dict(
        type="TemplateProcessing", single=[dict(SpecialToken=dict(id="<|bos|>", type_id=0)), dict(Sequence=dict(id="A", type_id=0))],
        pair=[dict(Sequence=dict(id="A", type_id=0)), dict(Sequence=dict(id="B", type_id=1))],
        special_tokens={"<|bos|>": dict(id="<|bos|>", ids=[0], tokens=["<|bos|>"])}), ["<|bos|>", "<|eos|>"], "deepseek")
    # The template names the BOS id: point it at the added token.
    deepseek["post_processor"]["special_tokens"]["<|bos|>"]["ids"] = [deepseek["added_tokens"][0]["id"]]
    digits = byte_level(dict(type="Sequence", pretokenizers=[dict(type="Digits", individual_digits=True),
                                                               dict(type="WhitespaceSplit"),
                                                               dict(type="ByteLevel", add_prefix_space=True, use_regex=False)]),
                        None, ["<pad>"], "digits")
    digits["normalizer"] = dict(type="Sequence", normalizers=[dict(type="NFKC"), dict(type="Lowercase")])
    return dict(gpt2=gpt2, deepseek=deepseek, sentencepiece=sentencepiece_like(), digits=digits)


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def safetensors(tensors, metadata=None, pad=True):
    header, blobs, off = {}, b"", 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, size in tensors:
        header[name] = dict(dtype=dtype, shape=shape, data_offsets=[off, off + size])
        blobs += bytes(range(size % 256)) * (size // 256) + bytes(range(size % 256))
        blobs = blobs[:off + size]
        off += size
    text = json.dumps(header).encode()
    if pad:
        text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + blobs


def main():
    for name, tok in tokenizers().items():
        text = json.dumps(tok, ensure_ascii=False)
        write("tokenizer_json", f"{name}.json", text)
        with open(os.path.join(HERE, "tokenizers", f"{name}.json"), "w") as f:
            f.write(text)
    # tokenizer_encode inputs: byte 0 picks the tokenizer and flags, the rest is the text.
    for i, text in enumerate(["Hello world", SAMPLE, "混合专家 123 <|endoftext|> x", "  \t\n", "é\u0301 ﬁ Ⅻ", "<s>ab</s>",
                              "don't 1234567 !!"]):
        write("tokenizer_encode", f"text{i}", bytes([i]) + text.encode())
    write("safetensors", "two_tensors", safetensors([("a", "F32", [2, 3], 24), ("b", "BF16", [4], 8)], {"format": "pt"}))
    write("safetensors", "empty_tensor", safetensors([("z", "F16", [0, 5], 0), ("u", "U8", [3], 3)]))
    write("safetensors", "unaligned", safetensors([("i", "I64", [1], 8)], pad=False))
    write("safetensors", "no_tensors", safetensors([]))
    write("safetensors", "truncated", safetensors([("a", "F32", [2, 3], 24)])[:-5])
    model = dict(model_type="deepseek", vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2,
                 n_routed_experts=16, num_experts_per_tok=4, first_k_dense_replace=1, moe_layer_freq=1,
                 norm_topk_prob=False, scoring_func="softmax", topk_method="greedy", hidden_act="silu",
                 rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4096,
                 tie_word_embeddings=False, attention_bias=False, bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16")
    write("config", "tiny.json", json.dumps(model, indent=1))
    write("config", "group_limited.json", json.dumps(dict(model, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                                          rope_scaling=dict(type="linear", factor=2.0), eos_token_id=[1, 2])))
    write("config", "dense.json", json.dumps(dict(model, n_routed_experts=None, num_experts_per_tok=None)))
    write("config", "generation.json", json.dumps(dict(model, temperature=0.7, top_p=0.9, top_k=50, do_sample=True)))
    write("config", "bad_type.json", json.dumps(dict(model, hidden_size="64")))

    requests()
    data_plane()
    http_requests()


def data_plane():
    """Expert data-plane streams: a limits byte (1: H 64, 16 tokens, 96 assignments), a hello,
    request frames (expert-server/data_plane_frame.h), maybe a reply header."""
    H = 64

    def hello(hidden=H, magic=0x4C454844, version=1):
        return struct.pack("<4I", magic, version, hidden, 0)

    def request(tokens, assignments, layer=1, magic=0x51455244, payload=None):
        size = tokens * H * 4 + assignments * 12 if payload is None else payload
        body = struct.pack(f"<{tokens * H}f", *([0.5] * (tokens * H)))
        body += struct.pack(f"<{assignments}I", *[i % max(tokens, 1) for i in range(assignments)])
        body += struct.pack(f"<{assignments}I", *[i % 8 for i in range(assignments)])
        body += struct.pack(f"<{assignments}f", *([0.25] * assignments))
        return struct.pack("<4IQ", magic, layer, tokens, assignments, size) + body

    reply = struct.pack("<IHHdQ", 0x50455244, 0, 0, 0.001, H * 4)
    write("data_plane", "one_token", b"\x01" + hello() + request(1, 6) + reply)
    write("data_plane", "two_frames", b"\x01" + hello() + request(2, 12) + request(3, 18))
    write("data_plane", "bad_hello", b"\x01" + hello(magic=0x12345678))
    write("data_plane", "other_hidden", b"\x01" + hello(hidden=512))
    write("data_plane", "too_many_tokens", b"\x01" + hello() + struct.pack("<4IQ", 0x51455244, 1, 17, 0, 17 * H * 4))
    write("data_plane", "bad_length", b"\x01" + hello() + request(1, 1, payload=1 << 40))
    write("data_plane", "truncated", (b"\x01" + hello() + request(2, 4))[:-9])
    write("data_plane", "error_reply", b"\x01" + hello() + struct.pack("<IHHdQ", 0x50455244, 3, 1, 0, 5) + b"oops!")


def requests():
    """GenerateRequest messages (protobuf binary) for the request validation target; needs the
    Python stubs of a normal build (build/proto/python)."""
    import sys
    sys.path.insert(0, os.path.join(HERE, "..", "..", "build", "proto", "python"))
    from dsmoe.v1 import gateway_pb2 as pb
    ids = pb.TokenIds(ids=[1, 2, 3])
    cases = dict(
        ids=pb.GenerateRequest(token_ids=ids, max_tokens=8, temperature=0.0, ignore_eos=True),
        text=pb.GenerateRequest(text="The experts are", max_tokens=16, top_p=0.9, top_k=40, seed=7,
                                stop=["\n", "are"], stop_token_ids=[2]),
        sampled=pb.GenerateRequest(token_ids=ids, temperature=0.7, top_p=1.0, model="tiny"),
        empty=pb.GenerateRequest(),
        bad_vocab=pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 100000])),
        bad_top_p=pb.GenerateRequest(token_ids=ids, top_p=float("nan")),
        bad_temperature=pb.GenerateRequest(token_ids=ids, temperature=float("inf")),
        other_model=pb.GenerateRequest(token_ids=ids, model="gpt-9"),
        empty_stop=pb.GenerateRequest(text="x", stop=[""]),
        long_prompt=pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(100)))),
        invalid_utf8=pb.GenerateRequest(text="ok"),
    )
    for name, msg in cases.items():
        data = msg.SerializeToString()
        if name == "invalid_utf8":  # proto3 strings must be UTF-8: a parser must refuse or cope
            data = data.replace(b"ok", b"\xff\xfe")
        write("request", name, data)


def http_requests():
    """JSON bodies of /v1/completions and /v1/chat/completions for the HTTP request parsing
    target (each input is tried as both): valid ones of every prompt shape and parameter, wrong
    types, out-of-range and huge numbers, unicode, and nested junk."""
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    cases = dict(
        completion_text=dict(model="tiny", prompt="The experts are", max_tokens=8, temperature=0.0),
        completion_ids=dict(prompt=[1, 2, 3], max_tokens=4, ignore_eos=True, seed=7, n=2),
        completion_list=dict(prompt=["a", "b"], n=2, stop=["\n", "are"], logprobs=5, top_p=0.9),
        completion_id_lists=dict(prompt=[[1, 2], [3]], echo=True, top_k=-1, stop_token_ids=[2]),
        completion_stream=dict(prompt="x", stream=True, stream_options={"include_usage": True},
                               logprobs=0, best_of=1, user="u", presence_penalty=0,
                               frequency_penalty=0.0, logit_bias={}),
        chat=dict(model="tiny", messages=chat, max_completion_tokens=16, logprobs=True,
                  top_logprobs=20, response_format={"type": "text"}, seed=-1),
        chat_parts=dict(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}]},
                                  {"role": "assistant", "content": None},
                                  {"role": "developer", "content": "d"}],
                        add_generation_prompt=False, stream=True),
        chat_unicode=dict(messages=[{"role": "user", "content": "混合专家 はい é\u0301 \U0001F600 \u0000"}],
                          stop="专家"),
        wrong_types=dict(prompt=5, messages="hi", max_tokens="8", temperature=[], top_p={}, n=True,
                         stream="yes", stop=3, logprobs="1"),
        huge_numbers=dict(prompt=[18446744073709551615, 4294967296], max_tokens=1e400, n=99999999999,
                          temperature=1e308, top_p=1.0000001, seed=18446744073709551615, top_k=2**63,
                          top_logprobs=21),
        negative=dict(prompt="x", max_tokens=-1, temperature=-0.0, top_p=0, n=0, logprobs=-1),
        unknown=dict(prompt="x", tools=[], functions=None),
        other_model=dict(model="gpt-9", prompt="x", messages=chat),
        nested_junk=dict(prompt=[[[[[[1]]]]], {"a": [None]}], messages=[[{"role": "user"}], 7, None],
                         stream_options={"include_usage": "yes", "x": 1}, stop=[["a"]] * 17),
        empty_prompts=dict(prompt=[[]], messages=[{"role": "user", "content": ""}]),
        bad_roles=dict(messages=[{"role": "wizard", "content": "x"}, {"content": "no role"}]),
        echo_logprobs=dict(prompt="x", echo=True, logprobs=1),
        prompts_times_n=dict(prompt=["a", "b", "c"], n=4),
    )
    for name, body in cases.items():
        write("http_request", name, json.dumps(body, ensure_ascii=False))
    raw = {
        "not_json": b"{\"prompt\": ",
        "not_object": b"[1, 2, 3]",
        "empty": b"",
        "invalid_utf8": b'{"prompt": "\xff\xfe", "messages": [{"role": "user", "content": "\xc3"}]}',
        "deep_nesting": b"[" * 2000 + b"]" * 2000,
        # A message's extra field nested deep: copied and rendered, never recursed into.
        "deep_message": b'{"messages": [{"role": "user", "content": "x", "name": ' + b"[" * 32000 + b"]" * 32000
                        + b"}]}",
        "duplicate_keys": b'{"prompt": "a", "prompt": 1, "n": 1, "n": 2}',
        "numbers": b'{"prompt": [1e2, 1.5, -0, 0.0], "max_tokens": 1.0, "temperature": NaN}',
    }
    for name, data in raw.items():
        write("http_request", name, data)


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["http_request"]:  # this target's seeds alone
        http_requests()
    else:
        main()
