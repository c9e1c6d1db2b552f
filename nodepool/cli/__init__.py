"""Command-line entry points: ``nodepool`` (operator CLI), ``nodepool-launcher``,
``nodepool-builder``."""
