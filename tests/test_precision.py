"""bfloat16 compute (`config.dtype`): a tiny teacher run through the project's step trains like
float32 while everything stateful stays float32; and the throughput and memory-accounting
benchmarks' own functions."""

import functools
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfa_jax import bilevel
from dfa_jax import config_lib
from dfa_jax import features
from dfa_jax import inputs
from dfa_jax import models
from dfa_jax import optimizers
from dfa_jax import parallel
from dfa_jax import teacher as teacher_lib
from dfa_jax.data import sources

# benchmarks/ holds scripts run from the repository root, outside the installed package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import throughput

STEPS = 8
BATCH = 16
NUM_CLASSES = 10
# bf16 keeps 8 bits of mantissa: each convolution output carries a relative rounding error of
# ~2^-9 = 0.2%, and the SGD steps carry the difference between the two trajectories forward.
# Measured on this run (CPU, 2 devices): at most 0.08% of the loss. 2% of the loss plus 0.01
# leaves room for other backends' bf16 kernels (different accumulation orders) while still
# catching a broken bf16 path (a float32 master copy or BN statistics lost to bf16 drift by more).
LOSS_RTOL = 0.02
LOSS_ATOL = 0.01


def _memorisable_batch():
    """One fixed batch to fit: each class a fixed random uint8 image plus a little noise."""
    rng = np.random.default_rng(0)
    templates = rng.uniform(0, 255, (NUM_CLASSES, 32, 32, 3))
    labels = np.arange(BATCH) % NUM_CLASSES
    images = templates[labels] + rng.normal(0, 10, (BATCH, 32, 32, 3))
    return {"image": np.clip(images, 0, 255).astype(np.uint8), "label": labels.astype(np.int32)}


def _train(dtype: str, variables, mesh):
    """STEPS steps of the teacher stage's step on a wrn_10_1; returns (losses, final state, model).

    Both dtypes start from the same float32 variables (the parameters are float32 either way).
    No augmentation and a constant learning rate, so the loss falls within a few steps.
    """
    config = config_lib.tiny(config_lib.base_config())
    config.dtype = dtype
    config.data.pad, config.data.flip = 0, False
    optim = config.teacher.optim
    optim.batch_size, optim.schedule, optim.nesterov = BATCH, "constant", True
    model = teacher_lib.build_model("wrn_10_1", NUM_CLASSES, config.dtype)
    tx = optimizers.sgd(optim, 1)
    # The step donates its state: each run gets its own copy of the shared start.
    variables = jax.tree.map(jnp.copy, variables)
    state = bilevel.create_state(variables["params"], variables["batch_stats"], tx)
    step = parallel.jit_step(
        bilevel.make_bilevel_step(
            teacher_lib.cross_entropy_loss_fn(model),
            tx,
            seed=0,
            preprocess_fn=inputs.make_train_preprocess(config.data, sources.DATASETS["cifar10"]),
        ),
        mesh,
    )
    batch = parallel.to_global(_memorisable_batch(), mesh)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch, None, None)
        assert metrics["loss"].dtype == jnp.float32
        losses.append(float(metrics["loss"]))
    return np.asarray(losses), state, model


@pytest.fixture(scope="module")
def runs():
    mesh = parallel.make_mesh()
    model = teacher_lib.build_model("wrn_10_1", NUM_CLASSES, "float32")
    variables = teacher_lib.init_variables(model, 0, mesh)
    return {dtype: _train(dtype, variables, mesh) for dtype in ("float32", "bfloat16")}


def test_bf16_loss_falls_and_tracks_float32(runs):
    f32, _, _ = runs["float32"]
    bf16, _, _ = runs["bfloat16"]
    assert np.all(np.isfinite(bf16))
    # The loss falls: the last steps' mean well below the first steps'.
    assert bf16[-3:].mean() < 0.8 * bf16[:3].mean(), bf16
    assert f32[-3:].mean() < 0.8 * f32[:3].mean(), f32
    np.testing.assert_allclose(bf16, f32, rtol=LOSS_RTOL, atol=LOSS_ATOL)


def test_bf16_keeps_state_float32_and_computes_in_bf16(runs):
    _, state, model = runs["bfloat16"]
    for name, tree in [
        ("params", state.params),
        ("opt_state", state.opt_state),
        ("batch_stats", state.batch_stats),
    ]:
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float32, (name, jax.tree_util.keystr(path), leaf.dtype)
    # Convolution outputs and the sown features are bf16; the logits come back float32.
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    images = jnp.zeros((2, 32, 32, 3), jnp.float32)
    logits, mutated = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=[models.FEATURES, "batch_stats"])
    )(variables, images)
    assert logits.dtype == jnp.float32
    feats = jax.tree.leaves(mutated[models.FEATURES])
    assert feats and all(f.dtype == jnp.bfloat16 for f in feats)
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(mutated["batch_stats"]))
    conv = models.layers.Conv3x3(4, dtype=jnp.bfloat16)
    out = conv.apply(conv.init(jax.random.key(0), images), images)
    assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["wrn_10_1", "shufflenet_v2_0.5"])
