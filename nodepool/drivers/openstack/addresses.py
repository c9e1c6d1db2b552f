"""Which of a server's addresses are public or private (pure: Nova addresses in, IPs out).

We pick addresses ourselves instead of trusting openstacksdk's ``interface_ip``, which is empty
for a server with only a fixed IP on a private network unless clouds.yaml says ``private: true``.
"""
import ipaddress


def _is_global(addr):
    try:
        return ipaddress.ip_address(addr).is_global
    except ValueError:
        return False


def classify_addresses(addresses, external_networks=()):
    """``{"public_ipv4", "private_ipv4", "public_ipv6"}`` from Nova's ``addresses`` dict.

    Floating IPs and fixed IPs on an external network (by name) are public; a fixed IPv4 on any
    other network is private; an IPv6 is public when globally routable or on an external
    network.  The first address of each kind wins.
    """
    out = {"public_ipv4": None, "private_ipv4": None, "public_ipv6": None}
    for network, entries in (addresses or {}).items():
        for entry in entries or []:
            addr = entry.get("addr")
            if not addr:
                continue
            version = entry.get("version") or (6 if ":" in addr else 4)
            kind = entry.get("OS-EXT-IPS:type")
            external = network in external_networks or kind == "floating"
            if version == 4:
                key = "public_ipv4" if external else "private_ipv4"
            elif external or _is_global(addr):
                key = "public_ipv6"
            else:
                continue
            if out[key] is None:
                out[key] = addr
    return out
