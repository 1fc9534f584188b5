"""Network helpers shared by the tests that start a server."""

import socket


def free_port() -> int:
    """A TCP port nothing listens on right now (the server binds it moments later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
