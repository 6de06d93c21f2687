"""The request body: read within a byte limit, split as multipart, keep only the uploaded files.

All in memory and without temporary files: the body is bounded by ``limits.max_upload_bytes``.
BentoML's own multipart parsing is bypassed on purpose: it treats a form value without a filename
as a URL and downloads it.
"""

from __future__ import annotations

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
