"""What `jobs.serve` accepts and answers, engine-free: query checks, the bearer token, thumbnails.

Every refusal is a `BadRequest` with a machine-readable `reason` (the JSON body's `reason`)
and an HTTP status; the service turns it into JSON and keeps running. A text over the limit is
not refused: it is cut at `max_chars` and the answer says so (`truncated`).
"""

from __future__ import annotations

import base64
import hmac
import io
import os
from dataclasses import dataclass, field

from PIL import Image

from pipeline.images import Reject, inspect_image, to_rgb

#: the reasons a request is refused (the JSON body's `reason`)
EMPTY_TEXT = "empty_text"
NO_QUERY = "no_query"
BAD_JSON = "bad_json"
BAD_FIELD = "bad_field"
TOO_LARGE = "request_too_large"
UNAUTHORIZED = "unauthorized"
NOT_FOUND = "not_found"
UNAVAILABLE = "unavailable"


class BadRequest(Exception):
    """A request the service refuses: `reason` for code, `detail` for people."""

    def __init__(self, reason: str, detail: str, status: int = 400):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.status = reason, detail, status

    def body(self) -> dict:
        return {"error": self.reason, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class TextQuery:
    text: str
    truncated: bool  # the text was longer than the limit and was cut to it
    chars: int  # its length as sent


def text_query(value: object, max_chars: int) -> TextQuery:
    """A query text: refused when missing, not a string or blank; cut at `max_chars`."""
    if value is None:
        raise BadRequest(NO_QUERY, "give a text (field 'text') or an image")
    if not isinstance(value, str):
        raise BadRequest(BAD_FIELD, f"'text' must be a string, not {type(value).__name__}")
    if not value.strip():
        raise BadRequest(EMPTY_TEXT, "the text is empty")
    return TextQuery(value[:max_chars], len(value) > max_chars, len(value))


def image_query(data: bytes, limits) -> Image.Image:
    """RGB image from uploaded bytes, checked as ingest checks files (`limits`: ImageLimits):
    not an image, a decompression bomb, too large or small, truncated: refused with that reason."""
    check = inspect_image(data, limits)
    if not check.ok:
        status = 413 if check.reason in (Reject.FILE_TOO_LARGE, Reject.DECOMPRESSION_BOMB, Reject.TOO_LARGE) else 400
        raise BadRequest(check.reason, check.detail, status)
    return to_rgb(Image.open(io.BytesIO(data)))


def positive_int(value: object, name: str, default: int, most: int) -> int:
    """An optional integer field in 1..most."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise BadRequest(BAD_FIELD, f"'{name}' must be an integer from 1 to {most}, got {value!r}")
    return value


def check_size(length: int | None, limit: int) -> None:
    if length is not None and length > limit:
        raise BadRequest(TOO_LARGE, f"{length} bytes > the limit of {limit} (serve.max_request_bytes)", 413)


# ---------------------------------------------------------------- auth
def read_token(env_var: str, token_file: str | None) -> str:
    """The service's bearer token: the environment variable (a Kubernetes Secret is mounted so)
    or the file; there is no service without one."""
    token = os.environ.get(env_var, "").strip()
    if not token and token_file:
        from pipeline.uri import read_text

        token = read_text(token_file).strip()
    if not token:
        raise ValueError(f"no bearer token: set {env_var} or serve.token_file (make serve writes one to .run/serve/token)")
    return token


@dataclass(frozen=True)
class BearerAuth:
    token: str = field(repr=False)

    def check(self, authorization: str | None) -> None:
        """Refuses (401) a request whose `Authorization` header is not `Bearer <token>`."""
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise BadRequest(UNAUTHORIZED, "send the header 'Authorization: Bearer <token>'", 401)


# ---------------------------------------------------------------- thumbnails
def thumbnail_jpeg(image: Image.Image, size: int, quality: int = 80) -> bytes:
    """A JPEG whose longest side is `size` (smaller images are not enlarged)."""
    small = to_rgb(image).copy()
    small.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
