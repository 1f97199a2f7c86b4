"""Rendezvous stores that listen only on the address the ranks are told to dial.

torch's TCPStore binds every interface whatever host name it is given (the name is only what clients
dial), so a single-node run on "127.0.0.1" would still accept connections from the network, and torch's
stores execute no authentication (torch's SECURITY.md). Here a store server first binds a socket on the
address its host name resolves to and hands TCPStore that socket (`master_listen_fd`):

    bound_store(...)   TCPStore's own arguments; a server listens on its host's address only
    python -m workbench.parallel.rendezvous [torchrun arguments]
                       torchrun whose rendezvous store and agent store are bound that way
                       (launch/torchrun.sh runs this)
    python -m workbench.parallel.rendezvous accelerate [accelerate launch arguments]
                       `accelerate launch` (its torchrun path and static rendezvous) bound the same way
                       (launch/accelerate.sh runs this)

The worker side (`init_distributed`) uses bound_store for rank 0's store when the launcher did not provide
one (the deepspeed launcher, plain MASTER_ADDR/MASTER_PORT). Listening on every interface is the explicit
opt-in `WORKBENCH_RDZV_ALL_INTERFACES=1`; a host name that resolves to no address of this machine is an
error that names it and that option.
"""

from __future__ import annotations

import os
import socket
import sys

import torch.distributed as dist

ALL_INTERFACES = "WORKBENCH_RDZV_ALL_INTERFACES"
_TCPStore = dist.TCPStore


def bound_store(*args, **kwargs) -> dist.TCPStore:
    """dist.TCPStore(*args, **kwargs), except that a server listens only on its host name's address."""
    host = kwargs.get("host_name", args[0] if args else None)
    port = kwargs.get("port", args[1] if len(args) > 1 else 0)
    is_master = kwargs.get("is_master", args[3] if len(args) > 3 else False)
    if not is_master or os.environ.get(ALL_INTERFACES) == "1":
        return _TCPStore(*args, **kwargs)
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(4096)
    except OSError as e:
        raise RuntimeError(
            f"rendezvous store: cannot listen on {host}:{port} ({e.strerror or e}); name an address of this "
            f"machine as the endpoint, or set {ALL_INTERFACES}=1 to listen on every interface") from None
    rest = dict(zip(("world_size", "is_master", "timeout", "wait_for_workers", "multi_tenant"), args[2:]))
    rest.update({k: v for k, v in kwargs.items() if k not in ("host_name", "port")})
    rest["is_master"] = True
    # TCPStore takes over the socket (and closes it): detach it from Python's object
    return _TCPStore(host, sock.getsockname()[1], master_listen_fd=sock.detach(), **rest)


def _patch_torchrun() -> None:
    from torch.distributed.elastic.rendezvous import (
        c10d_rendezvous_backend,
        dynamic_rendezvous,
        static_tcp_rendezvous,
    )

    c10d_rendezvous_backend.TCPStore = bound_store  # the rendezvous store (its host is the endpoint)
    static_tcp_rendezvous.TCPStore = bound_store  # --rdzv-backend static: one store at MASTER_ADDR

    def agent_store(self, master_addr, master_port):  # the store the workers join (MASTER_ADDR/PORT)
        return bound_store(host_name=master_addr, port=master_port, is_master=True, multi_tenant=True)

    dynamic_rendezvous.DynamicRendezvousHandler._create_tcp_store_server = agent_store


def main() -> None:
    _patch_torchrun()
    if sys.argv[1:2] == ["accelerate"]:
        from accelerate.commands.launch import main as accelerate_main

        sys.argv = ["accelerate launch", *sys.argv[2:]]
        accelerate_main()
        return
    from torch.distributed.run import main as torchrun_main

    torchrun_main(sys.argv[1:])


if __name__ == "__main__":
    main()
