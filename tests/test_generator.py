"""The beat GAN end to end on real MIT-BIH slices: tiny schedules, real code paths.

Networks are narrowed and trained for a handful of steps, so nothing here says the surrogates are
good (docs/generator.md measures that on the whole database); it says the wiring is right: the
conditioning inputs reach the output, personas and latents behave as the edge expects, training
resumes exactly where it stopped, and the ONNX graph computes what torch computes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge.codec import DEFAULT_SPEC
from edge.models import GeneratorSession
from edge.records import AAMI_CLASSES
from trainer.dataset import BeatSet, build_beatset
from trainer.generator import (
    BeatGenerator,
    GeneratorConfig,
    SetCritic,
    SetSampler,
    augment_sets,
    blend_sets,
    canonical,
    fit_generator,
    generator_contract,
    rr_inputs,
    sample_beats,
    subjects,
    surrogate_set,
)
from trainer.image_baseline import (
    ImageBaseline,
    ImageBaselineConfig,
    beats_to_images,
    fit_image_baseline,
    images_to_beats,
    round_trip_error,
)
from trainer.runs import Run

DATA = Path(__file__).parent / "data"
TINY = GeneratorConfig(
    persona_dim=8, beat_dim=4, label_dim=4, style_dim=16, widths=(16, 12, 8, 8, 8), critic_widths=(8, 8, 16, 16),
    critic_features=16, set_size=4, sets_per_batch=4, critic_group=2, steps=4, log_every=1, checkpoint_every=2,
)
INPUTS = ("persona", "z", "label", "rr")
# the TorchScript exporter (the one trainer/export.py uses) announces its own deprecation
LEGACY_EXPORT_WARNINGS = (
    r"ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning",
    r"ignore:The feature will be removed. Please remove usage of this function:DeprecationWarning",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """Tiny networks: one thread is fastest, and CI machines are often oversubscribed."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def train() -> BeatSet:
    return build_beatset(["100", "119", "208"], DATA)


@pytest.fixture(scope="module")
def trained(train: BeatSet, tmp_path_factory: pytest.TempPathFactory) -> tuple[BeatGenerator, Path]:
    path = tmp_path_factory.mktemp("gan")
    return fit_generator(train, Run(dir=path, progress_bar=False), TINY), path


@pytest.fixture(scope="module")
def structured() -> BeatGenerator:
    """A generator with wide random weights, so its beats have structure.

    A barely trained net emits a near-flat line; the amplitude rule then divides float noise by a
    tiny R deflection, and a parity check would measure that noise instead of the graph.
    """
    torch.manual_seed(0)
    gen = BeatGenerator(TINY).eval()
    with torch.no_grad():
        for p in gen.parameters():
            p.normal_(0.0, 0.5)
    return gen


def _inputs(n: int, seed: int, cfg: GeneratorConfig = TINY) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return {
        "persona": torch.from_numpy(rng.standard_normal((n, cfg.persona_dim)).astype(np.float32)),
        "z": torch.from_numpy(rng.standard_normal((n, cfg.beat_dim)).astype(np.float32)),
        "label": torch.from_numpy(rng.integers(0, len(AAMI_CLASSES), n)),
        "rr": torch.from_numpy(rng.uniform(0.3, 2.0, (n, 2)).astype(np.float32)),
    }


def test_tiny_training_gives_canonical_finite_beats(trained: tuple[BeatGenerator, Path], train: BeatSet) -> None:
    gen, path = trained
    beats = sample_beats(gen, train.labels[:50], train.rr[:50], rng=np.random.default_rng(0))
    assert beats.shape == (50, DEFAULT_SPEC.length) and beats.dtype == np.float32
    assert np.all(np.isfinite(beats))
    r, h = DEFAULT_SPEC.pre, DEFAULT_SPEC.amplitude_n
    # the codec's amplitude rule holds by construction: the largest deflection near R is 1
    np.testing.assert_allclose(np.abs(beats[:, r - h : r + h + 1]).max(1), 1.0, atol=1e-5)
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(row["d_loss"]) and np.isfinite(row["g_loss"]) for row in rows)


