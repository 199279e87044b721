"""Image files: reading and decoding them (with the errors a broken file gives), their sizes, folders and lists of
them, and the one conversion of a decoded image to a tensor."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from resnet_tasks.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
EXIF_ORIENTATION_TAG = 0x0112

# OpenCV's own thread pool fights the DataLoader's worker processes for the same cores.
cv2.setNumThreads(0)


class UnreadableImageError(UserError):
    """An image file that is missing, corrupt or truncated (training skips and counts these)."""


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array; a missing, corrupt or truncated file raises an error.

    OpenCV decodes JPEGs with libjpeg-turbo and gives the same pixels as PIL and torchvision.io at a lower
    cost (see the decode benchmark in the README); PIL is the fallback for formats OpenCV rejects. OpenCV silently
    decodes a truncated JPEG with a grey bottom, so the end-of-image marker is checked first.
    """
    path = Path(path)
    try:
        buffer = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise _cannot_read(path, error) from None
    return decode_image(buffer, path)


def read_image_bytes(path: str | Path) -> bytes:
    """A file's bytes; a missing or unreadable file raises `UnreadableImageError`, as `read_image` does."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise _cannot_read(path, error) from None


def _cannot_read(path: str | Path, error: OSError) -> UnreadableImageError:
    return UnreadableImageError(f"Cannot read image {path}: {error.strerror or error}. Check that the file exists.")


def jpeg_state(data: bytes) -> str:
    """ "complete", "truncated" (a JPEG without its end-of-image marker FFD9 near the end) or "other" (not JPEG)."""
    if len(data) < 4 or not data.startswith(b"\xff\xd8"):
        return "other"
    return "complete" if b"\xff\xd9" in data[-32:] else "truncated"


def decode_image(buffer: np.ndarray, path: str | Path) -> np.ndarray:
    """Decode an image file's bytes (uint8 array) like `read_image`; `path` names the image in errors."""
    head_and_tail = buffer[:2].tobytes() + buffer[2:][-32:].tobytes()  # (no copy of the whole file)
    if jpeg_state(head_and_tail) == "truncated":
        raise UnreadableImageError(f"Truncated JPEG {path} (no end-of-image marker). Re-download or remove it.")
    data = cv2.imdecode(buffer, cv2.IMREAD_COLOR) if buffer.size else None
    if data is None:
        try:
            with Image.open(io.BytesIO(buffer.tobytes())) as image:
                image.load()
                return np.asarray(image.convert("RGB"))
        except Exception as error:  # PIL raises many types for broken files
            raise UnreadableImageError(
                f"Corrupt or unreadable image {path} ({type(error).__name__}: {error}). Re-download or remove the file."
            ) from None
    return cv2.cvtColor(data, cv2.COLOR_BGR2RGB)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """An HxWxC array as a contiguous CxHxW tensor of the same dtype (one copy: the transpose)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def image_size_hw(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image as the decoder will return it, from the header only (EXIF rotation too)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            # OpenCV's decoder applies the EXIF orientation (stored before the pixels); orientations 5-8 swap the
            # axes. `info` holds EXIF read with the header: asking getexif() on a PNG without it decodes the image.
            if "exif" in image.info and image.getexif().get(EXIF_ORIENTATION_TAG, 1) in (5, 6, 7, 8):
                width, height = height, width
    except Exception as error:
        raise UserError(f"Corrupt or unreadable image {path} ({type(error).__name__}: {error}).") from None
    return height, width


def list_images(folder: str | Path) -> list[Path]:
    """All image files directly inside `folder`, sorted; UserError when the folder is missing or empty, or when
    two files share a stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"Image folder {folder} does not exist. Point --data.predict_path at a folder of images.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}.")
    # Predictions are keyed by file stem (masks/<stem>.png, image_id): two files with one stem would overwrite.
    by_stem: dict[str, Path] = {}
    for path in files:
        if path.stem in by_stem:
            raise UserError(
                f"{by_stem[path.stem]} and {path} share the stem {path.stem!r}; predictions are keyed by file stem, "
                "so one would overwrite the other. Rename or move one of them."
            )
        by_stem[path.stem] = path
    return files


def check_file(path: Path, what: str, hint: str) -> Path:
    """Return `path` if it exists, else raise UserError naming it, what it is and how to fix it."""
    if not path.exists():
        raise UserError(f"Missing {what}: {path}. {hint}")
    return path


def stems_from_list(path: Path) -> Sequence[str]:
    """Non-empty stripped lines of an ImageSets-style list file."""
    check_file(path, "image list", "Check the dataset layout (see data/README.md).")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
