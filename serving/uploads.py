"""The request body: read within a byte limit, split as multipart, keep only the uploaded files.

All in memory and without temporary files: the body is bounded by ``limits.max_upload_bytes``.
BentoML's own multipart parsing is bypassed on purpose: it treats a form value without a filename
as a URL and downloads it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from serving.schema import BadInputError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks
    from starlette.types import Receive


async def read_body(receive: Receive, headers: Mapping[bytes, bytes], limit: int) -> bytes:
    """Read the whole request body, refusing it as soon as it passes ``limit`` bytes.

    Raises:
        BadInputError: the declared or actual size is over the limit (413), or a bad length (400).
    """
    too_large = BadInputError(
        413, "upload_too_large", f"the request body is over the limit of {limit} bytes"
    )
    declared = headers.get(b"content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadInputError(
                400, "bad_content_length", "the Content-Length header is not a number"
            )
        if int(declared) > limit:
            raise too_large
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise BadInputError(
                400, "incomplete_body", "the client went away before the body ended"
            )
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


@dataclass(frozen=True)
class Upload:
    """One part of a multipart body."""

    name: str
    filename: str | None
    data: bytes


def parse_multipart(body: bytes, content_type: str, field_name: str) -> list[Upload]:
    """Split a ``multipart/form-data`` body into its parts (all in memory; the body is bounded).

    Raises:
        BadInputError: another media type (415) or a malformed body (400).
    """
    media_type, params = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        shown = media_type.decode("latin-1") or "no content type"
        raise BadInputError(
            415,
            "unsupported_media_type",
            f"send multipart/form-data with the image in file field '{field_name}' (got "
            f"{shown}); JSON and urlencoded bodies are not accepted and URLs are never fetched",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadInputError(
            400, "malformed_multipart", "the multipart content type lacks a boundary"
        )
    parts = split_well_formed(body, boundary)
    return parts if parts is not None else _parse_strictly(body, boundary)


#: Part headers the fast split takes as they are; anything else goes to python-multipart.
_PLAIN_HEADER = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+: (?! )[^\r\n]*")
#: Below python-multipart's own limits (8 headers, 4,224 bytes a line): it decides beyond them.
_FAST_MAX_HEADERS = 8
_FAST_MAX_HEADER_BYTES = 1024


def split_well_formed(body: bytes, boundary: bytes) -> list[Upload] | None:
    """The parts of a plainly formed multipart body, or None when it is anything but plain.

    What a client library sends (no preamble, ``Name: value`` header lines, CRLF everywhere,
    the closing delimiter at the end) is split with ``bytes.find`` in a few microseconds; any
    other body returns None and goes to python-multipart, which accepts or refuses it with its
    own rules. Where this returns parts they equal python-multipart's (``tests/test_uploads.py``
    checks that on thousands of mutated bodies).
    """
    delimiter = b"--" + boundary
    if not body.startswith(delimiter + b"\r\n"):
        return None
    separator = b"\r\n" + delimiter
    parts = []
    position = len(delimiter) + 2
    while True:
        headers_end = body.find(b"\r\n\r\n", position)
        if headers_end < 0:
            return None
        lines = body[position:headers_end].split(b"\r\n")
        if len(lines) > _FAST_MAX_HEADERS:
            return None
        headers: dict[bytes, bytes] = {}
        for line in lines:
            if len(line) > _FAST_MAX_HEADER_BYTES or not _PLAIN_HEADER.fullmatch(line):
                return None
            name, _, value = line.partition(b": ")
            headers[name.lower()] = value
        data_end = body.find(separator, headers_end + 4)
        if data_end < 0:
            return None
        _, disposition = parse_options_header(headers.get(b"content-disposition"))
        filename = disposition.get(b"filename")
        parts.append(
            Upload(
                name=disposition.get(b"name", b"").decode("utf-8", "replace"),
                filename=None if filename is None else filename.decode("utf-8", "replace"),
                data=body[headers_end + 4 : data_end],
            )
        )
        after = data_end + len(separator)
        follows = body[after : after + 2]
        if follows == b"\r\n":
            position = after + 2
        elif follows == b"--" and body[after + 2 :] in (b"", b"\r\n"):
            return parts
        else:
            return None


def _parse_strictly(body: bytes, boundary: bytes) -> list[Upload]:
    """Any multipart body through python-multipart: its parts, or a 400 naming what is wrong."""
    parts: list[Upload] = []
    state: dict[str, Any] = {"ended": False}

    def on_part_begin() -> None:
        state.update(headers={}, field=b"", value=b"", data=[])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state.update(field=b"", value=b"")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"].append(data[start:end])

    def on_part_end() -> None:
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition"))
        filename = disposition.get(b"filename")
        parts.append(
            Upload(
                name=disposition.get(b"name", b"").decode("utf-8", "replace"),
                filename=None if filename is None else filename.decode("utf-8", "replace"),
                data=b"".join(state["data"]),
            )
        )

    def on_end() -> None:
        state["ended"] = True

    callbacks: MultipartCallbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_end": on_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadInputError(
            400, "malformed_multipart", f"the multipart body is malformed: {exc}"
        ) from exc
    if not state["ended"]:
        raise BadInputError(
            400, "malformed_multipart", "the multipart body ends before its last part"
        )
    return parts


def select_files(
    parts: Sequence[Upload], field_name: str, single: bool, max_images: int
) -> list[Upload]:
    """Keep the uploaded files of ``field_name``; refuse anything else.

    Raises:
        BadInputError: a text value where a file belongs (it is never fetched as a URL or read as a
            path), an unexpected or missing field, or too many files.
    """
    for part in parts:
        if part.name != field_name:
            raise BadInputError(
                400,
                "unexpected_field",
                f"unexpected form field '{part.name}'; upload image files in field '{field_name}'",
            )
        if part.filename is None:
            raise BadInputError(
                400,
                "not_a_file",
                f"form field '{field_name}' holds a text value, not an uploaded file; URLs and "
                "server paths are never fetched, upload the image bytes instead",
            )
    if not parts:
        raise BadInputError(400, "missing_field", f"no image file in form field '{field_name}'")
    if single and len(parts) > 1:
        raise BadInputError(
            400,
            "too_many_images",
            f"/predict takes one file in field '{field_name}', got {len(parts)}; "
            "use /batch_predict for several",
        )
    if len(parts) > max_images:
        raise BadInputError(
            413,
            "too_many_images",
            f"{len(parts)} images in one request; at most {max_images} are accepted",
        )
    return list(parts)