def test_conditioning_reaches_the_output(trained: tuple[BeatGenerator, Path]) -> None:
    gen, _ = trained
    x = _inputs(5, 1)
    with torch.no_grad():
        base = gen(**x)
        assert torch.equal(base, gen(**x))  # same persona, z, class, RR: the same beat
        for c in range(1, len(AAMI_CLASSES)):
            other = gen(**{**x, "label": (x["label"] + c) % len(AAMI_CLASSES)})
            assert (other - base).abs().amax(1).min() > 1e-4, "the class must change every beat"
        persona = gen(**{**x, "persona": torch.roll(x["persona"], 1, 0) + 1.0})
        assert (persona - base).abs().amax(1).min() > 1e-4, "another persona must give another beat"
        z = gen(**{**x, "z": x["z"] + 1.0})
        assert (z - base).abs().amax(1).min() > 1e-6
        rr = gen(**{**x, "rr": x["rr"] * 0.7})
        assert (rr - base).abs().amax(1).min() > 1e-6


def test_sample_beats_shares_one_persona_and_is_reproducible(
    trained: tuple[BeatGenerator, Path], train: BeatSet
) -> None:
    gen, _ = trained
    labels, rr = np.zeros(6, np.int64), np.full((6, 3), 0.8, np.float32)
    a = sample_beats(gen, labels, rr, rng=np.random.default_rng(3))
    b = sample_beats(gen, labels, rr, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    persona = np.random.default_rng(4).standard_normal(TINY.persona_dim).astype(np.float32)
    # one persona for the whole call: only z differs between these beats
    with torch.no_grad():
        z_only = sample_beats(gen, labels, rr, persona=persona, rng=np.random.default_rng(5))
        other = sample_beats(gen, labels, rr, persona=persona + 2.0, rng=np.random.default_rng(5))
    assert not np.allclose(z_only, other)
    with pytest.raises(ValueError, match="persona must be"):
        sample_beats(gen, labels, rr, persona=np.zeros((2, TINY.persona_dim), np.float32))
    surrogates = surrogate_set(gen, train, np.random.default_rng(0))
    assert surrogates.shape == train.beats.shape and np.all(np.isfinite(surrogates))


def test_resume_continues_exactly(train: BeatSet, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = fit_generator(train, Run(dir=tmp_path / "a", progress_bar=False), TINY)
    half = GeneratorConfig(**{**TINY.__dict__, "steps": 2})
    fit_generator(train, Run(dir=tmp_path / "b", progress_bar=False), half)
    assert Run(dir=tmp_path / "b").load_checkpoint()["step"] == 2
    resumed = fit_generator(train, Run(dir=tmp_path / "b", progress_bar=False), TINY)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert Run(dir=tmp_path / "b").load_checkpoint()["step"] == 4
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"{name} differs after resuming"


def test_wgan_gp_alternative_trains(train: BeatSet, tmp_path: Path) -> None:
    cfg = GeneratorConfig(**{**TINY.__dict__, "loss": "wgan-gp", "steps": 2})
    gen = fit_generator(train, Run(dir=tmp_path, progress_bar=False), cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["d_loss"]) for r in rows)
    assert np.all(np.isfinite(sample_beats(gen, [0, 2], np.full((2, 2), 0.8), rng=np.random.default_rng(0))))


def test_population_augmentation_trains(train: BeatSet, tmp_path: Path) -> None:
    """Blended, stretched and re-weighted real sets reach the critic, and training stays finite."""
    cfg = dataclasses.replace(TINY, steps=2, subject_mix=(0.2, 0.5), subject_warp=0.15, wave_gain=0.3)
    gen = fit_generator(train, Run(dir=tmp_path, progress_bar=False), cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["d_loss"]) and np.isfinite(r["g_loss"]) for r in rows)
    assert np.all(np.isfinite(sample_beats(gen, [0, 2], np.full((2, 2), 0.8), rng=np.random.default_rng(0))))


