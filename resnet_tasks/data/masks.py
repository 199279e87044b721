"""Label maps on disk: the PASCAL VOC palette, reading / writing class-index PNGs (pixel = class, 255 = ignore) and
reading SBD's .mat label maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from resnet_tasks.errors import UserError


def voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map (256 RGB entries, 768 ints) built by the usual bit interleaving."""
    palette: list[int] = []
    for index in range(256):
        red = green = blue = 0
        code = index
        for bit in range(8):
            red |= ((code >> 0) & 1) << (7 - bit)
            green |= ((code >> 1) & 1) << (7 - bit)
            blue |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette.extend((red, green, blue))
    return palette


VOC_PALETTE: list[int] = voc_palette()


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label PNG as an HxW uint8 array of class indices (palette indices, never converted to colour)."""
    path = Path(path)
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("P", "L"):
                raise UserError(
                    f"Mask {path} has mode {mask.mode!r}; expected a palette ('P') or grayscale ('L') PNG "
                    "whose pixel values are class indices (255 = ignore)."
                )
            return np.asarray(mask, dtype=np.uint8).copy()
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"Corrupt or unreadable mask {path} ({type(error).__name__}: {error}).") from None


def save_palette_mask(mask: np.ndarray, path: str | Path) -> None:
    """Write an HxW uint8 class map as a VOC-palette PNG (mode 'P': viewers show colours, values stay ids)."""
    picture = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    picture.putpalette(VOC_PALETTE)  # an "L" image becomes "P" with its values unchanged
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, optimize=False)


def read_sbd_mat(path: str | Path) -> np.ndarray:
    """SBD's `cls/<stem>.mat` -> HxW uint8 class map (field GTcls.Segmentation)."""
    try:
        import scipy.io
    except ImportError:
        raise UserError(
            f"Reading SBD masks ({path}) needs scipy, which resnet-tasks does not install by default: "
            "pip install scipy (or provide SegmentationClassAug/*.png instead)."
        ) from None
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=False, struct_as_record=True)
        segmentation = mat["GTcls"][0, 0]["Segmentation"]
    except Exception as error:  # scipy raises several types for broken or foreign files
        raise UserError(
            f"Cannot read SBD mask {path} ({type(error).__name__}: {error}); expected SBD's cls/*.mat with "
            "a GTcls struct holding Segmentation. Re-extract the SBD archive."
        ) from None
    return np.ascontiguousarray(segmentation, dtype=np.uint8)


def load_mask(path: str | Path) -> np.ndarray:
    """A label map from a palette/grayscale PNG or an SBD .mat file."""
    return read_sbd_mat(path) if str(path).endswith(".mat") else read_mask(path)
