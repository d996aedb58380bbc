"""Image URLs -> PIL images: `data:` URLs always, http(s) only from --allowed-media-domains.

Every failure is a MediaError naming the content part (`messages.0.content.1.image_url`), which
the server answers as a 400. A fetch never follows a redirect to another host and never reaches
a private, loopback or link-local address (the server must not become a proxy into its own
network); the body is read up to MAX_IMAGE_BYTES, within VLLM_IMAGE_FETCH_TIMEOUT seconds.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import socket
from urllib.parse import urljoin, urlsplit

from PIL import Image

MAX_IMAGE_BYTES = 20 << 20  # an encoded image (OpenAI's limit is 20 MB)
MAX_IMAGE_PIXELS = 4096 * 4096  # decoded; checked from the header, before decoding
MAX_REDIRECTS = 3  # same host only
DEFAULT_FETCH_TIMEOUT = 5.0  # seconds; vLLM's VLLM_IMAGE_FETCH_TIMEOUT


class MediaError(ValueError):
    """A bad image part; `param` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def fetch_timeout() -> float:
    return float(os.environ.get("VLLM_IMAGE_FETCH_TIMEOUT", DEFAULT_FETCH_TIMEOUT))


def load_image(url: str, allowed_domains: list[str] | None, param: str) -> Image.Image:
    """The RGB image a data: or http(s) URL holds."""
    if not isinstance(url, str) or not url:
        raise MediaError("the url must be a non-empty string", param)
    scheme = urlsplit(url).scheme.lower()
    if scheme == "data":
        data = _decode_data_url(url, param)
    elif scheme in ("http", "https"):
        data = _fetch(url, allowed_domains or [], param)
    else:
        raise MediaError(f"unsupported URL scheme {scheme!r}: use a data: URL or http(s)", param)
    return decode_image(data, param)


def decode_image(data: bytes, param: str) -> Image.Image:
    """Bytes -> RGB image; refuses what is not an image and what is too large, before decoding it."""
    if len(data) > MAX_IMAGE_BYTES:
        raise MediaError(f"the image has {len(data)} bytes, more than the limit of {MAX_IMAGE_BYTES}", param)
    try:
        image = Image.open(io.BytesIO(data))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(f"the payload is not an image PIL can read ({exc})", param) from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(f"the image is {width}x{height} pixels, more than the limit of {MAX_IMAGE_PIXELS} "
                         "pixels", param)
    try:
        image.load()
    except (OSError, ValueError) as exc:
        raise MediaError(f"the image is truncated or corrupt ({exc})", param) from None
    return image.convert("RGB")


def _decode_data_url(url: str, param: str) -> bytes:
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise MediaError("a data: URL needs a ',' before its payload", param)
    media_type = header.split(";")[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise MediaError(f"the data: URL holds {media_type!r}, not an image", param)
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise MediaError(f"the image has more than the limit of {MAX_IMAGE_BYTES} bytes", param)
    if not header.endswith(";base64"):
        raise MediaError("only base64 data: URLs are supported (data:image/png;base64,...)", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data: URL's payload is not valid base64", param) from None


def check_host(url: str, allowed_domains: list[str], param: str) -> None:
    """Only hosts of --allowed-media-domains, and only at public addresses."""
    host = (urlsplit(url).hostname or "").lower()
    if not host:
        raise MediaError("the URL has no host", param)
    if host not in allowed_domains:
        listed = ", ".join(allowed_domains) if allowed_domains else "none (start the server with "\
                 "--allowed-media-domains to allow some)"
        raise MediaError(f"host {host!r} is not in --allowed-media-domains; allowed: {listed}", param)
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError as exc:
        raise MediaError(f"cannot resolve host {host!r} ({exc})", param) from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global:
            raise MediaError(f"host {host!r} resolves to {ip}, a private, loopback or reserved address; "
                             "images are fetched from public addresses only", param)


def _fetch(url: str, allowed_domains: list[str], param: str) -> bytes:
    import httpx

    host = urlsplit(url).hostname
    timeout = fetch_timeout()
    with httpx.Client(follow_redirects=False, timeout=timeout) as client:
        for _ in range(MAX_REDIRECTS + 1):
            check_host(url, allowed_domains, param)
            try:
                with client.stream("GET", url) as response:
                    if response.is_redirect:
                        target = urljoin(url, response.headers.get("location", ""))
                        if urlsplit(target).hostname != host:
                            raise MediaError(f"the URL redirects to another host ({urlsplit(target).hostname!r}); "
                                             "redirects are followed within the same host only", param)
                        url = target
                        continue
                    if response.status_code != 200:
                        raise MediaError(f"fetching the image got HTTP {response.status_code}", param)
                    return _read_limited(response, param)
            except httpx.HTTPError as exc:
                raise MediaError(f"fetching the image failed ({type(exc).__name__}: {exc}; timeout "
                                 f"{timeout} s)", param) from None
    raise MediaError(f"more than {MAX_REDIRECTS} redirects", param)


def _read_limited(response, param: str) -> bytes:
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > MAX_IMAGE_BYTES:
            raise MediaError(f"the image has more than the limit of {MAX_IMAGE_BYTES} bytes", param)
    return bytes(body)
