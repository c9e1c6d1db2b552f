"""EC2 vCPU service quotas per instance family (pure functions).

AWS limits running on-demand and spot instances by vCPUs per family group, each group with
a Service Quotas code.  A node's cost therefore carries, besides instances/cores/ram, its vCPUs
under the code of its family, and the account's limits come back under the same codes, so the
generic quota arithmetic works unchanged (``Resources`` with the code as a resource name).
"""
import re

# family prefix -> (on-demand code, spot code)
FAMILY_CODES = {
    "standard": ("L-1216C47A", "L-34B43A08"),   # A, C, D, H, I, M, R, T, Z
    "f": ("L-74FC7D96", "L-88CF9481"),
    "g": ("L-DB2E81BA", "L-3819A6DF"),
    "vt": ("L-DB2E81BA", "L-3819A6DF"),
    "inf": ("L-1945791B", "L-B5D1601B"),
    "p": ("L-417A185B", "L-7212CCBC"),
    "x": ("L-7295265B", "L-E3A00192"),
    "dl": ("L-6E869C2A", "L-85EED4F7"),
    "trn": ("L-2C3B7624", "L-6B0D517C"),
    "hpc": ("L-F7808C92", None),
}

_FAMILY = re.compile(r"^([a-z]+?)(?=\d|-|$)")


def instance_family(instance_type):
    """``"t3.medium"`` -> ``"t"``; ``"inf2.xlarge"`` -> ``"inf"``; ``"u-6tb1.metal"`` -> ``"u"``."""
    head = (instance_type or "").split(".", 1)[0].lower()
    match = _FAMILY.match(head)
    return match.group(1) if match else head


def quota_code(instance_type, spot=False):
    """The Service Quotas code that counts this type's vCPUs (None if none applies)."""
    family = instance_family(instance_type)
    on_demand, spot_code = FAMILY_CODES.get(family, FAMILY_CODES["standard"])
    return spot_code if spot else on_demand


def all_codes():
    """Every code we know, on-demand and spot."""
    return sorted({c for pair in FAMILY_CODES.values() for c in pair if c})
