#!/usr/bin/env python3
"""Streams a completion from a dsmoe gateway with the Python gRPC stubs, over TLS with an API
key: what an application does. proto/README.md says how to generate the stubs.

    PYTHONPATH=build/proto/python examples/python/generate.py --gateway 127.0.0.1:50051 \\
        --ca .dsmoe-cluster/tls/ca.pem --api-key-file .dsmoe-cluster/tls/api-key --prompt "Hello"

Prints the text as it arrives (token ids if the model has no tokenizer), then the finish reason
and token counts on stderr; exits 1 with the gRPC status on an error.
"""
import argparse
import sys

import grpc

from dsmoe.v1 import gateway_pb2, gateway_pb2_grpc


def channel(args):
    if args.insecure:
        return grpc.insecure_channel(args.gateway)
    with open(args.ca, "rb") as f:
        ca = f.read()
    cert = key = None
    if args.cert:  # only if the gateway asks for client certificates
        with open(args.cert, "rb") as f:
            cert = f.read()
        with open(args.key, "rb") as f:
            key = f.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    if args.api_key_file:
        with open(args.api_key_file) as f:
            api_key = f.read().strip()
        # Sent as `authorization: Bearer <key>` on every call.
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(api_key))
    return grpc.secure_channel(args.gateway, creds)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gateway", required=True, help="host:port")
    ap.add_argument("--ca", help="PEM CA that signed the gateway's certificate")
    ap.add_argument("--cert", help="PEM client certificate, if the gateway requires one")
    ap.add_argument("--key", help="PEM key of --cert")
    ap.add_argument("--api-key-file", help="file holding the API key")
    ap.add_argument("--insecure", action="store_true", help="plain text (a gateway run with --insecure)")
    prompt = ap.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--ids", help="prompt token ids, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    if not args.insecure and not args.ca:
        ap.error("--ca is required unless --insecure")

    request = gateway_pb2.GenerateRequest(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.prompt is not None:
        request.text = args.prompt
    else:
        request.token_ids.ids.extend(int(i) for i in args.ids.split(","))
    stub = gateway_pb2_grpc.GatewayStub(channel(args))
    last = None
    try:
        for message in stub.Generate(request, timeout=args.timeout):
            if message.text or args.prompt is not None:
                sys.stdout.write(message.text)
            else:
                sys.stdout.write("".join(f"{i} " for i in message.token_ids))
            sys.stdout.flush()
            last = message
    except grpc.RpcError as e:
        print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print()
    print(f"finish_reason={gateway_pb2.FinishReason.Name(last.finish_reason)} "
          f"prompt_tokens={last.usage.prompt_tokens} completion_tokens={last.usage.completion_tokens}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
