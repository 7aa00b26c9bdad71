"""Strict form decoding: ``application/x-www-form-urlencoded`` and ``multipart/form-data``.

Starlette's form parser decodes what is not UTF-8 as latin-1 (or replaces it), so a bad
byte becomes a plausible-looking wrong name. Here every field must be UTF-8, before and
after percent-decoding; there are at most :data:`MAX_FIELDS` fields and no file uploads.
The body has already been capped and read whole by :class:`~digest.web.middleware.Guard`.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import parse_qsl

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

MAX_FIELDS: Final = 100
_FILENAME: Final = re.compile(rb";\s*filename\*?\s*=", re.IGNORECASE)


class BadForm(Exception):
    """The body is not a form we accept; the message says why (for the 400 page)."""


class Form:
    """Decoded fields, in order; a name may repeat (checkboxes)."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items

    def get(self, name: str) -> str:
        """The first value of ``name``, or ""."""
        for key, value in self.items:
            if key == name:
                return value
        return ""

    def getlist(self, name: str) -> list[str]:
        """Every value of ``name``."""
        return [value for key, value in self.items if key == name]


async def read_form(request: Request) -> Form:
    """The request's form; :class:`BadForm` for anything else."""
    body = await request.body()
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype == b"application/x-www-form-urlencoded":
        return _urlencoded(body)
    if ctype == b"multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise BadForm("the multipart body has no boundary")
        return _multipart(body, boundary)
    raise BadForm("send the form as application/x-www-form-urlencoded or multipart/form-data")


def _urlencoded(body: bytes) -> Form:
    try:
        text = body.decode("utf-8")
        items = parse_qsl(
            text,
            keep_blank_values=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_FIELDS,
        )
    except UnicodeDecodeError:
        raise BadForm("the form is not UTF-8") from None
    except ValueError:
        raise BadForm(f"the form has more than {MAX_FIELDS} fields") from None
    return Form(items)


def _multipart(body: bytes, boundary: bytes) -> Form:
    items: list[tuple[str, str]] = []
    header_name = bytearray()
    header_value = bytearray()
    headers: dict[bytes, bytes] = {}
    data = bytearray()

    def on_part_begin() -> None:
        headers.clear()
        data.clear()

    def on_header_field(chunk: bytes, start: int, end: int) -> None:
        header_name.extend(chunk[start:end])

    def on_header_value(chunk: bytes, start: int, end: int) -> None:
        header_value.extend(chunk[start:end])

    def on_header_end() -> None:
        headers[bytes(header_name).lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_part_data(chunk: bytes, start: int, end: int) -> None:
        data.extend(chunk[start:end])

    def on_part_end() -> None:
        disposition, options = parse_options_header(headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise BadForm("a multipart part is not a form field")
        # parse_options_header drops the RFC 2231 form (filename*=utf-8''…): look at
        # the raw header too.
        if b"filename" in options or _FILENAME.search(headers.get(b"content-disposition", b"")):
            raise BadForm("this form takes no files")
        if len(items) >= MAX_FIELDS:
            raise BadForm(f"the form has more than {MAX_FIELDS} fields")
        try:
            items.append((options[b"name"].decode("utf-8"), bytes(data).decode("utf-8")))
        except UnicodeDecodeError:
            raise BadForm("the form is not UTF-8") from None

    try:
        # Inside the try: the parser refuses some boundaries (over 256 bytes) when made.
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": on_part_begin,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_part_data": on_part_data,
                "on_part_end": on_part_end,
            },
        )
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise BadForm(f"the multipart body is malformed ({exc})") from None
    return Form(items)
