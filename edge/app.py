"""``ecg-edge run``: build sources, sinks, models and metrics from ``edge.toml`` and run them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from edge.anonymize import load_models
from edge.config import EdgeConfig
from edge.frames import SourceEvent
from edge.metrics import EdgeMetrics
from edge.pipeline import Anonymizer, PipelineSettings
from edge.replay import read_wfdb, replay
from edge.service import EdgeService

log = logging.getLogger(__name__)


def broker_config(cfg: EdgeConfig) -> Any:
    from edge.mqtt import BrokerConfig

    b = cfg.broker
    return BrokerConfig(
        host=b.host, port=b.port, tls=b.tls, ca_file=str(b.ca_file) if b.ca_file else None,
        cert_file=str(b.cert_file) if b.cert_file else None, key_file=str(b.key_file) if b.key_file else None,
        username=b.username, password=b.password(), client_id=b.client_id, keepalive=b.keepalive,
    )


def pipeline_settings(cfg: EdgeConfig) -> PipelineSettings:
    p = cfg.pipeline
    return PipelineSettings(
        seed=p.seed, persona_spread=p.persona_spread, beat_spread=p.beat_spread, pseudonym_secret=p.secret(),
        lost_s=p.lost_s, max_gap_s=p.max_gap_s, max_frame_s=p.max_frame_s,
    )


async def run(cfg: EdgeConfig, stop_when_sources_end: bool = False) -> EdgeService:
    """Run the edge as configured until cancelled (or until finite sources end, if asked)."""
    gen, cls = load_models(cfg.models.generator, cfg.models.classifier)
    metrics = EdgeMetrics()
    if cfg.metrics.port:
        metrics.serve(cfg.metrics.port, cfg.metrics.address)
        log.info("metrics on http://%s:%d/metrics", cfg.metrics.address, cfg.metrics.port)
    anonymizer = Anonymizer(gen, cls, pipeline_settings(cfg), metrics)
    async with contextlib.AsyncExitStack() as stack:
        sinks: list[Any] = []
        sources: list[AsyncIterator[SourceEvent]] = []
        if cfg.sinks.mqtt is not None:
            from edge.mqtt import MqttSink

            sink = MqttSink(broker_config(cfg), cfg.sinks.mqtt.topic_prefix,
                            edge_id=cfg.sinks.mqtt.edge_id or f"edge-{secrets.token_hex(4)}")
            sinks.append(await stack.enter_async_context(sink))
        if cfg.sinks.wfdb is not None:
            from edge.sinks import WfdbSink

            sinks.append(WfdbSink(cfg.sinks.wfdb.directory))
        for m in cfg.sources.mqtt:
            from edge.mqtt import MqttSource, RawLimits, shard_subscriptions

            limits = RawLimits(max_samples=m.max_frame_samples)
            subscriptions = shard_subscriptions(m.shards, m.topic_prefix) if m.shards else None
            source = MqttSource(broker_config(cfg), m.topic_prefix, subscriptions=subscriptions, limits=limits,
                                max_gap_s=cfg.pipeline.max_gap_s)
            sources.append(aiter(await stack.enter_async_context(source)))
        for b in cfg.sources.ble:
            from edge.ble import Backoff, PolarH10Source

            sources.append(aiter(PolarH10Source(b.address, name_prefix=b.name_prefix,
                                                backoff=Backoff(b.reconnect_initial_s, b.reconnect_max_s))))
        for r in cfg.sources.replay:
            signal, fs, _ = read_wfdb(r.record, r.channel)
            sources.append(replay(r.device or f"wfdb:{r.record.name}", signal, fs, r.frame_s, r.speed))
        service = EdgeService(anonymizer, sinks, cfg.pipeline.tick_s)
        log.info("edge running: %d source(s), %d sink(s), generator v%s, classifier v%s", len(sources), len(sinks),
                 gen.contract.version, cls.contract.version)
        await service.run(sources, stop_when_sources_end)
    return service


def main(cfg: EdgeConfig) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(cfg))
    return 0
