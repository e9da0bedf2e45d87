"""Import torch/open_clip with a helpful error when the ``train`` extra is missing."""

from __future__ import annotations

from moderator.errors import MissingDependency


def require_train_extra():
    try:
        import open_clip  # noqa: F401, PLC0415
        import torch  # noqa: F401, PLC0415
    except ImportError as e:
        raise MissingDependency(
            f"this command needs torch and open_clip_torch ({e.name} is missing): "
            "pip install 'moderator[train]'"
        ) from e
