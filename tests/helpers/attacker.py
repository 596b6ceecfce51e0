"""A hostile local user: raw Unix sockets and hand-made HTTP/2 frames against credbrokerd.

Run as the attacking uid. Each mode prints one line of JSON with what it managed, then (for the modes that hold
connections) waits for a line on stdin before letting go, so the test can check the daemon meanwhile.

usage: attacker.py SOCKET MODE [ARGS...]
  streams N       N connections; on each, as many streams as it will take, every one an unfinished gRPC message
                  of the largest size allowed (as much of the body as flow control lets through, never the end)
  idle N          N connections that send nothing
  preface N       N connections that send the HTTP/2 preface and nothing else
  attempts N      N connections opened one after another, each kept while the daemon keeps it
  attempts-for S  the same, for S seconds (reports at once, then attacks until then; for benchmarks)
  exec-swap PROG  connect and complete the HTTP/2 preface; fork a child that waits until this process has
                  exec'd PROG, then asks for a token over the inherited connection and prints "granted" or
                  "refused"; this process execs PROG (with no arguments but a short sleep for /bin/sleep)
  call            (positive control of exec-swap) the same call, made by a forked child of the process that
                  connected, which execs nothing
  call-then-idle  one call on a fresh connection, then wait: prints how many seconds until the daemon closed it
  slow-head       an HTTP/1.1 request head that never ends: prints how many seconds until the daemon closed it
The token calls ask for the scope in $SCOPE (default scim:read).
"""
import json
import os
import select
import socket
import struct
import sys
import time

from h2frames import (DATA, END_HEADERS, END_STREAM, GET_TOKEN, HEADERS, PREFACE, SETTINGS, Reader, connect,
                      frame, get_token_message, grpc_headers, literal, send)

MAX_MESSAGE = 20 * 1024
DEADLINE = time.monotonic() + 60


def headers(path):
    return b"".join(literal(n, v) for n, v in grpc_headers(path))


def served(s):
    """Whether the daemon serves the connection: it answers a preface with its SETTINGS, and closes at once a
    connection over a limit (or sends GOAWAY to one that broke the protocol). Waits (boundedly) for an answer."""
    try:
        r, _, _ = select.select([s], [], [], 10)
        if not r:
            return False
        s.setblocking(False)
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                return False
            buf += chunk
        s.setblocking(True)
        while len(buf) >= 9:
            if buf[3] == 7:  # GOAWAY
                return False
            buf = buf[9 + int.from_bytes(buf[:3], "big"):]
        return True
    except OSError:
        return False


def hold(conns, report):
    report["held"] = sum(1 for c in conns if served(c))
    print(json.dumps(report), flush=True)
    sys.stdin.readline()


def streams(path, n):
    """Stays within the protocol, as an attacker who wants to keep what it holds would: 16 streams (the most
    the daemon allows on a connection) and, on each, the start of a message that declares the largest size
    allowed, within the connection's 64 KiB flow-control window."""
    conns, streams_sent = [], 0
    unfinished = b"\x00" + struct.pack(">I", MAX_MESSAGE) + b"s" * 3000
    for _ in range(n):
        try:
            s = connect(path)
        except OSError:
            continue
        ok = send(s, PREFACE + frame(SETTINGS, 0, 0, b""))
        for i in range(16):
            if not ok:
                break
            sid = 1 + 2 * i
            ok = send(s, frame(HEADERS, END_HEADERS, sid, headers(GET_TOKEN)) + frame(DATA, 0, sid, unfinished))
            if ok:
                streams_sent += 1
        conns.append(s)
    hold(conns, {"connections": len(conns), "streams": streams_sent})


def idle(path, n, preface):
    conns = []
    for _ in range(n):
        try:
            s = connect(path)
            if preface:
                send(s, PREFACE)
            conns.append(s)
        except OSError:
            pass
    hold(conns, {"connections": len(conns)})


def attempt_batch(path, n):
    """n connections, each with the HTTP/2 preface; those the daemon serves (it closes the rest at once)."""
    pending = []
    for _ in range(n):
        try:
            s = connect(path)
            send(s, PREFACE)
            pending.append(s)
        except OSError:
            pass
    return [c for c in pending if served(c) or c.close()], len(pending)


def attempts(path, n):
    held, made = [], 0
    while made < n:
        kept, tried = attempt_batch(path, min(256, n - made))
        held += kept
        made += max(tried, 1)
    print(json.dumps({"attempts": made, "held": len(held)}), flush=True)
    sys.stdin.readline()


def attempts_for(path, seconds):
    print(json.dumps({"started": True}), flush=True)
    end = time.monotonic() + seconds
    held = []
    while time.monotonic() < end:
        held += attempt_batch(path, 256)[0]
    sys.stdin.readline()


def call_on(s):
    s.settimeout(20)
    scope = os.environ.get("SCOPE", "scim:read").encode()
    send(s, frame(SETTINGS, 0, 0, b"") + frame(HEADERS, END_HEADERS, 1, headers(GET_TOKEN))
         + frame(DATA, END_STREAM, 1, get_token_message(scope)))
    return Reader(s, deadline=20).call_result(1)


def exec_swap(path, prog):
    s = connect(path)
    send(s, PREFACE)
    # The daemon answers the preface with its SETTINGS only once the connection is accepted and identified.
    select.select([s], [], [], 10)
    os.set_inheritable(s.fileno(), True)
    parent = os.getpid()
    if os.fork() == 0:
        want = os.path.realpath(prog)
        while os.readlink(f"/proc/{parent}/exe") != want and time.monotonic() < DEADLINE:
            time.sleep(0.01)
        print(json.dumps({"result": call_on(s)}), flush=True)
        os._exit(0)
    os.execv(prog, [prog, "30"])


def call(path):
    s = connect(path)
    send(s, PREFACE)
    select.select([s], [], [], 10)
    pid = os.fork()
    if pid == 0:
        print(json.dumps({"result": call_on(s)}), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)


def call_then_idle(path):
    s = connect(path)
    send(s, PREFACE)
    result = call_on(s)
    start = time.monotonic()
    s.settimeout(30)
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass
    print(json.dumps({"result": result, "closed_after": time.monotonic() - start}), flush=True)


def slow_head(path):
    s = connect(path)
    send(s, b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\nCredbroker-Request: true\r\n")
    start = time.monotonic()
    s.settimeout(60)
    answer = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    except OSError:
        pass
    print(json.dumps({"closed_after": time.monotonic() - start, "answer": answer[:12].decode("latin-1")}),
          flush=True)


def main():
    path, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode == "streams":
        streams(path, int(args[0]))
    elif mode == "idle":
        idle(path, int(args[0]), False)
    elif mode == "preface":
        idle(path, int(args[0]), True)
    elif mode == "attempts":
        attempts(path, int(args[0]))
    elif mode == "attempts-for":
        attempts_for(path, float(args[0]))
    elif mode == "exec-swap":
        exec_swap(path, args[0])
    elif mode == "call":
        call(path)
    elif mode == "call-then-idle":
        call_then_idle(path)
    elif mode == "slow-head":
        slow_head(path)
    else:
        sys.exit(f"unknown mode {mode}")


main()
