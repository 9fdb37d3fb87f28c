"""An in-process MQTT broker, so that ``ecg-edge demo`` runs with nothing else installed.

Deployments use Eclipse Mosquitto (broker/, docker/); this is amqtt (MQTT 3.1.1, pure Python) on
the edge's own asyncio loop, listening on loopback only, anonymous, without persistence and without
amqtt's ``$SYS`` and packet-logging plugins. It is for the demo and for trying the edge on a laptop,
not for serving a fleet.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Self

from amqtt.broker import Broker
from amqtt.contexts import BrokerConfig as AmqttConfig
from amqtt.contexts import ListenerConfig, ListenerType
from amqtt.errors import BrokerError

from edge.mosquitto import free_port
from edge.mqtt import BrokerConfig

log = logging.getLogger(__name__)

_PLUGINS = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}


class EmbeddedBroker:
    """amqtt on ``host:port`` (port 0: a free one) for as long as the context lasts.

    ``async with EmbeddedBroker() as broker:`` then ``broker.config`` is the :class:`BrokerConfig`
    that the edge's source, sink and simulated wearables connect with.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._broker: Broker | None = None

    @property
    def config(self) -> BrokerConfig:
        if self._broker is None:
            raise RuntimeError("the embedded broker is not running")
        return BrokerConfig(host=self.host, port=self.port)

    async def start(self) -> BrokerConfig:
        if self._broker is not None:
            return self.config
        tries = 3 if self.port == 0 else 1
        for attempt in range(tries):
            port = self.port or free_port(self.host)
            config = AmqttConfig(
                listeners={"default": ListenerConfig(type=ListenerType.TCP, bind=f"{self.host}:{port}")},
                plugins=dict(_PLUGINS),
            )
            broker = Broker(config)
            try:
                await broker.start()
            except BrokerError as exc:  # lost the race for a free port, or the given one is taken
                if attempt == tries - 1:
                    raise OSError(f"embedded MQTT broker cannot listen on {self.host}:{port}: {exc}") from exc
                continue
            self._broker, self.port = broker, port
            log.info("embedded MQTT broker (amqtt) listening on %s:%d", self.host, port)
            return self.config
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()
            log.info("embedded MQTT broker stopped")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
