"""The CPCluster wire protocol, sans-I/O: bytes in, typed messages out, and back.

    framing.FrameDecoder.feed(bytes) -> [payload, ...]     framing.frame(payload) -> bytes
    codec.decode(payload) -> Message                        codec.encode(Message) -> frame
    codec.peek(payload) -> Head(variant, id)                (route without decoding a blob)

Nothing here touches a socket, a file or an event loop (a test proves `asyncio` and `socket`
stay unloaded), so every part is testable with plain bytes.
"""

from node.protocol.codec import (
    Head,
    decode,
    encode,
    encode_payload,
    peek,
    result_from_json,
    result_to_json,
    task_from_json,
    task_result_payload,
    task_to_json,
)
from node.protocol.errors import (
    FrameTooLarge,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from node.protocol.framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, frame
from node.protocol.messages import *  # noqa: F403  (the records are the protocol's vocabulary)
from node.protocol.messages import Message, Result, Role, Task

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "FrameDecoder",
    "FrameTooLarge",
    "Head",
    "LocalProtocolError",
    "Message",
    "ProtocolError",
    "RemoteProtocolError",
    "Result",
    "Role",
    "Task",
    "decode",
    "encode",
    "encode_payload",
    "frame",
    "peek",
    "result_from_json",
    "result_to_json",
    "task_from_json",
    "task_result_payload",
    "task_to_json",
]