def test_set_sampler_keeps_sets_within_one_record(train: BeatSet) -> None:
    sampler = SetSampler(train, TINY, np.random.default_rng(0))
    sets = sampler.sample(200)
    assert sets.shape == (200, TINY.set_size)
    assert all(len(set(train.record[s])) == 1 for s in sets)
    labels = train.labels[sets]
    for c in ("V", "F"):  # rare in the data, focused on by design
        assert np.mean(np.any(labels == AAMI_CLASSES.index(c), axis=1)) > 0.1


def test_records_of_one_person_are_one_subject() -> None:
    np.testing.assert_array_equal(subjects(np.array(["201", "202", "100"])), ["201", "201", "100"])


def test_critic_scores_sets() -> None:
    critic = SetCritic(TINY).eval()  # eval: spectral norm's power iteration stays put between calls
    beats = torch.randn(3, TINY.set_size, DEFAULT_SPEC.length)
    label = torch.zeros(3, TINY.set_size, dtype=torch.int64)
    rr = torch.full((3, TINY.set_size, 2), 0.8)
    scores = critic(beats, label, rr)
    assert scores.shape == (3,)
    # the set score depends on the whole set: changing one beat changes only its set's score
    beats2 = beats.clone()
    beats2[1, 0] += 1.0
    diff = (critic(beats2, label, rr) - scores).abs()
    assert diff[1] > 0 and diff[0] == 0 and diff[2] == 0


def test_canonical_matches_the_codec_rules() -> None:
    from edge.codec import (
        _baseline,  # the codec's own baseline line: the rule the generator must follow
    )

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, DEFAULT_SPEC.length)) + np.linspace(0, 3, DEFAULT_SPEC.length)
    line, _, _ = _baseline(x, DEFAULT_SPEC)
    r, h = DEFAULT_SPEC.pre, DEFAULT_SPEC.amplitude_n
    expected = (x - line) / np.abs((x - line)[:, r - h : r + h + 1]).max(1, keepdims=True)
    got = canonical(torch.from_numpy(x.astype(np.float32))).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.abs(got[:, r - h : r + h + 1]).max(1), 1.0, atol=1e-6)


def test_rr_normalisation_is_log_rate_and_prematurity() -> None:
    out = rr_inputs(torch.tensor([[0.8, 0.8], [0.4, 0.8], [0.01, 100.0]]))
    np.testing.assert_allclose(out[0].numpy(), [0.0, 0.0], atol=1e-6)
    assert out[1, 0] == 0 and out[1, 1] < -3  # premature: pre_rr is half the local mean
    assert torch.all(torch.isfinite(out))  # clamped, not log(0)


def test_inference_form_is_the_same_function(structured: BeatGenerator) -> None:
    """Each block's upsampling and convolution folded into one polyphase convolution: same beats,
    the ends included (where the upsampling repeats edge samples), and no upsampling left."""
    fast = structured.inference_form()
    assert not any(isinstance(m, torch.nn.Upsample) for m in fast.modules())
    x = _inputs(64, 3)
    with torch.no_grad():
        slow, quick = structured(**x), fast(**x)
        block, poly = structured.blocks[0], fast.blocks[0]
        h = torch.randn(5, block.conv.in_channels, 12)
        cond = torch.randn(5, block.film.in_features)
        # block by block, before the amplitude rule can magnify rounding
        np.testing.assert_allclose(poly(h, cond).numpy(), block(h, cond).numpy(), atol=1e-5, rtol=1e-5)
    assert float((slow - quick).abs().max()) < 1e-4
    assert structured.blocks[0].conv.weight.shape[-1] == 5  # the trained module is left as it was


