"""Transports that carry teacher hidden states to student workers (registry ``transport``)."""

from kdlib.config.schema import TransportConfig
from kdlib.transport.base import TRANSPORTS, Transport, TransportStats, build_transport

TRANSPORTS.register("inprocess", "kdlib.transport.base:InProcessTransport", config=TransportConfig)
TRANSPORTS.register("ray", "kdlib.transport.ray:RayObjectTransport", config=TransportConfig)

__all__ = ["TRANSPORTS", "Transport", "TransportStats", "build_transport"]
