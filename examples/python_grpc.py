#!/usr/bin/env python3
"""Get a token from credbroker with Python's grpcio: a plain unix:// channel, stubs made from broker.proto at
start (pip install -r examples/requirements.txt: grpcio, grpcio-tools). Prints the access token.

usage: python_grpc.py SCOPE...   (CREDBROKER_SOCKET; CREDBROKER_PROTO: where credbroker/v1/broker.proto is,
                                  by default the checkout's proto/ when run from one, else the package's)
"""
import os
import sys

import grpc

checkout = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proto")
default = checkout if os.path.exists(os.path.join(checkout, "credbroker/v1/broker.proto")) \
    else "/usr/share/credbroker/proto"
sys.path.append(os.environ.get("CREDBROKER_PROTO", default))
broker_pb2, broker_grpc = grpc.protos_and_services("credbroker/v1/broker.proto")

socket = os.environ.get("CREDBROKER_SOCKET", "/run/credbroker/credbroker.sock")
with grpc.insecure_channel(f"unix://{socket}") as channel:
    broker = broker_grpc.TokenBrokerStub(channel)
    try:
        token = broker.GetToken(broker_pb2.GetTokenRequest(scopes=sys.argv[1:]), timeout=10)
    except grpc.RpcError as e:
        sys.exit(f"credbroker: {e.code().name}: {e.details()}")
    print(token.access_token)
