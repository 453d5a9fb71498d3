"""trainer: distil students from a logitstore cache; the teacher never runs here."""

__version__ = "0.1.0"
