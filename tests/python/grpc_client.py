"""credbroker from Python's grpcio, as a new user would write it: a plain `grpc.insecure_channel("unix://…")`
with no channel options (gRPC core then sends the socket path, percent-encoded, as :authority). Stubs are
generated from the repository's .proto at start (grpcio-tools). Prints one line of JSON with what it got.

usage: grpc_client.py SOCKET PROTO_ROOT [CALLS]   (CALLS GetToken calls on the one channel; default 1)
"""
import json
import os
import sys
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
import grpc_tools
from grpc_tools import protoc


def stubs(proto_root):
    out = tempfile.mkdtemp()
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={out}",
                      f"--grpc_python_out={out}", "credbroker/v1/broker.proto"])
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    sys.path.insert(0, out)
    from credbroker.v1 import broker_pb2, broker_pb2_grpc
    return broker_pb2, broker_pb2_grpc


def main():
    socket_path, proto_root = sys.argv[1], sys.argv[2]
    calls = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    pb, pb_grpc = stubs(proto_root)
    channel = grpc.insecure_channel(f"unix://{socket_path}")
    broker = pb_grpc.TokenBrokerStub(channel)
    report = {}
    tokens = set()
    for _ in range(calls):
        t = broker.GetToken(pb.GetTokenRequest(scopes=["scim:read"]), timeout=20)
        tokens.add(t.access_token)
    report["token"] = {"distinct": len(tokens), "calls": calls, "client": t.client, "scopes": list(t.scopes),
                       "expires_at": t.expires_at.seconds, "token": t.access_token}
    try:
        broker.GetToken(pb.GetTokenRequest(scopes=["openid"]), timeout=20)
        report["denied"] = "not denied"
    except grpc.RpcError as e:
        report["denied"] = e.code().name
    me = broker.WhoAmI(pb.WhoAmIRequest(), timeout=20)
    report["whoami"] = {"uid": me.caller.uid, "pid": me.caller.pid, "self": me.caller.pid == os.getpid(),
                        "grants": {g.client: list(g.scopes) for g in me.grants}}
    health = health_pb2_grpc.HealthStub(channel)
    report["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(
        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=20).status)
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=20)
    report["services"] = sorted(s.name for a in answers for s in a.list_services_response.service)
    print(json.dumps(report), flush=True)


main()
