"""A real S3 endpoint for tests: moto's HTTP server on 127.0.0.1 (not an in-process mock)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def s3_server(buckets: tuple[str, ...] = ("cvops",)) -> Iterator[str]:
    """Start a moto S3 server, create ``buckets``, yield its endpoint URL, stop it.

    moto keeps its buckets in this process's memory, shared by every server started in it: the
    state is reset when the server starts and when it stops, so no test sees another's objects.
    """
    import urllib.request

    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"

    def reset() -> None:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).close()

    reset()
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        try:
            reset()
        finally:
            server.stop()
