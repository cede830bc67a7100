#!/usr/bin/env python3
"""Stands in for systemd's NOTIFY_SOCKET on the host: binds a Unix datagram socket and writes
every sd_notify message it receives (READY=1, STATUS=..., WATCHDOG=1) to a file, one line each,
prefixed with the wall-clock time. Unix sockets only.

    notify-listen.py SOCKET_PATH OUTPUT_FILE
"""
import os
import socket
import sys
import time

path, out_path = sys.argv[1], sys.argv[2]
if os.path.exists(path):
    os.unlink(path)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(path)
with open(out_path, "a", buffering=1) as out:
    while True:
        data = sock.recv(65536)
        out.write("%.3f %s\n" % (time.time(), data.decode("utf-8", "replace").replace("\n", " | ")))
