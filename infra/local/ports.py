"""The stack's ports: the well-known ones, or free ones on 127.0.0.1 where a port is asked for as 0."""

from __future__ import annotations

import socket

from infra.local.service import HOST, StackError

#: The well-known ports, used unless told otherwise. iceberg and lance are S3-side
#: catalog servers that `weed mini` always starts.
DEFAULT_PORTS = {
    "s3": 8333, "mlflow": 5000, "postgres": 5433,
    "master": 9333, "volume": 9340, "filer": 8888, "webdav": 7333, "admin": 23646,
    "iceberg": 8181, "lance": 9101,
}
#: `weed mini` components with a gRPC port. Their peers dial HTTP port + 10000 whatever
#: the -X.port.grpc flags say (the admin's workers do), so that is the port they get.
GRPC_OFFSET = 10000
WEED_GRPC = ("master", "volume", "filer", "s3", "admin")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def free_port(grpc: bool = False, avoid: set[int] = frozenset()) -> int:
    """A free port on 127.0.0.1; with grpc, one whose port + 10000 is free too."""
    for _ in range(500):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port in avoid or (grpc and (port + GRPC_OFFSET > 65535 or port + GRPC_OFFSET in avoid
                                       or not _port_free(port + GRPC_OFFSET))):
            continue
        return port
    raise StackError("no free port found")


def pick_ports(requested: dict[str, int]) -> dict[str, int]:
    """The requested ports, each 0 replaced by a free port that none of the others uses."""
    taken: set[int] = set()
    ports = {}
    for name, port in requested.items():
        grpc = name in WEED_GRPC
        if port == 0:
            port = free_port(grpc=grpc, avoid=taken)
        ports[name] = port
        taken |= {port, port + GRPC_OFFSET} if grpc else {port}
    return ports
