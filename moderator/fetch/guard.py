"""Which addresses an image URL may reach (SSRF defence).

Only globally routable unicast addresses pass. Loopback, private (RFC 1918, ULA),
link-local, multicast, unspecified, reserved, shared (CGNAT) and documentation
ranges are refused, as are well-known cloud-metadata endpoints by address and by
name, unless an operator allow-lists a network or a host name. IPv6 forms that
embed an IPv4 address (v4-mapped, 6to4, NAT64, Teredo) are judged by that
address, so ``[::ffff:127.0.0.1]`` is loopback.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from moderator.errors import UrlAddressBlocked

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud instance-metadata services: credentials live there.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean...
    "169.254.170.2",  # AWS ECS task metadata
    "169.254.169.123",  # AWS time sync
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",  # Oracle Cloud
    "fd00:ec2::254",  # AWS IPv6 IMDS
))
METADATA_HOSTS = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "instance-data",
    "instance-data.ec2.internal", "metadata.azure.com", "metadata.tencentyun.com",
})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address stands for, if any; else ``ip`` itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip.teredo is not None:
            return ip.teredo[1]
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def classify(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address (None when it is)."""
    if ip in METADATA_ADDRESSES:
        return "cloud metadata"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "not globally routable"
    return None


class AddressPolicy:
    """Decides, per (host name, resolved address), whether a fetch may connect."""

    def __init__(self, allow_networks: Iterable[str] = (), allow_hosts: Iterable[str] = ()) -> None:
        self.allow_networks = tuple(ipaddress.ip_network(n, strict=False) for n in allow_networks)
        self.allow_hosts = frozenset(h.lower().rstrip(".") for h in allow_hosts)

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.allow_hosts

    def check_host(self, host: str) -> None:
        """Refuse metadata host names before resolving them."""
        name = host.lower().rstrip(".")
        if name in METADATA_HOSTS and not self.host_allowed(name):
            raise UrlAddressBlocked(f"host {host!r} is a cloud metadata endpoint")

    def check(self, host: str, ip: IPAddress) -> None:
        """Raise ``UrlAddressBlocked`` unless ``ip`` (resolved from ``host``) may be reached."""
        if self.host_allowed(host):
            return
        if any(ip in net for net in self.allow_networks):
            return
        inner = embedded_ipv4(ip)
        why = classify(inner) or (classify(ip) if inner is not ip else None)
        if why is None:
            return
        shown = f"{ip}" if inner is ip else f"{ip} (= {inner})"
        via = "" if _is_literal(host) else f" (resolved from {host!r})"
        raise UrlAddressBlocked(f"address {shown}{via} is {why}; refused before connecting")


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        return True
    except ValueError:
        return False
