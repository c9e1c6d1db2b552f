"""Configuration: ``load_config`` builds a ``model.Config`` from ``nodepool.yaml``;
``validate_config`` lists its problems for ``nodepool config-validate``."""
from .loader import ValidationReport, load_config, validate_config

__all__ = ["load_config", "validate_config", "ValidationReport"]
