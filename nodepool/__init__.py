"""Nodepool: keeps CI systems supplied with ready test machines."""
__version__ = "0.1.0"
