"""An unusual but valid gRPC client, made of raw HTTP/2 frames (h2frames.py), for what real stacks send over a
Unix socket. Prints one line of JSON.

usage: h2client.py SOCKET MODE [ARGS...]
  authority FORM   one GetToken whose :authority is FORM: "path" (the socket path, as grpc-java sends it),
                   "encoded" (percent-encoded, as gRPC core and grpc-swift send it), "encoded-relative"
                   (percent-encoded without the leading slash), "localhost", "none", or anything else literally
  indexed N        N GetToken calls on one connection; the first enters every header in the HPACK dynamic
                   table, the others refer to them by index, and every header block is split over HEADERS and
                   CONTINUATION frames
The calls ask for the scope in $SCOPE (default scim:read).
"""
import json
import os
import sys
import urllib.parse

from h2frames import (CONTINUATION, DATA, END_HEADERS, END_STREAM, GET_TOKEN, HEADERS, PREFACE, SETTINGS,
                      Reader, connect, frame, get_token_message, grpc_headers, indexed, literal,
                      literal_indexed, send)

SCOPE = os.environ.get("SCOPE", "scim:read").encode()


def authority(path, form):
    forms = {
        "path": path.encode(),
        "encoded": urllib.parse.quote(path, safe="").encode(),
        "encoded-relative": urllib.parse.quote(path.lstrip("/"), safe="").encode(),
        "localhost": b"localhost",
        "none": None,
    }
    return forms.get(form, form.encode())


def one_call(path, form):
    s = connect(path)
    block = b"".join(literal(n, v) for n, v in grpc_headers(GET_TOKEN, authority(path, form)))
    send(s, PREFACE + frame(SETTINGS, 0, 0, b"")
         + frame(HEADERS, END_HEADERS, 1, block)
         + frame(DATA, END_STREAM, 1, get_token_message(SCOPE)))
    return {"result": Reader(s).call_result(1)}


def split_block(sid, block):
    """A header block over one HEADERS and one or more CONTINUATION frames."""
    cut = max(1, len(block) // 3)
    pieces = [block[:cut], block[cut:2 * cut], block[2 * cut:]]
    frames = frame(HEADERS, 0, sid, pieces[0])
    for i, piece in enumerate(pieces[1:]):
        last = i == len(pieces) - 2
        frames += frame(CONTINUATION, END_HEADERS if last else 0, sid, piece)
    return frames


def indexed_calls(path, n):
    s = connect(path)
    reader = Reader(s, deadline=120)
    fields = grpc_headers(GET_TOKEN)
    send(s, PREFACE + frame(SETTINGS, 0, 0, b""))
    results = {}
    for i in range(n):
        sid = 1 + 2 * i
        if i == 0:
            block = b"".join(literal_indexed(name, value) for name, value in fields)
        else:
            # Entries are inserted at index 62; the last one inserted has the lowest index.
            block = b"".join(indexed(62 + len(fields) - 1 - k) for k in range(len(fields)))
        send(s, split_block(sid, block) + frame(DATA, END_STREAM, sid, get_token_message(SCOPE)))
        r = reader.call_result(sid)
        results[r] = results.get(r, 0) + 1
    return {"results": results}


def main():
    path, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode == "authority":
        print(json.dumps(one_call(path, args[0])), flush=True)
    elif mode == "indexed":
        print(json.dumps(indexed_calls(path, int(args[0]))), flush=True)
    else:
        sys.exit(f"unknown mode {mode}")


main()
