"""The request body: byte limit, multipart parts, file selection (serving/uploads.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from serving.schema import (
    BadInputError,
)
from serving.uploads import Upload, parse_multipart, read_body, select_files

BOUNDARY = "testboundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def test_read_body_limits() -> None:
    def receiver(*messages: dict[str, Any]) -> Callable[[], Any]:
        queue = list(messages)

        async def receive() -> dict[str, Any]:
            return queue.pop(0)

        return receive

    chunk = {"type": "http.request", "body": b"12345", "more_body": True}
    last = {"type": "http.request", "body": b"6", "more_body": False}
    assert asyncio.run(read_body(receiver(chunk, last), {}, 6)) == b"123456"
    cases = [
        (receiver(chunk, chunk), {}, "upload_too_large"),
        (receiver(), {b"content-length": b"99"}, "upload_too_large"),
        (receiver(), {b"content-length": b"-1"}, "bad_content_length"),
        (receiver({"type": "http.disconnect"}), {}, "incomplete_body"),
    ]
    for receive, headers, kind in cases:
        with pytest.raises(BadInputError) as caught:
            asyncio.run(read_body(receive, headers, 6))
        assert caught.value.kind == kind


def test_multipart_parts_keep_names_and_filenames() -> None:
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
        f"Content-Type: image/png\r\n\r\nAAA\r\n"
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename=""\r\n\r\n'
        f"\r\n--{BOUNDARY}--\r\n"
    ).encode()
    parts = parse_multipart(body, MULTIPART, "images")
    assert parts == [
        Upload("images", "a.png", b"AAA"),
        Upload("images", "", b""),
    ]
    assert select_files(parts, "images", single=False, max_images=2) == parts
