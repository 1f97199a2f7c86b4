"""Rendezvous stores listen on the address they are given, not on every interface (reliability S6)."""

import datetime
import os

import psutil
import pytest

from workbench.parallel.rendezvous import ALL_INTERFACES, bound_store

TIMEOUT = datetime.timedelta(seconds=5)


def listening(port: int) -> set:
    return {c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_a_store_server_listens_on_its_host_only_and_serves_clients(monkeypatch):
    monkeypatch.delenv(ALL_INTERFACES, raising=False)
    server = bound_store("127.0.0.1", 0, 2, True, timeout=TIMEOUT, wait_for_workers=False)
    assert listening(server.port) == {"127.0.0.1"}
    client = bound_store(host_name="127.0.0.1", port=server.port, is_master=False, timeout=TIMEOUT)
    client.set("key", "value")
    assert server.get("key") == b"value"


def test_every_interface_only_when_asked(monkeypatch):
    monkeypatch.setenv(ALL_INTERFACES, "1")
    server = bound_store("127.0.0.1", 0, 1, True, timeout=TIMEOUT)
    assert listening(server.port) & {"0.0.0.0", "::"}  # torch's own behaviour: the wildcard address


def test_an_address_of_another_machine_is_refused_naming_the_opt_in(monkeypatch):
    monkeypatch.delenv(ALL_INTERFACES, raising=False)
    with pytest.raises(RuntimeError, match=rf"cannot listen on 192.0.2.1:0 .*{ALL_INTERFACES}=1"):
        bound_store("192.0.2.1", 0, 1, True, timeout=TIMEOUT)  # TEST-NET-1: never a local address
    assert os.environ.get(ALL_INTERFACES) is None
