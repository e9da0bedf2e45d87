"""Progress bars of the long offline jobs (synth, export, produce, evaluate-policy, bank,
calibrate): tqdm on stderr when stderr is a terminal, nothing otherwise (logs, CI, pipes)."""

from __future__ import annotations

import sys


class _Null:
    def update(self, n: int = 1) -> None: ...

    def set_description_str(self, desc: str) -> None: ...

    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None: ...


def progress_bar(total: int | None, desc: str, unit: str = "img", enabled: bool | None = None):
    """A tqdm bar (``enabled=None``: only when stderr is a TTY), else a no-op with the same methods."""
    if enabled is False or (enabled is None and not sys.stderr.isatty()):
        return _Null()
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
