"""Progress bars (tqdm) that show tokens/s and ETA, or nothing when disabled."""

from __future__ import annotations

from contextlib import contextmanager

from tqdm.auto import tqdm


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True):
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not enabled, dynamic_ncols=True, smoothing=0.1)
    try:
        yield bar
    finally:
        bar.close()
