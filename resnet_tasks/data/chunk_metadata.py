"""The folders `resnet-tasks optimize` writes (LitData chunks): the `resnet_tasks.json` beside LitData's index that
holds a split's label space, read and written on a local disk or an object store, and the optional LitData import."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from resnet_tasks.compat import litdata_file_system
from resnet_tasks.errors import UserError

METADATA_FILE = "resnet_tasks.json"
LITDATA_HINT = "Streaming needs LitData: pip install 'resnet-tasks[stream]' (or pip install litdata)."


def require_litdata() -> Any:
    """The `litdata` module; UserError naming the extra to install when it is missing."""
    try:
        import litdata
    except ImportError:
        raise UserError(LITDATA_HINT) from None
    return litdata


def write_metadata(out: str, metadata: dict[str, Any]) -> None:
    """`resnet_tasks.json` into an optimized folder (a local path or an object-store URI)."""
    text = json.dumps(metadata, indent=1) + "\n"
    if "://" not in out:
        Path(out, METADATA_FILE).write_text(text)
        return
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder, METADATA_FILE)
        local.write_text(text)
        _object_store(out).upload_file(str(local), f"{out.rstrip('/')}/{METADATA_FILE}")


def read_metadata(location: str) -> dict[str, Any]:
    """The `resnet_tasks.json` of an optimized folder (a local path or an object-store URI); UserError when the
    folder was not written by `resnet-tasks optimize`."""
    hint = (
        f"Write it with: resnet-tasks optimize --data.root DATASET --split SPLIT --out {location} "
        "(see the README's 'Streaming data' section)."
    )
    if "://" not in location:
        path = Path(location, METADATA_FILE)
        if not path.is_file():
            raise UserError(f"{location} is not an optimized split (no {METADATA_FILE}). {hint}")
        return json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder, METADATA_FILE)
        try:
            _object_store(location).download_file(f"{location.rstrip('/')}/{METADATA_FILE}", str(local))
        except Exception as error:  # the providers raise their own types
            reason = f"{type(error).__name__}: {error}"
            raise UserError(f"Cannot read {location}/{METADATA_FILE} ({reason}). {hint}") from None
        return json.loads(local.read_text())


def _object_store(url: str) -> Any:
    """LitData's file-system provider for `url` (s3://, gs://, ...), with the credentials of the environment."""
    require_litdata()
    return litdata_file_system(url)
