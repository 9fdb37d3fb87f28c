"""``ecg-edge run``: build sources, sinks, models and metrics from ``edge.toml`` and run them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
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
        lost_s=p.lost_s, max_gap_s=p.max_gap_s, max_frame_s=p.max_frame_s, redraw=p.redraw,
        redraw_classes=tuple(p.redraw_classes),
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
        mqtt_sink = None
        # Names the edge's status topic and, in a cluster, the worker (sources.mqtt.shards = "auto").
        edge_id = (cfg.sinks.mqtt.edge_id if cfg.sinks.mqtt else None) or f"edge-{secrets.token_hex(4)}"
        members: list[Any] = []
        if cfg.sinks.mqtt is not None:
            from edge.mqtt import MqttSink

            mqtt_sink = MqttSink(broker_config(cfg), cfg.sinks.mqtt.topic_prefix,
                                 edge_id=edge_id)
            await mqtt_sink.update_status(models=anonymizer.models())  # in the first online status
            sinks.append(await stack.enter_async_context(mqtt_sink))
        if cfg.refresh.enabled:
            from edge.announce import load_public_key
            from edge.refresh import ModelRefresher

            refresher = ModelRefresher(
                broker_config(cfg), anonymizer, [load_public_key(p) for p in cfg.refresh.public_keys],
                topic_prefix=cfg.refresh.topic_prefix, max_model_bytes=cfg.refresh.max_model_bytes,
                report=mqtt_sink.update_status if mqtt_sink is not None else None,
            )
            await stack.enter_async_context(refresher)
        if cfg.sinks.wfdb is not None:
            from edge.sinks import WfdbSink

            sinks.append(WfdbSink(cfg.sinks.wfdb.directory))
        for m in cfg.sources.mqtt:
            from edge.mqtt import MqttSource, RawLimits, shard_subscriptions

            limits = RawLimits(max_samples=m.max_frame_samples)
            if m.shards == "auto":
                from edge.cluster import ShardedSource

                assert m.shard_count is not None  # the config requires it
                source = ShardedSource(broker_config(cfg), m.topic_prefix, edge_id=edge_id, shard_count=m.shard_count,
                                       handover_timeout_s=m.handover_timeout_s, limits=limits,
                                       max_gap_s=cfg.pipeline.max_gap_s)
                members.append(source)
            else:
                subscriptions = shard_subscriptions(m.shards, m.topic_prefix) if m.shards else None
                if m.shared_group:  # the broker keeps each topic on one member (docs/scale-out.md)
                    subscriptions = [f"$share/{m.shared_group}/{m.topic_prefix.rstrip('/')}/#"]
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
        if members:  # a stop hands this worker's shards to the others first
            from edge.cluster import hand_over_on_stop

            await hand_over_on_stop(service.run(sources, stop_when_sources_end), members)
        else:
            await service.run(sources, stop_when_sources_end)
    return service


def main(cfg: EdgeConfig) -> int:
    """Run until Ctrl-C or SIGTERM (what Docker and systemd send): both stop the edge the same,
    graceful way (shards handed over, sessions ended, offline status published)."""

    async def until_stopped() -> None:
        task = asyncio.current_task()
        assert task is not None
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows event loops
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await run(cfg)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(until_stopped())
    return 0
