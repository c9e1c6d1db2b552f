"""Flavor choice for a pool label, by Nodepool's rule (pure: flavors in, flavor out)."""


def choose_flavor(flavors, min_ram=None, flavor_name=None):
    """The flavor a label gets, or None.

    With ``min_ram``: the first flavor, sorted by (ram, name), with ram >= min_ram and, when
    ``flavor_name`` is also given, whose name contains it.  Without: the flavor whose name or
    id equals ``flavor_name``.
    """
    if min_ram is not None:
        for flavor in sorted(flavors, key=lambda f: (f.ram or 0, f.name or "")):
            if (flavor.ram or 0) >= min_ram and (not flavor_name or flavor_name in
                                                 (flavor.name or "")):
                return flavor
        return None
    if flavor_name:
        for flavor in flavors:
            if flavor_name in (flavor.name, flavor.id):
                return flavor
    return None
