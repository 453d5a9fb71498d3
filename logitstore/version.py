"""The package version (also in pyproject.toml), recorded in every manifest's ``created_by``."""

__version__ = "0.1.0"
