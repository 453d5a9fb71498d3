"""Capture: running teachers once over a corpus and writing what they predict.

- :mod:`~logitstore.capture.corpus`: reading corpora (text, JSONL, Parquet, saved datasets) and
  packing them into windows;
- :mod:`~logitstore.capture.teacher`: loading teachers and the exact on-device statistics (top-k,
  tail, gold log-prob, entropy) of each position;
- :mod:`~logitstore.capture.lm_head`: the LM heads it knows how to apply in chunks;
- :mod:`~logitstore.capture.ranks`: ``torchrun`` ranks and their process group;
- :mod:`~logitstore.capture.dump`: ``logitstore dump`` (``DumpConfig``, ``dump``; also importable
  as ``logitstore.dump``).
"""
