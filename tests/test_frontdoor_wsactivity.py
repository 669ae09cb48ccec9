"""Keep-alives are not input: real client frames (wsproto, masked) through the classifier."""

from __future__ import annotations

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage

from supervisor.frontdoor.wsactivity import ClientFrames

MARKERS = (b"does_not_matter",)


def client_bytes(*events: object) -> bytes:
    conn = Connection(ConnectionType.CLIENT)
    return b"".join(conn.send(event) for event in events)  # type: ignore[arg-type]


def classify(data: bytes, chunk: int) -> list[int]:
    inputs: list[int] = []
    frames = ClientFrames(inputs.append, MARKERS)
    for i in range(0, len(data), chunk):
        frames.feed(data[i : i + chunk])
    return inputs


@pytest.mark.parametrize("chunk", [1, 3, 7, 4096])
def test_keepalives_are_not_input_in_any_chunking(chunk: int) -> None:
    theia_ping = b"\x01\x02rpc" + b"EnvVariablesServer.getValue" + b"does_not_matter" + b"\x00" * 20
    data = client_bytes(
        TextMessage(data="3"),  # engine.io pong
        TextMessage(data='451-/services,["message",{"_placeholder":true,"num":0}]'),  # socket.io binary event header
        BytesMessage(data=theia_ping),  # ... its attachment: Theia's connection-status keep-alive
        Ping(payload=b"x"),
        TextMessage(data='42/services,["keystroke","a"]'),  # a person typed
        BytesMessage(data=b"k" * 70_000),  # a big upload: always input
        CloseConnection(code=1000),
    )
    assert classify(data, chunk) == [len('42/services,["keystroke","a"]'), 70_000]


def test_fragmented_message_counts_each_fragment() -> None:
    data = client_bytes(Message(data="hello ", message_finished=False), Message(data="world", message_finished=True))
    assert classify(data, 5) == [6, 5]


def test_bytes_that_are_not_websocket_frames_count_as_input() -> None:
    inputs: list[int] = []
    frames = ClientFrames(inputs.append, MARKERS)
    frames.feed(b"\xff\xffgarbage")
    frames.feed(b"more")
    assert inputs == [len(b"\xff\xffgarbage"), len(b"more")]