def test_set_augmentation_makes_one_new_person_per_set(train: BeatSet) -> None:
    """Population augmentation: every beat of a set moved the same way, sets moved differently,
    the QRS and the codec's rules kept."""
    beats = torch.from_numpy(np.ascontiguousarray(train.beats[:48])).view(6, 8, -1)
    torch.manual_seed(1)
    out = augment_sets(beats, 0.15, 0.3)
    assert out.shape == beats.shape and torch.isfinite(out).all()
    r, h = DEFAULT_SPEC.pre, DEFAULT_SPEC.amplitude_n
    np.testing.assert_allclose(out[:, :, r - h : r + h + 1].abs().amax(dim=2).numpy(), 1.0, atol=1e-6)  # codec amplitude
    np.testing.assert_allclose(out[:, :, r].numpy(), beats[:, :, r].numpy(), atol=0.05)  # R stays on R
    change = (out - beats).abs().mean(dim=2)  # (sets, beats)
    assert float(change.min()) > 1e-3  # every beat moved
    # A set's transform is one person's: the same record's beats move alike within a set.
    same = augment_sets(beats[:1].expand(2, 8, -1).contiguous(), 0.15, 0.3)
    assert not torch.allclose(same[0], same[1])  # two sets of the same beats: two people
    torch.manual_seed(1)
    assert torch.equal(augment_sets(beats, 0.0, 0.0), canonical(beats.reshape(48, -1)).view(6, 8, -1))


def test_subject_blend_pairs_each_set_with_one_other_subject(train: BeatSet) -> None:
    """Each set's partner beats come from one other subject and match the set's classes beat by
    beat; the blend stays within the share asked for."""
    sampler = SetSampler(train, dataclasses.replace(TINY, subject_mix=(0.2, 0.5)), np.random.default_rng(0))
    idx = sampler.sample(12)
    partner = sampler.partners(idx)
    who = subjects(train.record)
    paired = partner[:, 0] >= 0
    assert paired.sum() >= 6
    for i in np.flatnonzero(paired):
        assert len(set(who[partner[i]])) == 1 and who[partner[i][0]] != who[idx[i][0]]
        np.testing.assert_array_equal(train.labels[partner[i]], train.labels[idx[i]])
    beats = torch.from_numpy(np.ascontiguousarray(train.beats))
    out = blend_sets(beats[idx], beats, torch.from_numpy(partner), (0.3, 0.3))
    expected = canonical((0.7 * beats[idx[paired]] + 0.3 * beats[partner[paired]]).reshape(-1, beats.shape[1]))
    np.testing.assert_allclose(out[paired].reshape(-1, beats.shape[1]).numpy(), expected.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="subject_mix"):
        GeneratorConfig(subject_mix=(0.6, 0.7))


