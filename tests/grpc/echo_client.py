#!/usr/bin/python3
"""A gRPC client for `weft.test.Echo` (see echo_server.py): one call, one JSON
line on stdout with how it ended.

    echo_client.py --target HOST:PORT --method Say|Stream --payload TEXT
                   [--metadata KEY=VALUE ...] [--timeout SECONDS]

The line: `code` (numeric gRPC status) and `code_name`, `details`, `initial`
and `trailers` (metadata, name to list of values), `messages` (the answers,
decoded as UTF-8). It exits 0 whenever the call got a status, whichever;
a broken client exits non-zero without a line.
"""

import argparse
import json

import grpc


def as_dict(metadata):
    out = {}
    for key, value in metadata or ():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        out.setdefault(key, []).append(value)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--method", choices=["Say", "Stream"], required=True)
    parser.add_argument("--payload", default="")
    parser.add_argument("--metadata", action="append", default=[])
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    metadata = [tuple(kv.split("=", 1)) for kv in args.metadata]
    # Tests name their targets by address; a proxy from the environment has no
    # business between two pods.
    channel = grpc.insecure_channel(args.target, options=[("grpc.enable_http_proxy", 0)])
    path = f"/weft.test.Echo/{args.method}"
    payload = args.payload.encode()
    messages = []
    if args.method == "Say":
        call_fn = channel.unary_unary(path)
        try:
            reply, call = call_fn.with_call(payload, metadata=metadata, timeout=args.timeout)
            messages.append(reply)
        except grpc.RpcError as e:
            call = e
    else:
        call = channel.unary_stream(path)(payload, metadata=metadata, timeout=args.timeout)
        try:
            for reply in call:
                messages.append(reply)
        except grpc.RpcError:
            pass
    code = call.code()
    print(json.dumps({
        "code": code.value[0],
        "code_name": code.name,
        "details": call.details() or "",
        "initial": as_dict(call.initial_metadata()),
        "trailers": as_dict(call.trailing_metadata()),
        "messages": [m.decode("utf-8", "replace") for m in messages],
    }, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
