"""Progress bars (tqdm) that show tokens/s and ETA, or nothing when disabled; ``-q`` for the libraries."""

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


def quiet_libraries() -> None:
    """``-q`` (``logitstore`` and ``trainer``): no warnings, log lines or loading bars from the
    libraries (transformers, huggingface_hub, datasets, torch, accelerate, such as "Removed shared
    tensor ..." on every checkpoint of a tied student); errors still print, and so do our own
    warnings. Through the libraries' own switches, not environment variables, which would leak into
    every process this one starts (and into the callers of the Python API)."""
    import logging
    import warnings

    import datasets
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", module=r"(transformers|huggingface_hub|datasets|torch|tokenizers|accelerate|gguf)(\.|$)")
    for name in ("transformers", "huggingface_hub", "datasets", "torch", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
