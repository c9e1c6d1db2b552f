"""Why a pool declines, defers or gives up a request: typed values, rendered to text at the edge.

Decisions branch on ``Reason.kind`` (and ``Reason.label``), never on the message: rewording a
log line must not change what the launcher does.  ``str(reason)`` is the text recorded in the
request's ``declined_reasons`` and written to the log.
"""
import enum
from dataclasses import dataclass
from typing import Optional


class Why(enum.Enum):
    # a pool can never serve the request: it declines (forever, for that pool)
    POOL_DISABLED = "pool is disabled"
    LABEL_MISSING = "node type(s) not available"
    LABEL_BROKEN = "label cannot be served"
    IMAGE_MISSING = "image not available"
    PROVIDER_DOWN = "provider is not available"
    SLOTS_NEVER = "the pool's registered hosts can never serve all these nodes at once"
    POOL_LIMITS_EVER = "it would exceed the pool's limits"
    QUOTA_EVER = "it would exceed the cloud's quota"
    # an accepted request is given back
    LAUNCH_FAILED = "node launch failed"
    PROVIDER_REMOVED = "provider was removed from the configuration"
    # the request waits (defer): nothing is written
    TENANT_LIMIT = "tenant is at its resource limit"
    MAX_CONCURRENCY = "provider is at max-concurrency"
    POOL_FULL = "pool is at its limits"
    QUOTA_NOW = "provider is at cloud quota"
    NO_FREE_SLOT = "no free registered node"
    BACKOFF = "backing off after a refusal"
    LAUNCHING = "nodes are launching"

    @property
    def global_limit(self):
        """True for a limit no other pool of ours can get around (tenant limits are global)."""
        return self is Why.TENANT_LIMIT


@dataclass(frozen=True)
class Reason:
    kind: Why
    detail: str = ""                 # names, the cloud's or the image's own words
    label: Optional[str] = None      # the label concerned, when there is one

    def __str__(self):
        k = self.kind
        if k is Why.LABEL_MISSING:
            return f"node type(s) not available: {self.detail}"
        if k is Why.LABEL_BROKEN:
            return f"label {self.label} cannot be served: {self.detail}"
        if k is Why.IMAGE_MISSING:
            return f"image for label {self.label} not available: {self.detail}"
        if k is Why.PROVIDER_DOWN:
            return f"provider {self.detail}"
        if k is Why.TENANT_LIMIT:
            return f"tenant {self.detail} is at its resource limit"
        if k in (Why.NO_FREE_SLOT, Why.BACKOFF):
            return f"{k.value} for {self.detail}" if self.detail else k.value
        if k is Why.LAUNCH_FAILED and self.detail:
            return self.detail
        return f"{k.value}: {self.detail}" if self.detail else k.value
