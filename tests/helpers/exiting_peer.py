"""A socket peer that goes away while its connection lives on.

Connects to the daemon's socket (this process is the peer the kernel records), forks a child that relays the
connection to the test's proxy socket, prints its pid, and exits when a line arrives on stdin. The relay keeps
the connection open, so the daemon sees later calls from a peer whose process has exited.

usage: exiting_peer.py DAEMON_SOCKET PROXY_SOCKET
"""
import os
import select
import socket
import sys

daemon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
daemon.connect(sys.argv[1])

if os.fork() == 0:
    sys.stdin.close()
    proxy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    proxy.connect(sys.argv[2])
    ends = {daemon: proxy, proxy: daemon}
    while True:
        ready, _, _ = select.select(list(ends), [], [], 60)
        if not ready:
            os._exit(0)
        for s in ready:
            data = s.recv(65536)
            if not data:
                os._exit(0)
            ends[s].sendall(data)

print(os.getpid(), flush=True)
sys.stdin.readline()
os._exit(0)
