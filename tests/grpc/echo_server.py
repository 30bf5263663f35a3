#!/usr/bin/python3
"""The gRPC upstream of the L7 tests: service `weft.test.Echo`, bytes in and out.

No generated code: the handlers are registered by name with
`grpc.method_handlers_generic_handler`, and without serializers grpcio hands
them the raw message bytes.

- `Say` (unary) answers with the request's bytes.
- `Stream` (server streaming) answers with `x-echo-count` copies of them
  (default 3), `x-echo-interval-ms` apart.

Request metadata steers the answer, as the `x-echo-set-*` headers do for
`weft-tk http-echo`:

- `x-echo-grpc-status: N` (and `x-echo-grpc-message: text`): end the call with
  that status code and message instead (after the messages, for `Stream`);
- `x-echo-trailer-<name>: v`: trailing metadata `<name>: v`;
- `x-echo-delay-ms: N`: wait before answering.

Every call ends with the trailer `x-echo-pod: <name>` and prints one JSON line
on stdout, so a test can count which replica served it.

Usage: echo_server.py --port P --name NAME
"""

import argparse
import json
import sys
import time
from concurrent import futures

import grpc

CODES = {code.value[0]: code for code in grpc.StatusCode}


def emit(value):
    print(json.dumps(value, sort_keys=True), flush=True)


class Echo:
    def __init__(self, name):
        self.name = name

    def _begin(self, method, request, context):
        metadata = {}
        for key, value in context.invocation_metadata():
            metadata.setdefault(key, []).append(value)
        first = {k: v[0] for k, v in metadata.items()}
        emit({"pod": self.name, "method": method, "peer": context.peer(),
              "metadata": metadata, "bytes": len(request)})
        trailers = [("x-echo-pod", self.name)]
        for key, value in first.items():
            if key.startswith("x-echo-trailer-"):
                trailers.append((key[len("x-echo-trailer-"):], value))
        context.set_trailing_metadata(trailers)
        delay = int(first.get("x-echo-delay-ms", "0"))
        if delay > 0:
            time.sleep(delay / 1000)
        return first

    def _end(self, first, context):
        status = first.get("x-echo-grpc-status")
        if status is not None:
            code = CODES.get(int(status), grpc.StatusCode.UNKNOWN)
            context.abort(code, first.get("x-echo-grpc-message", ""))

    def say(self, request, context):
        first = self._begin("Say", request, context)
        self._end(first, context)
        return request

    def stream(self, request, context):
        first = self._begin("Stream", request, context)
        count = int(first.get("x-echo-count", "3"))
        interval = int(first.get("x-echo-interval-ms", "0"))
        for i in range(count):
            if i and interval > 0:
                time.sleep(interval / 1000)
            yield request
        self._end(first, context)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    echo = Echo(args.name)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "weft.test.Echo", {
            "Say": grpc.unary_unary_rpc_method_handler(echo.say),
            "Stream": grpc.unary_stream_rpc_method_handler(echo.stream),
        }),))
    # [::] takes IPv4 too: gRPC core opens a dual-stack socket.
    if server.add_insecure_port(f"[::]:{args.port}") == 0:
        sys.exit(f"echo_server.py: cannot listen on port {args.port}")
    server.start()
    emit({"listening": f"[::]:{args.port}", "name": args.name})
    server.wait_for_termination()


if __name__ == "__main__":
    main()
