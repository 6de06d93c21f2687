"""The request body: byte limit, multipart parts, file selection (serving/uploads.py)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest

from serving.schema import (
    BadInputError,
)
from serving.uploads import (
    Upload,
    _parse_strictly,
    parse_multipart,
    read_body,
    select_files,
    split_well_formed,
)

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


def _client_bodies() -> list[bytes]:
    """Bodies as common clients write them: one file, several files, extra headers, odd names."""
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) + b"\r\n-- not the boundary\r\n"

    def part(name: str, filename: str | None, data: bytes, *headers: str) -> bytes:
        disposition = f'Content-Disposition: form-data; name="{name}"' + (
            "" if filename is None else f'; filename="{filename}"'
        )
        lines = "".join(f"{header}\r\n" for header in (disposition, *headers))
        return f"--{BOUNDARY}\r\n{lines}\r\n".encode() + data + b"\r\n"

    end = f"--{BOUNDARY}--".encode()
    return [
        part("image", "a.png", png, "Content-Type: image/png") + end + b"\r\n",
        part("image", "a.png", png) + end,
        part("images", "1.png", png) + part("images", "2.png", b"") + end + b"\r\n",
        part("image", None, b"http://example.com/a.png") + end,
        part("image", "x y;z.png", png, "content-type: image/png", "X-Extra: 1") + end,
        part("other", "\u00e9.png", png, "Content-Length: 300") + end,
    ]


def test_fast_split_equals_python_multipart_wherever_it_answers() -> None:
    """The fast split answers client-shaped bodies; on any other body it defers, never differs."""
    bases = _client_bodies()
    boundary = BOUNDARY.encode()
    for base in bases:
        assert split_well_formed(base, boundary) == _parse_strictly(base, boundary)
    inserts = [b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"--", b" ", b":", b";", b'"', b"\x00"]
    inserts += [boundary, b"--" + boundary, b"\r\n--" + boundary, b"filename=", b"name="]
    rng = random.Random(18)
    answered = 0
    for _ in range(4000):
        body = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(body) + 1)
            edit = rng.random()
            if edit < 0.4:
                body[at:at] = rng.choice(inserts)
            elif edit < 0.7:
                del body[at : at + rng.randint(1, 4)]
            else:
                body[at : at + 1] = bytes([rng.randrange(256)])
        fast = split_well_formed(bytes(body), boundary)
        if fast is None:
            continue
        answered += 1
        assert fast == _parse_strictly(bytes(body), boundary), bytes(body)
    assert answered > 1000  # mutations inside file data or values keep the body plain


@pytest.mark.parametrize(
    "body",
    [
        f'preamble\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; '
        f'filename="a.png"\r\n\r\nAAA\r\n--{BOUNDARY}--\r\n',
        f'--{BOUNDARY}\nContent-Disposition: form-data; name="image"; filename="a.png"\n\nAAA\n'
        f"--{BOUNDARY}--\n",
        f'--{BOUNDARY}\r\nContent-Disposition:form-data; name="image"; filename="a.png"\r\n'
        f"\r\nAAA\r\n--{BOUNDARY}--\r\nepilogue",
    ],
    ids=["preamble", "bare-lf", "no-space-and-epilogue"],
)
def test_bodies_the_fast_split_defers_still_get_python_multipart_s_answer(body: str) -> None:
    raw = body.encode()
    assert split_well_formed(raw, BOUNDARY.encode()) is None
    try:
        expected: list[Upload] | str = _parse_strictly(raw, BOUNDARY.encode())
    except BadInputError as exc:
        expected = exc.kind
    try:
        got: list[Upload] | str = parse_multipart(raw, MULTIPART, "image")
    except BadInputError as exc:
        got = exc.kind
    assert got == expected