@pytest.mark.filterwarnings(LEGACY_EXPORT_WARNINGS[0])
@pytest.mark.filterwarnings(LEGACY_EXPORT_WARNINGS[1])
def test_onnx_export_matches_torch(structured: BeatGenerator) -> None:
    gen = structured
    example = _inputs(3, 0)
    buf = io.BytesIO()
    torch.onnx.export(
        gen, tuple(example[k] for k in INPUTS), buf, input_names=list(INPUTS), output_names=["beats"],
        dynamic_axes={k: {0: "batch"} for k in (*INPUTS, "beats")}, opset_version=18, dynamo=False,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
    for n in (1, 37):
        x = _inputs(n, n)
        got = session.run(None, {k: v.numpy() for k, v in x.items()})[0]
        with torch.no_grad():
            expected = gen(**x).numpy()
        assert got.shape == (n, DEFAULT_SPEC.length)
        assert np.max(np.abs(got - expected)) < 1e-4


@pytest.mark.filterwarnings(LEGACY_EXPORT_WARNINGS[0])
@pytest.mark.filterwarnings(LEGACY_EXPORT_WARNINGS[1])
def test_export_satisfies_the_edge_contract(structured: BeatGenerator, tmp_path: Path) -> None:
    from trainer.export import export_model

    gen = structured
    result = export_model(gen, generator_contract(gen, "ab" * 32), tmp_path / "generator.onnx")
    assert result.max_abs_error < 1e-4  # the exported polyphase form against the trained module
    import onnx

    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert "Resize" not in ops and "Expand" not in ops, ops
    session = GeneratorSession(result.path)
    assert session.contract.persona_dim == TINY.persona_dim and session.contract.beat_dim == TINY.beat_dim
    x = _inputs(7, 9)
    out = session.generate(**{k: v.numpy() for k, v in x.items()})
    with torch.no_grad():
        np.testing.assert_allclose(out, gen(**x).numpy(), atol=1e-4)


def test_image_transform_round_trip(train: BeatSet) -> None:
    cfg = ImageBaselineConfig()
    images = beats_to_images(train.beats[:20], cfg)
    assert images.shape == (20, 64, 64) and images.min() >= -1 and images.max() <= 1
    back = images_to_beats(images, cfg)
    assert back.shape == (20, DEFAULT_SPEC.length)
    err = round_trip_error(train.beats[:200], cfg)
    assert err < 0.08, err
    # the decode reads the drawn trace, not a constant: a flipped beat decodes flipped
    flipped = images_to_beats(beats_to_images(-train.beats[:20], cfg), cfg)
    assert np.mean(np.sign(flipped[:, DEFAULT_SPEC.pre]) != np.sign(back[:, DEFAULT_SPEC.pre])) > 0.9


def test_image_baseline_trains_and_samples_each_class(train: BeatSet, tmp_path: Path) -> None:
    cfg = ImageBaselineConfig(ngf=4, ndf=4, batch_size=8, steps=3, log_every=1, checkpoint_every=2)
    run = Run(dir=tmp_path, progress_bar=False)
    model = fit_image_baseline(train, run, cfg)
    beats = model.sample(np.arange(10) % len(AAMI_CLASSES), np.random.default_rng(0))
    assert beats.shape == (10, DEFAULT_SPEC.length) and np.all(np.isfinite(beats))
    assert run.load_checkpoint()["step"] == 3
    more = fit_image_baseline(train, run, ImageBaselineConfig(**{**cfg.__dict__, "steps": 4}))
    assert run.load_checkpoint()["step"] == 4 and more.generator is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.sample([0], np.random.default_rng(1))
    # its weights file gives the same beats, and nothing else passes for one
    again = ImageBaseline.load(model.save(tmp_path / "weights.pt"))
    labels = np.arange(10) % len(AAMI_CLASSES)
    assert np.array_equal(again.sample(labels, np.random.default_rng(5)), model.sample(labels, np.random.default_rng(5)))
    torch.save({"generator": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an image-baseline weights file"):
        ImageBaseline.load(tmp_path / "other.pt")


def test_the_shipped_image_baseline_loads_and_draws_each_class(train: BeatSet) -> None:
    """The weights the evaluation compares against by default (trainer/assets), trained on DS1."""
    from trainer.tasks import IMAGE_BASELINE_WEIGHTS

    model = ImageBaseline.load(IMAGE_BASELINE_WEIGHTS)
    assert model.cfg == ImageBaselineConfig()  # the default recipe
    labels = np.repeat(np.arange(len(AAMI_CLASSES)), 40)
    beats = model.sample(labels, np.random.default_rng(0))
    assert beats.shape == (len(labels), DEFAULT_SPEC.length) and np.all(np.isfinite(beats))
    r = beats[:, DEFAULT_SPEC.pre]  # canonical beats: R deflection of magnitude 1 at the R sample
    assert np.median(np.abs(r)) > 0.8
    n_mean, v_mean = beats[labels == 0].mean(axis=0), beats[labels == 2].mean(axis=0)
    assert np.abs(n_mean - v_mean).max() > 0.3  # classes drawn differently (V is not N)
