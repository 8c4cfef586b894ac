"""`image_url` content parts: read (a `data:` URL, or an http(s) URL fetched under limits) and decode.

Every failure is a 400 naming the part (`messages[i].content[j]`), never a 500. Decoding uses Pillow; formats:
PNG, JPEG, WebP and GIF (its first frame). Fetching can be switched off, and by default it refuses hosts that
resolve to loopback, private, link-local or otherwise non-public addresses (a request must not make the server
reach into its own network), at every redirect too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
import warnings
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import httpx

from server.errors import bad_request

# MIME types and the Pillow formats they must decode as.
FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}
MAX_REDIRECTS = 3


@dataclass(frozen=True)
class ImageLimits:
    max_images: int = 16  # per request, all messages together
    max_bytes: int = 20 * 1024 * 1024  # encoded size of one image
    max_pixels: int = 4096 * 4096  # width x height of one image
    fetch: bool = True  # http(s) URLs allowed at all
    fetch_private: bool = False  # hosts on loopback / private / link-local / reserved addresses allowed
    fetch_timeout: float = 10.0  # seconds for one fetch, redirects included


def _fail(message: str, param: str, code: str) -> Exception:
    return bad_request(message, param=param, code=code)


def _decode(data: bytes, declared: str | None, limits: ImageLimits, param: str):
    """Bytes -> an RGB PIL image, checking size, format and pixels before the pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise _fail(f"The image is {len(data)} bytes; at most {limits.max_bytes} are accepted.", param,
                    "image_too_large")  # fmt: skip
    if declared is not None and declared not in FORMATS:
        raise _fail(
            f"Image type '{declared}' is not supported; send PNG, JPEG, WebP or GIF.", param, "unsupported_image_type"
        )
    decode_errors = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
                     Image.DecompressionBombWarning)  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=sorted(set(FORMATS.values())))
    except UnidentifiedImageError:
        raise _fail("The image could not be decoded; send PNG, JPEG, WebP or GIF.", param, "invalid_image") from None
    except decode_errors as exc:
        raise _fail(f"The image could not be decoded: {exc}", param, "invalid_image") from None
    width, height = image.size  # from the header: nothing decoded yet
    if width * height > limits.max_pixels:
        raise _fail(f"The image is {width}x{height} pixels; at most {limits.max_pixels} pixels are accepted.", param,
                    "image_too_large")  # fmt: skip
    if declared is not None and image.format != FORMATS[declared]:
        raise _fail(f"The data is a {image.format} image, not {declared}.", param, "invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.seek(0)  # an animated GIF or WebP: its first frame
            image.load()
            return image.convert("RGB")
    except decode_errors as exc:
        raise _fail(f"The image could not be decoded: {exc}", param, "invalid_image") from None


def _data_url(url: str, limits: ImageLimits, param: str):
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise _fail("A data URL needs a ',' before its data.", param, "invalid_image_url")
    parts = [p.strip().lower() for p in header.split(";")]
    mime = parts[0] or "text/plain"
    if not mime.startswith("image/") or mime not in FORMATS:
        raise _fail(f"Image type '{mime}' is not supported; send PNG, JPEG, WebP or GIF.", param,
                    "unsupported_image_type")  # fmt: skip
    # base64 grows data by 4/3: refuse what cannot fit before decoding it.
    if len(payload) > limits.max_bytes * 4 // 3 + 4:
        raise _fail(f"The image is larger than {limits.max_bytes} bytes.", param, "image_too_large")
    try:
        data = base64.b64decode(payload, validate=True) if "base64" in parts[1:] else unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise _fail("The data URL's base64 data is not valid.", param, "invalid_image") from None
    return _decode(data, mime, limits, param)


def _public(host: str, port: int) -> bool:
    """Whether every address the host resolves to is public (global unicast)."""
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return True  # the fetch itself fails and says so
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not address.is_global or address.is_multicast:
            return False
    return True


async def _fetch(url: str, limits: ImageLimits, param: str):
    if not limits.fetch:
        raise _fail("This server does not fetch image URLs; send the image as a data: URL.", param,
                    "image_fetch_disabled")  # fmt: skip

    async def get() -> tuple[bytes, str | None]:
        target = url
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                parts = urlsplit(target)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise _fail("Image URLs must be http(s) or data: URLs.", param, "invalid_image_url")
                port = parts.port or (443 if parts.scheme == "https" else 80)
                if not limits.fetch_private and not await asyncio.to_thread(_public, parts.hostname, port):
                    raise _fail(
                        f"The image URL's host '{parts.hostname}' is on a private, loopback or reserved address; "
                        "this server does not fetch from those.",
                        param,
                        "image_fetch_forbidden",
                    )
                async with client.stream("GET", target) as response:
                    if response.is_redirect and "location" in response.headers:
                        target = urljoin(target, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise _fail(f"Fetching the image failed: HTTP {response.status_code}.", param,
                                    "image_fetch_failed")  # fmt: skip
                    declared = response.headers.get("content-type", "").split(";")[0].strip().lower() or None
                    length = response.headers.get("content-length")
                    if length and length.isdigit() and int(length) > limits.max_bytes:
                        raise _fail(f"The image is {length} bytes; at most {limits.max_bytes} are accepted.", param,
                                    "image_too_large")  # fmt: skip
                    body = bytearray()
                    async for piece in response.aiter_bytes():
                        body += piece
                        if len(body) > limits.max_bytes:
                            raise _fail(f"The image is larger than {limits.max_bytes} bytes.", param,
                                        "image_too_large")  # fmt: skip
                    return bytes(body), declared
        raise _fail(f"Fetching the image followed more than {MAX_REDIRECTS} redirects.", param, "image_fetch_failed")

    try:
        async with asyncio.timeout(limits.fetch_timeout):
            data, declared = await get()
    except TimeoutError:
        raise _fail(f"Fetching the image took longer than {limits.fetch_timeout:g} s.", param,
                    "image_fetch_failed") from None  # fmt: skip
    except httpx.HTTPError as exc:
        raise _fail(f"Fetching the image failed: {type(exc).__name__}: {exc}", param, "image_fetch_failed") from None
    # A server that labels an image generically (octet-stream) is judged by the bytes alone.
    if declared is not None and not declared.startswith("image/"):
        declared = None
    return await asyncio.to_thread(_decode, data, declared, limits, param)


async def load_image(url: str, limits: ImageLimits, param: str):
    """An `image_url.url` as an RGB PIL image; raises a 400 APIError naming `param`."""
    if url.startswith("data:"):
        return await asyncio.to_thread(_data_url, url, limits, param)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise _fail("Image URLs must be http(s) or data: URLs.", param, "invalid_image_url")
    return await _fetch(url, limits, param)
