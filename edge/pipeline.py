"""The anonymizing pipeline over many streams: detector -> codec.encode -> classifier -> generator
-> codec.decode -> splicer, with the models batched across every live stream.

``feed`` checks and queues each frame; ``step`` runs the detector over every queued frame (one
``DetectorBank`` per sample rate: the frames of one tick go through it as arrays, not stream by
stream), then one model batch over whatever beats are ready in any stream, and emits each
stream's final output. A stream
never waits on another: ``step`` takes what is ready now, whoever it came from. The asyncio
service (``edge.service``) and file mode (``edge.anonymize``) drive the same object.

Fail closed (DESIGN.md, promise 1): a model that raises or returns non-finite beats, a detector
that raises, NaN input, gaps and rejected frames all turn the affected span into masked output
(NaN, flagged on the wire); raw samples never reach the output on any path.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edge import codec
from edge.detector import DetectorBank, DetectorConfig
from edge.frames import AnonBeat, AnonFrame, BadInput, Frame, SessionEnd, SessionInfo
from edge.metrics import EdgeMetrics
from edge.models import ClassifierSession, GeneratorSession
from edge.persona import Persona, keyed_pseudonym, random_pseudonym
from edge.stream import RR_FEATURES, BeatStream, ReadyBeats

log = logging.getLogger(__name__)


@dataclass
class PipelineSettings:
    """Knobs of the pipeline (the edge config's ``[pipeline]`` table)."""

    seed: int | None = None  # personas, latents and noise; None draws from the OS
    persona_spread: float = 1.0  # scale of the persona latent (0: every session the same shape)
    beat_spread: float = 1.0  # scale of the per-beat latent (0: no beat-to-beat variation)
    pseudonym_secret: bytes | None = None  # keyed, stable pseudonyms instead of random ones
    lost_s: float = 3.0  # mask stretches with no beat for longer than this
    max_gap_s: float = 10.0  # a longer gap in a device's samples ends its session
    max_frame_s: float = 10.0  # frames longer than this are rejected as oversize
    # Output goes out in chunks of at least this, or at once when a beat can (so a beat's latency
    # does not depend on it). Half a second is a Polar H10's own frame; shorter chunks cost a
    # message and an emit each (0.2 s: 3.6 emits per stream-second instead of 2, 3 % more CPU).
    emit_s: float = 0.5
    # Classifier-guided redraw: a surrogate of one of ``redraw_classes`` that the classifier does
    # not read as its class gets up to ``redraw`` fresh per-beat latents (0: off); the first draw
    # read as intended is kept, else the draw with the largest margin for the intended class.
    redraw: int = 0
    redraw_classes: tuple[str, ...] = ("S", "V", "F", "Q")
    detector: DetectorConfig = field(default_factory=DetectorConfig)


@dataclass
class StepOutput:
    """What one ``step`` (or ``feed`` / ``end``) produced, in order, for the sinks."""

    started: list[SessionInfo] = field(default_factory=list)
    frames: list[AnonFrame] = field(default_factory=list)
    beats: list[AnonBeat] = field(default_factory=list)
    ended: list[SessionInfo] = field(default_factory=list)

    def extend(self, other: StepOutput) -> None:
        self.started += other.started
        self.frames += other.frames
        self.beats += other.beats
        self.ended += other.ended

    def __bool__(self) -> bool:
        return bool(self.started or self.frames or self.beats or self.ended)


#: What ``feed`` returns for a frame that only joined its stream's queue: one shared empty output
#: (tuples, so it cannot be added to), where a new one per frame cost about 0.7 % of the
#: pipeline's time at 1,000 streams.
_NOTHING = StepOutput((), (), (), ())  # type: ignore[arg-type]


class Anonymizer:
    """Streams keyed by device; see the module docstring."""

    def __init__(
        self,
        generator: GeneratorSession | None,
        classifier: ClassifierSession | None,
        settings: PipelineSettings | None = None,
        metrics: EdgeMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or PipelineSettings()
        self.metrics = metrics or EdgeMetrics()
        self.clock = clock
        self.rng = np.random.default_rng(self.settings.seed)
        # Redraw latents come from a stream of their own: a beat that needs no redraw gets the
        # same surrogate with redraw on as off.
        self._redraw_rng = np.random.default_rng(None if self.settings.seed is None else [self.settings.seed, 1])
        self.generator: GeneratorSession | None = None
        self.classifier: ClassifierSession | None = None
        self.swap_models(generator, classifier)
        self.streams: dict[str, BeatStream] = {}
        self._info: dict[str, SessionInfo] = {}
        self._dirty: set[str] = set()  # devices fed since the last step
        # Device -> when its session opened: ``streams``' own order, to sort a step's few fed devices
        # by instead of walking every stream.
        self._opened: dict[str, int] = {}
        self._sessions_opened = itertools.count()
        self._banks: dict[float, DetectorBank] = {}  # the detectors of every stream of one rate
        self._queued: dict[str, BeatStream] = {}  # streams with frames the detector has not seen
        self._encoded: set[str] = set()  # devices whose streams have beats ready for the models
        # Frames and samples accepted since the last step: the counters take them once per step
        # (a Prometheus increment per frame costs more than the frame's checks).
        self._fed = [0, 0]

    # ------------------------------------------------------------------------------------------
    def swap_models(self, generator: GeneratorSession | None = None, classifier: ClassifierSession | None = None) -> None:
        """Use new (already checked and warmed-up) sessions from the next batch on."""
        for session in (generator, classifier):
            if session is None:
                continue
            if session.contract.codec != (self.generator or session).contract.codec:
                raise ValueError("the generator and classifier must share one beat codec")
            self.metrics.set_model(session.contract.kind, session.contract.version, session.sha256)
        self.generator = generator or self.generator
        self.classifier = classifier or self.classifier
        if self.generator is None:
            log.warning("no generator loaded: every beat is masked until one is")
        if self.classifier is None:
            log.warning("no classifier loaded: every beat is masked until one is")

    @property
    def spec(self) -> codec.CodecSpec:
        model = self.generator or self.classifier
        return model.contract.codec if model else codec.DEFAULT_SPEC

    def models(self) -> dict[str, str]:
        return {m.contract.kind: m.contract.version for m in (self.generator, self.classifier) if m}

    # ------------------------------------------------------------------------------------------
    def handle(self, event: Frame | SessionEnd | BadInput, now: float | None = None) -> StepOutput:
        """Take one source event (frames are buffered; call ``step`` to run the models)."""
        if isinstance(event, Frame):
            return self.feed(event, now)
        if isinstance(event, SessionEnd):
            return self.end(event.device, event.reason, now)
        self.bad_input(event)
        return StepOutput()

    def bad_input(self, event: BadInput) -> None:
        self.metrics.bad_input.labels(event.kind).inc()
        log.warning("bad input (%s)%s: %s", event.kind, "" if event.device is None else " from a device", event.detail)

    def feed(self, frame: Frame, now: float | None = None) -> StepOutput:
        """One frame of one device: checked and queued now, detection and models at the next ``step``."""
        now = self.clock() if now is None else now
        out = _NOTHING  # most frames only join their stream's queue; a session start or end makes a new one
        device, fs, seq = frame.device, frame.fs, frame.seq
        x = np.asarray(frame.samples, dtype=np.float64)
        n = x.size
        if x.ndim != 1 or n == 0:
            self.bad_input(BadInput("shape", f"a frame must be a non-empty 1-D array, got shape {x.shape}", device))
            return out
        if not (codec.MIN_FS <= fs <= codec.MAX_FS):  # NaN fails the comparison too
            self.bad_input(BadInput(
                "rate", f"sample rate {fs} Hz is outside {codec.MIN_FS:g}-{codec.MAX_FS:g} Hz; frame dropped", device))
            return out
        settings = self.settings
        stream = self.streams.get(device)
        if stream is not None:
            if stream.fs != fs:
                self.bad_input(BadInput("rate", f"sample rate changed from {stream.fs:g} to {fs:g} Hz: new session",
                                        device))
                out = self.end(device, "rate changed", now)
                stream = None
            elif seq is not None and (gap := seq - stream.seq0 - stream.head):
                if gap < 0:
                    self.bad_input(BadInput("order", f"frame starts at sample {seq}, {-gap} already received; dropped",
                                            device))
                    return out
                if gap > settings.max_gap_s * fs:
                    self.bad_input(BadInput("gap", f"{gap} samples missing (> {settings.max_gap_s:g} s): new session",
                                            device))
                    out = self.end(device, "gap", now)
                    stream = None
                else:  # the source counted it as bad input when it saw it; here it is filled
                    log.info("%s: %d missing samples masked", stream.pseudonym, gap)
                    stream.feed_gap(gap, now)
        if stream is None:
            out = StepOutput() if out is _NOTHING else out
            stream = self._open(frame, out)
        self._queued[device] = stream
        self._dirty.add(device)
        if n > settings.max_frame_s * fs:
            self.bad_input(BadInput(
                "oversize", f"frame of {n} samples is longer than {settings.max_frame_s:g} s; masked", device))
            stream.feed_gap(n, now)
            return out
        fed = self._fed
        fed[0] += 1
        fed[1] += n
        stream.feed(x, now)  # non-finite samples are counted as bad input when the step cleans them
        return out

    def _open(self, frame: Frame, out: StepOutput) -> BeatStream:
        s = self.settings
        pseudonym = keyed_pseudonym(frame.device, s.pseudonym_secret) if s.pseudonym_secret else random_pseudonym()
        dim = self.generator.contract.persona_dim if self.generator else 32
        persona = Persona.draw(self.rng, dim, s.persona_spread)
        bank = self._banks.get(frame.fs)
        if bank is None:
            bank = self._banks[frame.fs] = DetectorBank(frame.fs, s.detector)
        stream = BeatStream(frame.fs, pseudonym, persona, np.random.default_rng(self.rng.integers(2**63)),
                            self.spec, s.detector, s.lost_s, bank)
        stream.timestamp0 = frame.timestamp
        stream.seq0 = frame.seq or 0  # a device that numbers its samples may start mid-count
        self.streams[frame.device] = stream
        self._opened[frame.device] = next(self._sessions_opened)
        info = SessionInfo(pseudonym, frame.fs, "online", self.models(), time.time())
        self._info[frame.device] = info
        self.metrics.sessions.inc()
        self.metrics.streams.set(len(self.streams))
        log.info("session %s started at %g Hz", pseudonym, frame.fs)
        out.started.append(info)
        return stream

    def end(self, device: str, reason: str = "ended", now: float | None = None) -> StepOutput:
        """Close a device's session: decide and render what is left, emit everything."""
        out = StepOutput()
        stream = self.streams.get(device)
        if stream is None:
            return out
        now = self.clock() if now is None else now
        self.detect()
        stream.flush_detector()
        out.extend(self.step(now, final={device}))
        del self.streams[device]
        del self._opened[device]
        stream.close()
        if not self._banks[stream.fs]:  # the last stream of its rate
            del self._banks[stream.fs]
        info = self._info.pop(device)
        info.state = "ended"
        out.ended.append(info)
        self.metrics.streams.set(len(self.streams))
        log.info("session %s ended (%s) after %d samples", stream.pseudonym, reason, stream.head)
        return out

    def close(self) -> StepOutput:
        """End every session (shutdown, end of file)."""
        out = StepOutput()
        for device in list(self.streams):
            out.extend(self.end(device, "shutdown"))
        return out

    # ------------------------------------------------------------------------------------------
    def detect(self) -> None:
        """Run the detector over every queued frame (``step`` starts with this). In rounds of one
        frame per stream, so each stream's frames go through in order; in each round the frames of
        one bank and length are one array operation. A detector that fails masks its frames and
        starts afresh (fail closed)."""
        streams = list(self._queued.items())
        self._queued.clear()
        encoded = self._encoded
        while streams:
            groups: dict[tuple[DetectorBank, int], list[tuple[str, BeatStream, np.ndarray, bool]]] = {}
            for device, stream in streams:
                x, gap = stream.queue.popleft()
                groups.setdefault((stream.detector.bank, x.size), []).append((device, stream, x, gap))
            for (bank, _), members in groups.items():
                frames = np.array([m[2] for m in members])
                if not np.isfinite(frames).all():  # NaN marks bad samples (and fills gaps): mask them
                    for j, (device, stream, x, gap) in enumerate(members):
                        x, n_bad = stream.clean(x)
                        if n_bad:
                            frames[j] = x
                            members[j] = (device, stream, x, gap)
                            if not gap:  # a gap was counted where it was found
                                self.bad_input(BadInput("nan", f"{n_bad} of {x.size} samples are not finite; masked",
                                                        stream.pseudonym))
                rows = [m[1].detector.row for m in members]
                try:
                    peaks = bank.feed(rows, frames)
                    settled, floors, seen = bank.progress(rows)
                except Exception as exc:  # noqa: BLE001 - mask these frames, restart their detectors
                    log.error("detector failed on a frame of %d stream(s) (%s); frames masked, detectors restarted",
                              len(members), exc)
                    self.metrics.bad_input.labels("detector").inc(len(members))
                    for device, stream, x, _ in members:
                        if stream.detected(x, None):
                            encoded.add(device)
                    continue
                # Most frames return no beat and end no beat's post-R input: for them the stream
                # only needs to know where its detector is, not a call.
                for (device, stream, x, _), p, at, floor, n in zip(members, peaks, settled, floors, seen):
                    stream.settled, stream.floor = at, floor
                    if (p or n >= stream.wake) and stream.detected(x, p):
                        encoded.add(device)
            streams = [(d, s) for d, s in streams if s.queue]

    def step(self, now: float | None = None, final: set[str] | frozenset[str] = frozenset()) -> StepOutput:
        """Detection over the queued frames, one model batch over every stream's ready beats, then
        each stream's final output."""
        now = self.clock() if now is None else now
        self.detect()
        streams, order = self.streams, self._opened.__getitem__
        # Beats for the models: from the streams whose frames just encoded some, and those ending.
        # In the streams' own order, so the batch (and its draws) does not depend on set order.
        ready: list[tuple[str, BeatStream, ReadyBeats]] = []
        for device in sorted((d for d in (self._encoded | final if final else self._encoded) if d in streams), key=order):
            stream = streams[device]
            r = stream.ready(final=device in final)
            if r is not None:
                ready.append((device, stream, r))
        self._encoded = set()
        if ready:
            self._render(ready)
        # Output: only streams fed since the last step (or ending now) can have any.
        emitting: list[tuple[str, BeatStream, int | None]] = [(d, streams[d], None) for d in final if d in streams]
        chunk = {fs: round(self.settings.emit_s * fs) for fs in self._banks}  # output worth a message, per rate
        for device in self._dirty:
            stream = streams.get(device)
            if stream is not None and device not in final:
                until = stream.due(chunk[stream.fs])
                if until is not None:
                    emitting.append((device, stream, until))
        # (Streams not due: not worth a message yet; nothing changes that until they are fed again.)
        self._dirty = set()
        emitting.sort(key=lambda e: order(e[0]))
        out = StepOutput()
        classes = self.spec_classes()
        labels = [0] * len(classes)  # beats emitted per class; counters and totals go in once per step
        n_out = n_masked = 0
        for device, stream, until in emitting:
            is_final = until is None
            emitted = stream.emit(now, final=is_final, until=until)
            if len(emitted.samples) == 0 and not emitted.beats:
                continue
            out.frames.append(AnonFrame(stream.pseudonym, stream.fs, emitted.start, emitted.samples,
                                        self._time(stream, emitted.start)))
            for (r, label, model), latency in zip(emitted.beats, emitted.latency):
                out.beats.append(AnonBeat(stream.pseudonym, r, classes[label], stream.fs, self._time(stream, r), model))
                labels[label] += 1
                self.metrics.observe_latency(latency)
            n_out += len(emitted.samples)
            n_masked += emitted.masked
        self._count(labels, classes, n_out, n_masked)
        return out

    def _count(self, labels: list[int], classes: tuple[str, ...], n_out: int, n_masked: int) -> None:
        """One step's totals into the counters (inputs accepted since the last step, outputs now)."""
        m = self.metrics
        if self._fed[0]:
            m.frames.inc(self._fed[0])
            m.samples.inc(self._fed[1])
            self._fed = [0, 0]
        for name, k in zip(classes, labels):
            if k:
                m.beats.labels(name).inc(k)
        if n_out:
            m.output_samples.inc(n_out)
        if n_masked:
            m.masked_samples.inc(n_masked)

    def spec_classes(self) -> tuple[str, ...]:
        model = self.generator or self.classifier
        return model.contract.classes if model else ("N", "S", "V", "F", "Q")

    @staticmethod
    def _time(stream: BeatStream, sample: int) -> float | None:
        return None if stream.timestamp0 is None else stream.timestamp0 + sample / stream.fs

    def _render(self, ready: list[tuple[str, BeatStream, ReadyBeats]]) -> None:
        rr = np.array([v for _, _, r in ready for v in r.rr], dtype=np.float32).reshape(-1, len(RR_FEATURES))
        ok = np.array([v for _, _, r in ready for v in r.ok], dtype=bool)
        n = len(rr)
        batch = _Batch.of(ready)
        self.metrics.batch_beats.observe(n)
        labels = np.zeros(n, dtype=np.int64)
        surrogates = None
        reason = "input"
        rendered_by = self.generator.contract.version if self.generator else None  # the batch's one generator
        try:
            if self.classifier is None or self.generator is None:
                reason = "no model"
                raise RuntimeError("a model is missing")
            idx = np.flatnonzero(ok)
            if idx.size:
                reason = "codec"
                beats = _encode(ready, batch, self.spec)
                reason = "classifier"
                cls_rr = _columns(rr[idx], self.classifier.contract.rr_features)
                labels[idx] = self.classifier.classify(beats[idx], cls_rr)
                reason = "generator"
                personas = np.array([s.persona.latent for _, s, r in ready for _ in r.r])[idx]
                z = self.settings.beat_spread * self.rng.standard_normal((idx.size, self.generator.contract.beat_dim))
                gen_rr = _columns(rr[idx], self.generator.contract.rr_features)
                surrogates = _checked(self.generator.generate(personas, z, labels[idx], gen_rr), idx.size, self.spec.length)
                if self.settings.redraw > 0:
                    reason = "redraw"
                    guarded = [self.spec_classes().index(c) for c in self.settings.redraw_classes
                               if c in self.spec_classes()]
                    tries = redraw(self.generator, self.classifier, surrogates, personas, labels[idx], gen_rr,
                                   cls_rr, self.settings.redraw,
                                   guarded, lambda k: self.settings.beat_spread * self._redraw_rng.standard_normal(
                                       (k, self.generator.contract.beat_dim)))
                    if tries.hit:
                        self.metrics.redraws.labels("hit").inc(tries.hit)
                    if tries.miss:
                        self.metrics.redraws.labels("miss").inc(tries.miss)
                    if tries.rows:
                        self.metrics.redraw_rows.inc(tries.rows)
        except Exception as exc:  # noqa: BLE001 - any model failure fails closed
            if reason in ("codec", "classifier", "generator", "redraw"):
                self.metrics.model_errors.labels(reason).inc()
                log.error("%s failed on a batch of %d beats (%s): those beats are masked", reason, n, exc)
            ok = np.zeros(n, dtype=bool)
            surrogates = None
        rows_of = _decode(ready, batch, ok, surrogates, self.spec) if surrogates is not None else {}
        lo = 0
        for i, (_, stream, r) in enumerate(ready):
            hi = lo + len(r.r)
            mine_ok = ok[lo:hi]
            rows = rows_of.get(i)
            r.ok = mine_ok
            masked, dropped = stream.render(r, labels[lo:hi], rows, rendered_by)
            if masked:
                self.metrics.masked_beats.labels(reason if surrogates is None else "input").inc(masked)
            if dropped:
                self.metrics.late_beats.inc(dropped)
            lo = hi


def _checked(surrogates: np.ndarray, n: int, length: int) -> np.ndarray:
    """The generator's output, if it is ``n`` finite beats of ``length`` samples (else it failed)."""
    if surrogates.shape != (n, length) or not np.isfinite(surrogates).all():
        raise RuntimeError(f"generator returned {surrogates.shape} with non-finite values")
    return surrogates


@dataclass(frozen=True)
class Redraws:
    """What one ``redraw`` call did: beats read as intended only after a redraw (``hit``), beats
    never read as intended (``miss``), and generator rows drawn again in all (``rows``)."""

    hit: int
    miss: int
    rows: int


def _margin(classifier: ClassifierSession, beats: np.ndarray, rr: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Logit of each beat's intended class minus the largest other logit: > 0 iff it is read as intended."""
    logits = classifier.logits(beats, rr)
    rows = np.arange(len(labels))
    own = logits[rows, labels].copy()
    logits[rows, labels] = -np.inf
    return own - logits.max(axis=1)


def redraw(generator: GeneratorSession, classifier: ClassifierSession, surrogates: np.ndarray, personas: np.ndarray,
           labels: np.ndarray, gen_rr: np.ndarray, cls_rr: np.ndarray, tries: int, classes: list[int],
           draw_z: Callable[[int], np.ndarray]) -> Redraws:
    """Classifier-guided redraw, in place on ``surrogates``: each surrogate of a class in
    ``classes`` that ``classifier`` does not read as its class is generated again with a fresh
    per-beat latent from ``draw_z(k)``, up to ``tries`` times; the first draw read as intended is
    kept, else the draw with the largest margin for its class. Only the surrogate and the RR
    context (both already part of the output) go into the choice, never the input beat."""
    todo = np.flatnonzero(np.isin(labels, classes))
    if tries <= 0 or not todo.size:
        return Redraws(0, 0, 0)
    best = _margin(classifier, surrogates[todo], cls_rr[todo], labels[todo])
    missed0 = int(np.count_nonzero(best <= 0))
    rows = 0
    for _ in range(tries):
        open_ = np.flatnonzero(best <= 0)  # positions in ``todo`` not yet read as intended
        if not open_.size:
            break
        k = todo[open_]
        rows += k.size
        cand = _checked(generator.generate(personas[k], draw_z(k.size), labels[k], gen_rr[k]), k.size,
                        surrogates.shape[1])
        m = _margin(classifier, cand, cls_rr[k], labels[k])
        better = m > best[open_]
        surrogates[k[better]] = cand[better]
        best[open_[better]] = m[better]
    miss = int(np.count_nonzero(best <= 0))
    return Redraws(missed0 - miss, miss, rows)


@dataclass(frozen=True)
class _Batch:
    """Where each stream's beats sit in a step's batch, and the streams of each sample rate
    (the codec works on one rate at a time)."""

    starts: np.ndarray  # beats of ready[i] are rows starts[i] .. starts[i + 1] - 1
    by_rate: dict[float, list[int]]

    @classmethod
    def of(cls, ready: list[tuple[str, BeatStream, ReadyBeats]]) -> _Batch:
        by_rate: dict[float, list[int]] = {}
        for i, (_, stream, _) in enumerate(ready):
            by_rate.setdefault(stream.fs, []).append(i)
        return cls(np.cumsum([0] + [len(r.r) for _, _, r in ready]), by_rate)


def _encode(ready: list[tuple[str, BeatStream, ReadyBeats]], batch: _Batch, spec: codec.CodecSpec) -> np.ndarray:
    """Canonical beats of every ready beat, in ``ready`` order: one codec call per sample rate
    (the codec's cost per call is far above its cost per beat, so a beat or two per stream per
    step would spend most of the time in call overhead)."""
    if len(batch.by_rate) == 1:  # one rate, the usual case: the codec's rows are already in ``ready`` order
        (fs,) = batch.by_rate
        return codec.encode_windows(np.concatenate([r.windows for _, _, r in ready]), fs, spec)
    starts = batch.starts
    beats = np.empty((int(starts[-1]), spec.length), dtype=np.float32)
    for fs, members in batch.by_rate.items():
        encoded = codec.encode_windows(np.concatenate([ready[i][2].windows for i in members]), fs, spec)
        k = 0
        for i in members:
            m = len(ready[i][2].r)
            beats[starts[i] : starts[i] + m] = encoded[k : k + m]
            k += m
    return beats


def _decode(ready: list[tuple[str, BeatStream, ReadyBeats]], batch: _Batch, ok: np.ndarray, surrogates: np.ndarray,
            spec: codec.CodecSpec) -> dict[int, codec.DecodedBeats]:
    """Surrogates (one per ``ok`` beat, in ``ready`` order) onto each stream's clock at its
    persona's amplitude: one decode per sample rate, split back per stream."""
    counts = np.diff(batch.starts)
    owner = np.repeat(np.arange(len(ready)), counts)  # the ready entry of each beat in the batch
    row_of = np.cumsum(ok) - 1  # index into ``surrogates`` of each ok beat
    r_all = np.array([k for _, _, r in ready for k in r.r], dtype=np.int64)
    gain_all = np.repeat([s.persona.amplitude_mv for _, s, _ in ready], counts)
    out: dict[int, codec.DecodedBeats] = {}
    for fs, members in batch.by_rate.items():
        mine = ok if len(batch.by_rate) == 1 else ok & np.isin(owner, members)
        sel = np.flatnonzero(mine)  # in ``ready`` order, as ``surrogates`` is
        if not sel.size:
            continue
        decoded = codec.decode(surrogates[row_of[sel]], r_all[sel], fs, gain_all[sel], 0.0, spec)
        per_stream = np.bincount(owner[sel], minlength=len(ready))
        k = 0
        for i in members:
            m = int(per_stream[i])
            if m:
                out[i] = codec.DecodedBeats(start=decoded.start[k : k + m], samples=decoded.samples[k : k + m],
                                            r_offset=decoded.r_offset, fs=fs)
                k += m
    return out


def _columns(rr: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """The RR features a model asks for, in its order."""
    try:
        return rr[:, [RR_FEATURES.index(n) for n in names]]
    except ValueError:
        raise ValueError(f"model asks for RR features {names}; the edge computes {RR_FEATURES}") from None
