"""What a stream migration needs from the protobuf edge: the token ids a stream has
delivered, read from the relayed bytes, and the request that resumes it elsewhere.

The relay keeps each message's bytes (a list append: no decoding per message) and
decodes them only when a stream breaks. Serialized GenerateResponses concatenated parse
as their merge, in one C call: repeated `token_ids` append, and `finish_reason`, set on
the last message only, survives. Every `FOLD_AFTER` messages (gateway/transport.py)
the router folds the kept bytes into one message that holds only the token ids, so a
long stream keeps about 2 bytes per token rather than every message.

The continuation is appended to the request's bytes, not re-encoded into it: a
repeated field appended to a message extends it, so a client's own continuation (if it
sent one) and the tokens delivered since add up, and the later `resumed` wins.
"""

from __future__ import annotations

from meshserve.v1 import inference_pb2


class Resume:
    """Per stream: how to read what it delivered and resume it on another worker."""

    __slots__ = ("_payload",)

    def __init__(self, payload: bytes) -> None:
        self._payload = payload

    @staticmethod
    def delivered(messages: list[bytes]) -> tuple[list[int], bool]:
        merged = inference_pb2.GenerateResponse.FromString(b"".join(messages))
        return list(merged.token_ids), merged.finish_reason != 0

    @staticmethod
    def fold(messages: list[bytes]) -> bytes:
        """The messages' token ids as one message (what `delivered` needs of them)."""
        merged = inference_pb2.GenerateResponse.FromString(b"".join(messages))
        out = inference_pb2.GenerateResponse(token_ids=merged.token_ids)
        if merged.finish_reason:
            out.finish_reason = merged.finish_reason
        return out.SerializeToString()

    def payload(self, token_ids: list[int], resumed: int) -> bytes:
        """The request that continues the stream after `token_ids`."""
        extra = inference_pb2.GenerateRequest(
            continuation=inference_pb2.Continuation(token_ids=token_ids, resumed=resumed)
        )
        return self._payload + extra.SerializeToString()
