"""The launcher's status API (Nodepool's endpoints as text tables or JSON) and /metrics."""
