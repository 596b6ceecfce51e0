#!/usr/bin/env python3
"""Get a token from credbroker's plain HTTP API with httpx over the Unix socket: no gRPC stubs
(pip install httpx). Prints the access token.

usage: python_httpx.py SCOPE...   (CREDBROKER_SOCKET)
"""
import os
import sys

import httpx

socket = os.environ.get("CREDBROKER_SOCKET", "/run/credbroker/credbroker.sock")
with httpx.Client(transport=httpx.HTTPTransport(uds=socket), timeout=10) as http:
    r = http.get(
        "http://localhost/v1/token",
        params=[("scope", s) for s in sys.argv[1:]],
        headers={"Credbroker-Request": "true"},
    )
if r.status_code != 200:
    error = r.json()
    sys.exit(f"credbroker: {r.status_code} {error['error']}: {error['message']}")
print(r.json()["access_token"])
