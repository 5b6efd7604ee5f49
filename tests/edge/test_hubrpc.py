"""proto.hubclient against a real gRPC server (a recording ModelRegistry, no hub): a push's deadline grows with its
size, the chunks carry size and sha256 first, and a refusal vs an unreachable hub map to exit 2 vs 3.
Python 3.8 too: kestrel-hub, kestrel-train and the demo share this client."""

from __future__ import annotations

import hashlib
from concurrent import futures

import grpc
import pytest

from proto import kestrel_pb2, kestrel_pb2_grpc
from proto.errors import ArtifactError, HubError, TransportError
from proto.hubclient import PUSH_BYTES_PER_S, PUSH_CHUNK, PUSH_TIMEOUT_S, HubClient, HubRefused, push_timeout
from proto.hubcreds import Credentials

# The deadline as the server sees it: a little under what was asked, or a little over (gRPC rounds it on the wire).
DEADLINE_SLACK_S = 2.0


class Recorder(kestrel_pb2_grpc.ModelRegistryServicer):
    def __init__(self) -> None:
        self.pushes: list = []

    def PushModel(self, request_iterator, context):  # noqa: ANN001, ANN201, N802
        chunks = list(request_iterator)
        self.pushes.append((context.time_remaining(), chunks))
        data = b"".join(c.data for c in chunks)
        if chunks[0].sha256 == hashlib.sha256(b"refuse me").hexdigest():
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not_newer:\n version 1 is not newer")
        return kestrel_pb2.PushResult(model=kestrel_pb2.ModelRef(name="m", version=1),
                                      bundle_sha256=hashlib.sha256(data).hexdigest(), size=len(data))


@pytest.fixture
def registry():  # noqa: ANN201
    rec = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    kestrel_pb2_grpc.add_ModelRegistryServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with HubClient(f"127.0.0.1:{port}", timeout_s=2.0, creds=Credentials(plaintext=True)) as client:
        yield rec, client
    server.stop(None)


def test_a_push_deadline_grows_with_the_bundle_not_the_call_timeout(registry):
    rec, client = registry
    data = bytes(range(256)) * (24 * PUSH_CHUNK // 256 + 7)    # 6 MiB and a bit: 24 full chunks and one more
    res = client.push(data)
    assert res.size == len(data) and res.bundle_sha256 == hashlib.sha256(data).hexdigest()
    remaining, chunks = rec.pushes[-1]
    assert push_timeout(len(data)) == PUSH_TIMEOUT_S + len(data) / PUSH_BYTES_PER_S
    assert abs(remaining - push_timeout(len(data))) < DEADLINE_SLACK_S, remaining
    assert remaining > PUSH_TIMEOUT_S + 6 - DEADLINE_SLACK_S       # the 6 MiB count, and not the 2 s of other calls
    assert [len(c.data) for c in chunks] == [PUSH_CHUNK] * 24 + [len(data) - 24 * PUSH_CHUNK]
    assert chunks[0].total_size == len(data) and chunks[0].sha256 == hashlib.sha256(data).hexdigest()
    assert all(not c.sha256 and not c.total_size for c in chunks[1:])


def test_an_empty_push_is_one_chunk_with_its_hash(registry):
    rec, client = registry
    client.push(b"")
    (_, chunks) = rec.pushes[-1]
    assert len(chunks) == 1 and chunks[0].data == b"" and chunks[0].sha256 == hashlib.sha256(b"").hexdigest()


def test_a_refusal_is_an_artifact_error_and_an_unreachable_hub_a_transport_error(registry):
    _, client = registry
    with pytest.raises(HubRefused) as ei:
        client.push(b"refuse me")
    assert isinstance(ei.value, ArtifactError) and ei.value.code == "FAILED_PRECONDITION"
    assert str(ei.value) == (f"PushModel at hub {client.target}: hub refused (FAILED_PRECONDITION): "
                             "not_newer: version 1 is not newer")
    with pytest.raises(HubError) as ei2:
        client.list_devices()                                    # this server has no Fleet service
    assert isinstance(ei2.value, TransportError) and "UNIMPLEMENTED" in str(ei2.value)