def test_bf16_classifier_head_runs_in_float32(name):
    """Under dtype=bfloat16 the logits are the float32 head of the (bf16) last feature map:
    ReLU, average pooling and the classifier in float32, to float32 rounding."""
    model = models.get_model(name, 10, dtype=jnp.bfloat16)
    images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)
    logits, mutated = model.apply(variables, images, mutable=[models.FEATURES])
    last = model.feature_groups()[-1][-1]
    feature = np.asarray(features.read(mutated, [last])[0], np.float64)
    pooled = np.maximum(feature, 0.0).mean(axis=(1, 2))
    fc = variables["params"]["fc"]
    expected = pooled @ np.asarray(fc["kernel"], np.float64) + np.asarray(fc["bias"], np.float64)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def tiny_pair(monkeypatch):
    """A 'tiny' pair for the benchmark's cases."""
    monkeypatch.setitem(throughput.PAIRS, "tiny", ("wrn_10_1", "wrn_10_1"))


def _check_record(record, with_torch):
    assert set(throughput.KEYS) <= set(record)
    assert record["img_per_s"] > 0 and record["compile_s"] > 0 and record["peak_mem_mb"] > 0
    assert record["traces"] == 1  # Timed steps reuse the first call's trace.
    # XLA's FLOP count of the step at its measured pace; a CPU has no listed peak.
    achieved = record["gflop_per_step"] * 1e9 / (record["step_ms"] / 1e3) / 1e12
    # A training step is a forward and about twice its FLOPs backward: at least the forward of
    # the tiny student (wrn_10_1) counted by itself, and a compile time of seconds.
    model = models.get_model("wrn_10_1", 100)
    images = jnp.zeros((record["batch"], 32, 32, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    forward = jax.jit(model.apply).lower(variables, images).compile()
    assert record["gflop_per_step"] * 1e9 > 2 * throughput.step_flops(forward, 1)
    assert 0 < record["compile_s"] < 600
    assert record["achieved_tflop_s"] == pytest.approx(achieved, rel=0.01, abs=1e-4)
    assert not any(key.startswith("peak_fraction") for key in record)
    assert record["devices"] == len(jax.devices())
    # What the step added to the memory in use before it: part of the process's peak.
    assert 0 <= record["added_mem_mb"] <= record["peak_mem_mb"]
    assert record["step_ms_spread"] >= 1.0
    if with_torch:
        assert record["torch_img_per_s"] > 0
        assert 0 <= record["torch_added_mem_mb"] <= record["torch_peak_mem_mb"]
        assert record["torch_step_ms_spread"] >= 1.0
        assert record["ratio"] == pytest.approx(
            record["img_per_s"] / record["torch_img_per_s"], 0.01
        )
    else:
        assert record["torch_img_per_s"] is None and record["ratio"] is None


def test_throughput_search_case(tiny_pair):
    """The search case and its parts (w step, beta step), and its PyTorch twin if installed."""
    with_torch = importlib.util.find_spec("torch") is not None
    record = throughput.run_case(
        "search_tiny", parallel.make_mesh(), 4, "float32", steps=1, with_torch=with_torch
    )
    _check_record(record, with_torch)
    assert record["parts_img_per_s"] > 0 and record["overhead_ratio"] > 0
    assert (
        0
        < record["parts_img_per_s"]
        < min(record["w_step_img_per_s"], record["beta_step_img_per_s"])
    )
    table = throughput.markdown_table([record])
    assert table.count("\n") == 2 and "| search_tiny |" in table


def test_throughput_teacher_case_with_input_pipeline(tiny_pair):
    mesh = parallel.make_mesh()
    host_ms = throughput.host_batch_ms(4, mesh, repeats=2, examples=64)
    record = throughput.run_case(
        "teacher_wrn_10_1", mesh, 4, "float32", steps=1, host_ms=host_ms, pipeline=True
    )
    _check_record(record, with_torch=False)
    assert record["pipeline_img_per_s"] > 0 and 0 < record["input_share"]


def test_throughput_cohort_case_times_the_distillation_stages_own_steps(tiny_pair):
    """The cohort case: two students in `distill.build_stage`'s one step, against one student's
    step from the same builder (the steps the pipeline runs, not copies of them)."""
    record = throughput.run_case("cohort_tiny_k2", parallel.make_mesh(), 4, "float32", steps=1)
    _check_record(record, with_torch=False)
    assert record["students"] == 2 and record["mode"] == "loop" and record["speedup"] > 0


def test_throughput_mixed_case_times_each_methods_own_step(tiny_pair, monkeypatch):
    """The mixed case: students of two methods in `distill.build_stage`'s one step, against each
    method's own step from the same builder; the speedup is their times' sum over the step's."""
    monkeypatch.setattr(throughput, "MIXED_LABELS", ("average", "kd"))
    record = throughput.run_case("mixed_tiny", parallel.make_mesh(), 4, "float32", steps=1)
    _check_record(record, with_torch=False)
    assert record["students"] == 2 and set(record["single_step_ms"]) == {"average", "kd"}
    alone_ms = sum(record["single_step_ms"].values())
    assert record["speedup"] == pytest.approx(alone_ms / record["step_ms"], rel=0.02)


class _FakeClock:
    """`time.perf_counter` for the benchmark's timing functions: advanced by the fake steps."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


@pytest.fixture
def fake_clock(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(throughput, "time", clock)
    return clock


def test_time_steps_times_n_steps_after_an_untimed_warm_up(fake_clock):
    """A slow warm-up step (5 s) is neither timed nor counted: 4 steps of 1 s are 1 s a step.
    Without --steps the count fills min_time_s at the warm-up's pace, at least MIN_STEPS."""
    durations = iter([5.0] + [1.0] * 100)

    def step():
        fake_clock.now += next(durations)

    assert throughput._time_steps(step, lambda: None, 4, 20.0)[:2] == (1.0, 4)
    assert throughput._num_steps(None, 0.5, 20.0) == 40
    assert throughput._num_steps(None, 5.0, 1.0) == throughput.MIN_STEPS


def test_time_torch_reports_the_compiling_calls_beyond_steady_steps(fake_clock):
    """A compiled twin's first 5 calls take 12+3+2+1+1 s and a steady step 1 s: compiling took
    19 - 5 x 1 = 14 s; the first call alone is 12 s."""
    pytest.importorskip("torch")
    durations = iter([12.0, 3.0, 2.0, 1.0, 1.0] + [1.0] * 100)

    def step():
        fake_clock.now += next(durations)

    timing = throughput.time_torch(step, (), 4, 20.0, warmup_calls=5)
    assert (timing.step_s, timing.steps, timing.first_call_s) == (1.0, 4, 12.0)
    assert timing.compile_s == 14.0


def test_pipeline_img_per_s_counts_only_the_timed_steps_images(fake_clock):
    """The fed step's first call (it fills the prefetch queue) is not timed: 3 steps of 1 s over
    batches of 4 are 4 images a second."""
    mesh = parallel.make_mesh()

    def fn(state, batch, *args):
        fake_clock.now += 1.0
        return state, {}

    runner = throughput.Runner(fn, lambda: jnp.zeros(()), (None,), [])
    assert throughput.pipeline_img_per_s(runner, mesh, 4, 3) == 4.0


def _record_of_timings(monkeypatch, case, timings, **kwargs):
    """`run_case`'s record for runners that took `timings` ({runner name: [Timing of each
    repeat]}) at a batch of 8: the record's arithmetic alone, nothing built or timed."""
    runs = {name: iter(ts) for name, ts in timings.items()}

    class FakeRunner:
        def __init__(self, name):
            self.name, self.traces = name, [1]

    monkeypatch.setattr(
        throughput, "build_case", lambda *args: {name: FakeRunner(name) for name in timings}
    )
    monkeypatch.setattr(throughput, "time_jax", lambda runner, *args: next(runs[runner.name]))
    repeats = len(next(iter(timings.values())))
    return throughput.run_case(
        case, parallel.make_mesh(), 8, "float32", steps=4, repeats=repeats, **kwargs
    )


def test_throughput_record_reports_the_fastest_repeat_and_the_first_compile(monkeypatch):
    """Three repeats of 0.5, 0.25 and 0.4 s a step: img/s, step_ms and FLOP/s are the fastest's
    (8 / 0.25 = 32 img/s), the spread 0.5 / 0.25; compile, trace and first call are the first
    repeat's (later ones hit the compilation cache); the peak share counts every device's peak."""
    timing = throughput.Timing
    flops = 2e9
    timings = {
        "step": [
            timing(0.5, 9.0, 4, 0.0, trace_s=1.0, compile_s=7.0, flops=flops),
            timing(0.25, 0.3, 4, 0.0, trace_s=0.1, compile_s=0.05, flops=flops),
            timing(0.4, 0.3, 4, 0.0, trace_s=0.1, compile_s=0.05, flops=flops),
        ]
    }
    monkeypatch.setattr(throughput, "peak_tflops", lambda kind: {"bf16": 0.004})
    record = _record_of_timings(monkeypatch, "teacher_wrn_10_1", timings)
    assert (record["img_per_s"], record["step_ms"], record["steps"]) == (32.0, 250.0, 4)
    assert record["step_ms_spread"] == 2.0
    assert (record["compile_s"], record["trace_s"], record["first_call_s"]) == (7.0, 1.0, 9.0)
    assert record["gflop_per_step"] == 2.0 and record["achieved_tflop_s"] == 0.008
    devices = record["devices"]
    assert devices == len(jax.devices())
    assert record["peak_fraction_bf16"] == pytest.approx(0.008 / (0.004 * devices))


def test_throughput_search_record_compares_the_step_with_its_halves(monkeypatch):
    """The bilevel step (0.3 s) against its w step and beta step (0.1 s each): 1.5x their sum;
    the search reads two host batches a step (the training and the validation one)."""
    timing = throughput.Timing
    timings = {
        "step": [timing(0.3, 1.0, 4, 0.0, trace_s=1.0, compile_s=1.0)],
        "w_step": [timing(0.1, 1.0, 4, 0.0, trace_s=1.0, compile_s=1.0)],
        "beta_step": [timing(0.1, 1.0, 4, 0.0, trace_s=1.0, compile_s=1.0)],
    }
    record = _record_of_timings(monkeypatch, "search_pair3", timings, host_ms=3.0)
    assert record["overhead_ratio"] == 1.5
    assert (record["w_step_img_per_s"], record["parts_img_per_s"]) == (80.0, 40.0)
    assert record["host_batch_ms"] == 6.0 and record["input_share"] == 0.02


def test_throughput_cohort_record_counts_every_students_images(tiny_pair, monkeypatch):
    """Two students in a 0.3 s step against one student's 0.2 s step: 2 x 8 images in 0.3 s,
    and a speedup of 2 x 0.2 / 0.3."""
    timing = throughput.Timing
    timings = {
        "step": [timing(0.3, 1.0, 4, 0.0, trace_s=1.0, compile_s=1.0)],
        "single": [timing(0.2, 1.0, 4, 0.0, trace_s=1.0, compile_s=1.0)],
    }
    record = _record_of_timings(monkeypatch, "cohort_tiny_k2", timings)
    assert record["students"] == 2 and record["single_step_ms"] == 200.0
    assert record["img_per_s"] == 53.33 and record["speedup"] == 1.333


def test_throughput_torch_models_match_param_counts():
    """The PyTorch twins have the JAX models' parameter counts (so they do the same work)."""
    pytest.importorskip("torch")
    from benchmarks import torch_reference as ref  # pylint: disable=g-import-not-at-top

    for name in ("wrn_16_2", "wrn_28_4", "shufflenet_v2_0.5", "shufflenet_v2_2.0"):
        shapes = jax.eval_shape(
            models.get_model(name, 100).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
        )["params"]
        jax_count = sum(leaf.size for leaf in jax.tree.leaves(shapes))
        assert ref.num_params(ref.get_model(name, 100)) == jax_count, name


# The search's twin compiles the most (its bridge loss under two gradients, two optimizers);
# the teacher's and the distillation's wrap their loss and optimizer the same way.
@pytest.mark.parametrize("case", ["search_tiny"])
def test_torch_compiled_twin_computes_the_eager_twins_losses(tiny_pair, case):
    """The `--torch-compile` twin (here through AOTAutograd without code generation, 'aot_eager':
    inductor's C++ would take minutes) trains as the eager twin does: the same losses, step
    after step, from the same seed."""
    torch = pytest.importorskip("torch")
    args = throughput._torch_args(case, 4)  # noqa: SLF001
    losses = []
    for backend in (None, "aot_eager"):
        torch.manual_seed(0)
        step = throughput.build_torch_case(case, "float32", backend)["step"]
        losses.append([float(step(*args).detach()) for _ in range(2)])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert losses[0][0] != losses[0][1]  # The steps train.


def test_step_flops_count_every_devices_share_and_peaks_are_the_datasheets():
    """A batch-sharded matmul over the mesh: XLA counts each device's share; the benchmark's
    count is the whole step's, 2 * B * K * N."""
    mesh = parallel.make_mesh()
    x = jax.device_put(jnp.ones((8, 16)), parallel.batch_sharded(mesh))
    compiled = jax.jit(lambda x, w: x @ w).lower(x, jnp.ones((16, 32))).compile()
    assert throughput.step_flops(compiled, len(mesh.devices.flat)) == 2 * 8 * 16 * 32
    assert throughput.peak_tflops("NVIDIA H200")["bf16"] == 989.4
    assert throughput.peak_tflops("NVIDIA H100 PCIe")["fp32"] == 51.2
    assert throughput.peak_tflops("cpu") is None
    # An NVL part runs at other clocks: no SXM peak stands in for its own.
    assert throughput.peak_tflops("NVIDIA H100 NVL") is None
    assert throughput.peak_tflops("NVIDIA H200 NVL") is None


# A scheduled entry of 256 KiB arrays: `a` is read by `b` and `c`, so a, b and c are live together
# at `c`; `d` (the output) lives to the end; parameters and tuples define no buffer of their own.
_HLO = """HloModule m

%fused_negate (p: f32[256,256]) -> f32[256,256] {
  %p = f32[256,256]{1,0} parameter(0)
  ROOT %n = f32[256,256]{1,0} negate(%p)
}

ENTRY %main (Arg_0.1: f32[256,256]) -> (f32[256,256]) {
  %Arg_0.1 = f32[256,256]{1,0} parameter(0)
  %a = f32[256,256]{1,0} exponential(%Arg_0.1)
  %b = f32[256,256]{1,0} fusion(%a), kind=kLoop, calls=%fused_negate
  %c = f32[256,256]{1,0} add(%a, %b), metadata={op_name="jit(f)/add"}
  %d = f32[256,256]{1,0} negate(%c)
  ROOT %t = (f32[256,256]{1,0}) tuple(%d)
}
"""


def test_memory_accounting_finds_the_liveness_peak_and_what_is_live_there():
    from benchmarks import memory_accounting

    acc = memory_accounting.account(_HLO, top=2)
    quarter = 0.25  # MiB: f32[256, 256].
    assert acc["instructions"] == 6 and acc["fusions"] == 1 and acc["buffers"] == 4
    assert acc["buffers_mib"] == pytest.approx(4 * quarter)
    assert acc["peak_mib"] == pytest.approx(3 * quarter)  # a, b and c at `c`.
    assert acc["peak_at"].startswith("3/6 (jit(f)/add")
    assert acc["all_kinds"]["elementwise fusion"] == [1, 256 * 256 * 4]
    # No trained parameter (args_0__params) feeds it: all of it counts as the teacher's.
    assert acc["peak_by_owner"] == {"teacher forward (frozen, no gradient)": [3, 3 * 256 * 256 * 4]}
    assert [row[0] for row in acc["peak_largest"]] == [quarter, quarter]
    # The CPU keeps no device memory statistics: the GPU-only fields stay empty.
    assert memory_accounting._device_mib(jax.devices()[0], "peak_bytes_in_use") is None


def test_chunked_weight_gradient_matches_xla():
    """models.layers.Conv's CPU weight gradient, summed over strided batch chunks, equals XLA's
    whole-batch one (up to float rounding); the forward and the input gradient are XLA's own."""
    mesh = parallel.make_mesh()
    x = jax.random.normal(jax.random.key(0), (32, 32, 32, 64))
    x = jax.device_put(x, parallel.batch_sharded(mesh))
    w = jax.random.normal(jax.random.key(1), (3, 3, 64, 32)) * 0.05
    dn = ("NHWC", "HWIO", "NHWC")
    assert models.layers._weight_grad_chunks(x, w, dn, 1) > 1  # noqa: SLF001

    def loss(conv, x, w):
        y = conv(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
        return jnp.sum(jnp.sin(y))

    ours = jax.jit(
        jax.value_and_grad(functools.partial(loss, models.layers.conv_general_dilated), (0, 1))
    )
    xla = jax.jit(jax.value_and_grad(functools.partial(loss, jax.lax.conv_general_dilated), (0, 1)))
    (value, (dx, dw)), (value_ref, (dx_ref, dw_ref)) = ours(x, w), xla(x, w)
    # Two different programs (XLA may fuse and order them differently): float tolerance.
    # A sum of 262,144 float32 terms that cancel: its order alone moves it by up to ~1.5e-5.
    np.testing.assert_allclose(value, value_ref, rtol=2e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-6 * float(jnp.abs(dx_ref).max()))
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(dw_ref).max()))
