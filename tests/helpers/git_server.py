"""A stand-in git smart-HTTP server that requires a token: the repositories under ROOT, served by the real
`git http-backend`, only to requests whose Authorization carries a token the IdP says is active (RFC 7662
introspection at INTROSPECT). Unauthenticated requests get 401 with both a Bearer and a Basic challenge, as
forges that take OAuth tokens answer.

usage: git_server.py ROOT LOG INTROSPECT
Listens on 127.0.0.1 (a free port), prints `port=N` once listening, and appends one line per request to LOG:
`<scheme> <token>` for authenticated ones ("bearer" or "basic"), `none` for the others, `bad` for a rejected
token. Serves until killed.
"""
import base64
import http.server
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request

ROOT, LOG, INTROSPECT = sys.argv[1], sys.argv[2], sys.argv[3]


def active(token):
    data = urllib.parse.urlencode({"token": token}).encode()
    with urllib.request.urlopen(INTROSPECT, data=data, timeout=10) as r:
        return json.load(r).get("active") is True


def log(line):
    with open(LOG, "a") as f:
        f.write(line + "\n")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def credentials(self):
        auth = self.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer":
            return "bearer", value
        if scheme.lower() == "basic":
            try:
                _, _, password = base64.b64decode(value).decode().partition(":")
                return "basic", password
            except Exception:
                return "bad", ""
        return "none", ""

    def handle_any(self):
        scheme, token = self.credentials()
        if scheme == "none":
            log("none")
            return self.challenge()
        if not active(token):
            log("bad")
            return self.challenge()
        log(f"{scheme} {token}")
        self.backend()

    def challenge(self):
        body = b"authentication required\n"
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Bearer realm="stand-in"')
        self.send_header("WWW-Authenticate", 'Basic realm="stand-in"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def backend(self):
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length", "0") or "0")
        body = self.rfile.read(length) if length else b""
        env = dict(os.environ, GIT_PROJECT_ROOT=ROOT, GIT_HTTP_EXPORT_ALL="1", PATH_INFO=path,
                   QUERY_STRING=query, REQUEST_METHOD=self.command,
                   CONTENT_TYPE=self.headers.get("Content-Type", ""), CONTENT_LENGTH=str(len(body)),
                   REMOTE_USER="token", REMOTE_ADDR="127.0.0.1")
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.split(b"\r\n"):
            name, _, value = line.decode().partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = handle_any
    do_POST = handle_any


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"port={server.server_address[1]}", flush=True)
server.serve_forever()
