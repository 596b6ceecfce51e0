"""A stand-in Prometheus target that requires a bearer token the IdP says is active (RFC 7662 introspection
at INTROSPECT): /metrics answers 200 with one sample to such requests, 401 to others. Each request is logged
to LOG as `ok`, `none` or `bad`.

usage: bearer_target.py LOG INTROSPECT
Listens on 127.0.0.1 (a free port), prints `port=N` once listening, serves until killed.
"""
import http.server
import json
import sys
import urllib.parse
import urllib.request

LOG, INTROSPECT = sys.argv[1], sys.argv[2]


def active(token):
    data = urllib.parse.urlencode({"token": token}).encode()
    with urllib.request.urlopen(INTROSPECT, data=data, timeout=10) as r:
        return json.load(r).get("active") is True


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not token:
            outcome, status = "none", 401
        elif not active(token):
            outcome, status = "bad", 401
        else:
            outcome, status = "ok", 200
        with open(LOG, "a") as f:
            f.write(outcome + "\n")
        body = b"# TYPE demo_up gauge\ndemo_up 1\n" if status == 200 else b"unauthorized\n"
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"port={server.server_address[1]}", flush=True)
server.serve_forever()
