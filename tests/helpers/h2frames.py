"""Hand-made HTTP/2 frames for the test helpers: just enough of RFC 9113 and RFC 7541 (HPACK) to speak gRPC to
credbrokerd the way a hostile or unusual client would, with no HTTP/2 library between the test and the wire."""
import socket
import struct
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY, CONTINUATION = 0, 1, 3, 4, 7, 9
END_STREAM, END_HEADERS = 1, 4
GET_TOKEN = b"/credbroker.v1.TokenBroker/GetToken"
WHO_AM_I = b"/credbroker.v1.TokenBroker/WhoAmI"


def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def string(s):
    """An HPACK string literal without Huffman coding (7-bit length prefix, RFC 7541 5.1-5.2)."""
    return integer(len(s), 7, 0) + s


def integer(value, prefix_bits, first):
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value % 128) + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def literal(name, value):
    """Literal header field without indexing, new name (RFC 7541 6.2.2)."""
    return b"\x00" + string(name) + string(value)


def literal_indexed(name, value):
    """Literal header field with incremental indexing, new name (RFC 7541 6.2.1): enters the dynamic table."""
    return b"\x40" + string(name) + string(value)


def indexed(index):
    """Indexed header field (RFC 7541 6.1)."""
    return integer(index, 7, 0x80)


def grpc_headers(path, authority=b"localhost"):
    fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path)]
    if authority is not None:
        fields.append((b":authority", authority))
    fields += [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
    return fields


def get_token_message(scope):
    """A gRPC message (5-byte prefix) holding GetTokenRequest { scopes: [scope] }."""
    body = b"\x0a" + integer(len(scope), 7, 0) + scope
    return b"\x00" + struct.pack(">I", len(body)) + body


def connect(path, timeout=20):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def send(s, data):
    try:
        s.sendall(data)
        return True
    except OSError:
        return False


class Reader:
    """Reads frames from a connection, answering SETTINGS and PING and giving back connection flow-control
    window for the DATA it reads, as a client must."""

    def __init__(self, sock, deadline=30):
        self.sock, self.buf = sock, b""
        self.deadline = time.monotonic() + deadline

    def next(self):
        while True:
            if len(self.buf) >= 9:
                length = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) >= 9 + length:
                    kind, flags = self.buf[3], self.buf[4]
                    sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
                    payload = self.buf[9:9 + length]
                    self.buf = self.buf[9 + length:]
                    if kind == SETTINGS and not flags & 1:
                        send(self.sock, frame(SETTINGS, 1, 0, b""))
                    if kind == 6 and not flags & 1:  # PING
                        send(self.sock, frame(6, 1, 0, payload))
                    if kind == DATA and length:
                        send(self.sock, frame(8, 0, 0, struct.pack(">I", length)))  # WINDOW_UPDATE
                    return kind, flags, sid, payload
            if time.monotonic() > self.deadline:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk

    def call_result(self, sid):
        """'granted' when stream `sid` carried a message (DATA), 'refused' when it ended without one."""
        data = 0
        while True:
            f = self.next()
            if f is None:
                return "no answer"
            kind, flags, fsid, payload = f
            if kind == GOAWAY:
                return "goaway"
            if fsid != sid:
                continue
            if kind == DATA:
                data += len(payload)
            if kind == RST_STREAM:
                return "reset"
            if kind in (DATA, HEADERS) and flags & END_STREAM:
                return "granted" if data > 0 else "refused"
