#!/usr/bin/python3
"""A WebSocket echo round trip with Debian's python3-websockets.

    echo_client.py URL MESSAGE...

Opens URL, sends each MESSAGE as a text frame and waits for its echo, then
closes. Prints one JSON line: {"echoes": [...]} or {"error": "..."}.
"""

import asyncio
import json
import sys

import websockets


async def roundtrip(url, messages):
    echoes = []
    # max_size=None: the echo of a large message is as large.
    async with websockets.connect(url, max_size=None, open_timeout=10,
                                  close_timeout=5) as ws:
        for message in messages:
            await ws.send(message)
            echo = await asyncio.wait_for(ws.recv(), timeout=10)
            echoes.append(echo if isinstance(echo, str) else echo.decode("utf-8", "replace"))
    return echoes


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    try:
        out = {"echoes": asyncio.run(roundtrip(sys.argv[1], sys.argv[2:]))}
    except Exception as e:  # noqa: BLE001 - any failure is the report
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
