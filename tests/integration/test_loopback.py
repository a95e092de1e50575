"""The session's local cluster (started by `ray_cluster`) listens on loopback only, and still demands a token."""

import ipaddress
import socket

import grpc
import psutil
import pytest
import ray
from ray._raylet import AuthenticationTokenLoader
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc


@ray.remote
class Echo:
    def ping(self) -> str:
        return "pong"


@ray.remote
def square(x: int) -> int:
    return x * x


def _cluster_processes(session_dir: str) -> list[psutil.Process]:
    """The driver, everything it spawned (GCS, raylet, agents, workers) and any process naming this session."""
    me = psutil.Process()
    procs = {p.pid: p for p in [me, *me.children(recursive=True)]}
    for p in psutil.process_iter():
        try:
            if session_dir in " ".join(p.cmdline()):
                procs[p.pid] = p
        except psutil.Error:
            pass
    return list(procs.values())


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    # Ray's C++ gRPC servers bind an IPv6 socket to ::ffff:127.0.0.1, which only 127.0.0.1 reaches.
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def test_every_listener_of_the_local_cluster_is_on_loopback(ray_session):
    actors = [Echo.remote() for _ in range(2)]
    assert ray.get([a.ping.remote() for a in actors]) == ["pong", "pong"]
    assert ray.get(square.remote(7)) == 49  # a task: a pooled worker beside the actors' own
    session_dir = ray._private.worker.global_worker.node.get_session_dir_path()

    listeners = []
    for p in _cluster_processes(session_dir):
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except psutil.Error:  # a worker that exited meanwhile
            continue
        listeners += [(name, c.laddr.ip, c.laddr.port) for c in conns
                      if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)]

    names = {name for name, _, _ in listeners}
    assert {"gcs_server", "raylet"} <= names and len(listeners) >= 6, listeners
    exposed = [entry for entry in listeners if not _is_loopback(entry[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    del actors


def test_local_cluster_keeps_token_auth(ray_session):
    gcs = ray_session["address"]
    assert ipaddress.ip_address(gcs.rsplit(":", 1)[0]).is_loopback
    request = gcs_service_pb2.GetAllNodeInfoRequest()
    with grpc.insecure_channel(gcs) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetAllNodeInfo(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = AuthenticationTokenLoader.instance().get_token_for_http_header()
        reply = stub.GetAllNodeInfo(request, metadata=list(token.items()), timeout=10)
    assert len(reply.node_info_list) == 1
