"""Image references in dataset rows, and opening them with clear errors.

A multimodal row names its images as a path (absolute, or relative to the data file), a
``file://`` URL, inline base64 (a ``data:image/...;base64,`` URL or the bare string), the
``{"bytes", "path"}`` dicts of a ``datasets`` Image column, or already-decoded PIL images. Each
becomes an :class:`ImageRef`; nothing is read until :func:`open_image`, which checks that the image
exists, decodes completely and is not larger than ``data.max_image_pixels`` (checked from the file
header, before the pixels are decoded). A failure is a :class:`BadImageError`, a one-line
:class:`~kdlib.errors.DataError` naming the data file, the row and the image; it carries a short
reason so that ``data.bad_images=drop`` can count dropped rows by cause. Remote (http) images are
never downloaded: these machines have no network, and a run should not depend on one.

References are small and picklable: they, not pixel tensors, are what the controller sends to the
workers, and each worker opens the images with its own processor (docs/vlm.md has the figures).
A ``datasets`` Image column is read undecoded (:mod:`kdlib.data.vision_samples`), so its references
hold the encoded file bytes rather than decoded pictures.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kdlib.config.schema import BadImages
from kdlib.errors import DataError, first_line

__all__ = ["BadImageError", "BadImages", "ImageRef", "image_digest", "image_ref", "open_image"]

_BASE64 = re.compile(r"^[A-Za-z0-9+/=\s]+$")
# Shorter strings are never taken for inline base64 (a 1x1 PNG is already about 90 characters).
_MIN_BASE64_CHARS = 64


class BadImageError(DataError):
    """An image of a row cannot be used; ``reason`` names the cause for drop counts."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImageRef:
    """Where one image of a sample comes from: a local file, inline bytes, or a decoded image."""

    path: Optional[Path] = None
    data: Optional[bytes] = None
    # A PIL image from a dataset that decodes its image column itself (compared by identity).
    decoded: Any = field(default=None, compare=False)

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        if self.data is not None:
            return f"inline image ({len(self.data)} bytes)"
        return "decoded image"


def image_ref(value: Any, base_dir: Path, where: str) -> ImageRef:
    """The reference for one image value of a row (see the module docstring for the forms)."""
    if isinstance(value, ImageRef):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return ImageRef(data=bytes(value["bytes"]))
        for key in ("path", "url"):
            if value.get(key):
                return image_ref(value[key], base_dir, where)
        raise DataError(f"{where}: image value {sorted(value)} has neither 'bytes', 'path' nor 'url'")
    if _is_pil_image(value):
        return ImageRef(decoded=value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: an image must be a path, a data URL or base64 text, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:"):
        header, _, payload = text.partition(",")
        if ";base64" not in header:
            raise BadImageError(f"{where}: image data URL is not base64 ({header})", "unreadable image")
        return ImageRef(data=_decode_base64(payload, where))
    if text.startswith(("http://", "https://")):
        raise BadImageError(
            f"{where}: remote image {text[:80]} is not downloaded; store the images locally and name the files",
            "remote image",
        )
    if text.startswith("file://"):
        text = text[len("file://"):]
    path = Path(text).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if len(text) >= _MIN_BASE64_CHARS and _BASE64.match(text) and not _exists(path):
        return ImageRef(data=_decode_base64(text, where))
    return ImageRef(path=path.resolve())


def open_image(ref: ImageRef, where: str, max_pixels: Optional[int] = None):
    """The image as an RGB PIL image, or a :class:`BadImageError` naming ``where`` and the image;
    ``max_pixels`` is ``data.max_image_pixels`` (None: no limit)."""
    from PIL import Image, UnidentifiedImageError

    name = ref.describe()
    if ref.decoded is not None:
        image = ref.decoded
    else:
        if ref.path is not None and ref.path.is_dir():
            raise BadImageError(f"{where}: image {name} is a directory, not an image file", "image not found")
        if ref.path is not None and not ref.path.is_file():
            raise BadImageError(f"{where}: image file not found: {name}", "image not found")
        try:
            image = Image.open(ref.path if ref.path is not None else io.BytesIO(ref.data))
        except Image.DecompressionBombError as exc:  # beyond Pillow's own limit (about 179M pixels)
            raise BadImageError(f"{where}: image {name} is too large: {first_line(exc)}", "image too large") from None
        except UnidentifiedImageError:
            raise BadImageError(f"{where}: cannot read image {name}: not an image format Pillow reads (or a "
                                "damaged file)", "unreadable image") from None
        except OSError as exc:
            raise BadImageError(f"{where}: cannot read image {name}: {first_line(exc)}", "unreadable image") from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise BadImageError(
            f"{where}: image {name} has {width}x{height} = {width * height} pixels, more than "
            f"data.max_image_pixels={max_pixels}",
            "image too large",
        )
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt pixel data
        raise BadImageError(f"{where}: cannot read image {name}: {first_line(exc)}", "unreadable image") from None


def image_digest(image) -> str:
    """Content hash of an opened (RGB) image: its size and pixels, which is what a processor reads
    (the same picture stored as PNG or inline base64 has one digest; any changed pixel, another)."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:32]


def _decode_base64(payload: str, where: str) -> bytes:
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadImageError(f"{where}: inline image is not valid base64", "unreadable image") from None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the file system (long base64 text) is no file
        return False


def _is_pil_image(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(value, Image.Image)
