"""Who may open an association with the node: a pure decision, easy to test and to explain."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum

from dicom_node.settings import DicomSettings

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Rejection(Enum):
    """Why an association request was refused, with its A-ASSOCIATE-RJ (result, source, reason)."""

    CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
    CALLED_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x07)
    LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)

    @property
    def result_source_reason(self) -> tuple[int, int, int]:
        return self.value


@dataclass(frozen=True)
class AccessDecision:
    """``rejection`` is None when the association may proceed; ``reason`` is for people."""

    rejection: Rejection | None
    reason: str | None = None


ACCEPT = AccessDecision(None)


class AccessPolicy:
    """The allow-list of calling AE titles (each optionally bound to addresses) and limits."""

    def __init__(self, settings: DicomSettings) -> None:
        self._ae_title = settings.ae_title
        self._check_called = settings.require_called_ae_title
        self._max_associations = settings.max_associations
        # AE title -> networks it may connect from; None means from any address.
        self._callers: dict[str, list[_Network] | None] = {}
        for caller in settings.allowed_callers:
            known = self._callers.get(caller.ae_title, [])
            if not caller.hosts or known is None:
                self._callers[caller.ae_title] = None
            else:
                self._callers[caller.ae_title] = known + [
                    ipaddress.ip_network(host, strict=False) for host in caller.hosts
                ]

    @property
    def open_to_any_caller(self) -> bool:
        return not self._callers

    def decide(self, calling_ae: str, called_ae: str, peer_address: str, open_associations: int) -> AccessDecision:
        """Decide on one A-ASSOCIATE-RQ; ``open_associations`` excludes this one."""
        calling, called = calling_ae.strip(), called_ae.strip()
        if self._check_called and called != self._ae_title:
            return AccessDecision(
                Rejection.CALLED_AE_NOT_RECOGNIZED,
                f"called AE title {called!r} is not this node's {self._ae_title!r}",
            )
        if self._callers:
            if calling not in self._callers:
                return AccessDecision(
                    Rejection.CALLING_AE_NOT_RECOGNIZED, f"calling AE title {calling!r} is not in the allow-list"
                )
            if not self._address_allowed(calling, peer_address):
                return AccessDecision(
                    Rejection.CALLING_AE_NOT_RECOGNIZED,
                    f"calling AE title {calling!r} is not allowed from address {peer_address}",
                )
        if open_associations >= self._max_associations:
            return AccessDecision(
                Rejection.LOCAL_LIMIT_EXCEEDED,
                f"{open_associations} associations open, the maximum is {self._max_associations}",
            )
        return ACCEPT

    def _address_allowed(self, calling: str, peer_address: str) -> bool:
        networks = self._callers[calling]
        if networks is None:
            return True
        try:
            address = ipaddress.ip_address(peer_address.split("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in networks)
