"""The benchmark scripts cannot rot: each runs end to end in a tiny configuration on CPU.

The scripts are run as a user runs them (a subprocess, `--tiny`, JSON out) on two fake CPU devices,
so the data-parallel path is exercised; their JSON must carry positive throughput and XLA FLOP
counts, and the sampling program must be one on-device loop. The shared helpers of
benchmarks/common.py are checked in-process against numbers known independently.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402

from gdiff import factory  # noqa: E402

DEVICES = 2


def run_script(tmp_path, script: str, *args: str, expect_ok: bool = True):
    out = tmp_path / f"{script}.json"
    env = dict(os.environ)
    # Unoptimised CPU code generation halves the compile time of the tiny networks; these tests
    # check that the scripts work and report consistent numbers, not how fast a CPU is.
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0"
    )
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if not expect_ok:
        return proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads(out.read_text())
    # The JSON printed and the JSON written are the same record.
    assert json.loads(proc.stdout[proc.stdout.index("{") :]) == record
    return record


def test_sampling_tiny_guided(tmp_path):
    rec = run_script(
        tmp_path,
        "bench_sampling.py",
        *("--tiny", "--guided", "--respacing", "ddim2", "--dtype", "float32", "--batch", "4"),
    )
    assert rec["config"] == "tiny" and rec["ddim"] is True and rec["steps"] == 2
    assert rec["batch"] == 4 and rec["env"]["device_count"] == DEVICES
    assert rec["img_per_s"] > 0 and rec["ms_per_step"] > 0 and rec["seconds"] > 0
    assert rec["img_per_s"] == pytest.approx(4 / rec["seconds"], rel=1e-2)
    flops = rec["flops"]
    assert flops["model_fwd"] > 0 and flops["classifier_fwd"] > 0
    # The guidance gradient is a forward plus a backward pass, so it costs more than a forward.
    assert flops["classifier_grad"] > 1.5 * flops["classifier_fwd"]
    assert rec["flops_per_img_step"] == pytest.approx(flops["model_fwd"] + flops["classifier_grad"])
    assert rec["ref_convention_flops_per_img_step"] == pytest.approx(
        flops["model_fwd"] + 3 * flops["classifier_fwd"]
    )
    expected_tflops = rec["flops_per_img_step"] * 4 * 2 / rec["seconds"] / 1e12
    assert rec["achieved_tflops"] == pytest.approx(expected_tflops, rel=1e-2, abs=1e-4)
    assert rec["matmul_peak_tflops"] > 0 and rec["fraction_of_matmul_peak"] > 0
    # The whole chain is one on-device loop: no host round trip per step.
    assert rec["hlo_while_loops"] == 1
    assert rec["hlo_host_transfers"] == {}
    assert rec["attention_impl"] == "xla"  # "auto" off a GPU
    assert rec["peak_mem_gib"] is None or rec["peak_mem_gib"] > 0
    assert rec["model_params"] > 0 and rec["classifier_params"] > 0
    table = common.summarize([rec])
    assert f"| {rec['img_per_s']} |" in table and "DDIM 2" in table


def test_sampling_tiny_guided_dpm_solver(tmp_path):
    """--sampler dpm_solver times the solver's program as the chain's is timed: one on-device
    loop, `steps` = its network evaluations (not the 1000-step chain it solves on), seconds per
    image-step over them."""
    rec = run_script(
        tmp_path,
        "bench_sampling.py",
        *("--tiny", "--guided", "--sampler", "dpm_solver", "--nfe", "2"),
        *("--dtype", "float32", "--batch", "4"),
    )
    assert rec["sampler"] == "dpm_solver" and rec["sampler_label"] == "DPM-Solver++(2M)"
    assert rec["ddim"] is False and rec["respacing"] is None and rec["steps"] == 2
    assert rec["dpm_solver"]["steps"] == 2 and rec["dpm_solver"]["order"] == 2
    assert rec["config_overrides"] == {
        "sample.sampler": "dpm_solver",
        "sample.use_ddim": False,
        "sample.dpm_solver_steps": 2,
        "model.dtype": "float32",
        "classifier.dtype": "float32",
    }
    assert rec["s_per_img_step"] == pytest.approx(rec["seconds"] / (4 * 2), rel=1e-2, abs=1e-4)
    assert rec["ms_per_step"] == pytest.approx(rec["seconds"] / 2 * 1e3, rel=1e-2)
    # The same network calls per step as DDIM: one UNet forward plus one guidance gradient.
    flops = rec["flops"]
    assert rec["flops_per_img_step"] == pytest.approx(flops["model_fwd"] + flops["classifier_grad"])
    assert rec["hlo_while_loops"] == 1 and rec["hlo_host_transfers"] == {}
    assert rec["reference_h100"] is None  # the reference measured no solver
    assert "| DPM-Solver++(2M) 2 |" in common.summarize([rec])


@pytest.mark.parametrize("kind", ["diffusion", "classifier"])
def test_training_tiny(tmp_path, kind):
    rec = run_script(
        tmp_path,
        "bench_training.py",
        *("--tiny", "--kind", kind, "--dtype", "float32", "--batch", "4"),
        *("--warmup", "1", "--steps", "2"),
    )
    assert rec["kind"] == kind and rec["batch"] == 4
    # The step timed is the one --mode=train (train_classifier) builds, not a copy of it.
    assert rec["train_step"] == f"gdiff.train.{kind}_trainer.build_task"
    assert rec["ms_per_step"] > 0 and rec["img_per_s"] > 0
    assert rec["img_per_s"] == pytest.approx(4 / (rec["ms_per_step"] / 1e3), rel=1e-2)
    assert rec["params"] > 0 and np.isfinite(rec["loss"])
    assert rec["flops_per_step"] > 0
    assert rec["flops_per_img"] == pytest.approx(rec["flops_per_step"] / 4)
    assert rec["achieved_tflops"] > 0
    assert f"| {rec['ms_per_step']} |" in common.summarize([rec])
    if kind == "classifier":
        # Cross-entropy of random logits over 1000 classes starts near log(1000).
        assert 2.0 < rec["loss"] < 20.0


def test_ops_tiny(tmp_path):
    rec = run_script(tmp_path, "bench_ops.py", "--tiny", "--iters", "1")
    ops = {row["op"]: row for row in rec["rows"]}
    assert ops["matmul 256^3 bf16"]["tflops"] > 0
    convs = [row for op, row in ops.items() if op.startswith("4x conv3x3")]
    blocks = [row for op, row in ops.items() if op.startswith("4x GN+SiLU")]
    assert len(convs) == 2 and len(blocks) == 2
    for row in convs + blocks:
        assert row["tflops"] > 0 and row["ms"] > 0
        # XLA skips the taps that fall on padding, so its count is a bit below the dense one.
        assert 0.7 * row["conv_flops"] < row["xla_flops"] < 1.2 * row["conv_flops"]
    assert ops["attention 64 tok 2x16 b2 xla"]["tflops"] > 0
    cudnn = ops["attention 64 tok 2x16 b2 cudnn"]
    assert cudnn["tflops"] is None and cudnn["error"]  # no cuDNN on a CPU
    assert "| attention 64 tok 2x16 b2 xla |" in common.summarize([rec])


def test_benchmarks_import_no_heavy_packages():
    """A GPU image with only jax/flax/optax must run the benchmarks: no ml_collections, clu,
    TensorFlow or PyTorch on their import path."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import bench_sampling, bench_training, bench_ops;"
        "from gdiff.compat import openai; from gdiff.sampling import sampler;"
        "heavy = ('ml_collections', 'clu', 'tensorflow', 'torch');"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in heavy}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_indivisible_batch_is_refused(tmp_path):
    proc = run_script(
        tmp_path, "bench_sampling.py", "--tiny", "--batch", "3", "--cost-only", expect_ok=False
    )
    assert proc.returncode != 0
    assert "--batch=3" in proc.stderr and "multiple of the number of devices" in proc.stderr


def test_bad_flags_are_refused(tmp_path):
    proc = run_script(
        tmp_path, "bench_sampling.py", "--sampler", "dpm_solver", "--respacing", "ddim25",
        expect_ok=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "--respacing does not apply to --sampler dpm_solver" in (
        proc.stderr
    )
    proc = run_script(tmp_path, "bench_sampling.py", "--nfe", "10", expect_ok=False)
    assert proc.returncode == 2 and "use them with --sampler dpm_solver" in proc.stderr
    proc = run_script(tmp_path, "bench_training.py", "--batch", "0", expect_ok=False)
    assert proc.returncode == 2 and "--batch must be positive" in proc.stderr
    proc = run_script(
        tmp_path, "bench_training.py", "--kind", "classifier", "--remat", "full", expect_ok=False
    )
    assert proc.returncode == 2 and "--remat is the diffusion model's" in proc.stderr


def _run_all_env(tmp_path, **extra) -> dict:
    return dict(
        os.environ,
        OUT=str(tmp_path / "out"),
        LOGS=str(tmp_path / "logs"),
        PYTHON=sys.executable,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=(
            f"--xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0"
        ),
        **extra,
    )


def test_run_all_gpu_copies_each_row_out_the_moment_it_ends(tmp_path):
    """The device script, on CPU with the tiny rows: t_tiny's record reaches $OUT while the next
    row still runs, and stays there when that row overruns its limit (a device call that runs out
    of time keeps every row it finished)."""
    out = tmp_path / "out"
    env = _run_all_env(tmp_path, TIMEOUT_s_tiny="5")
    proc = subprocess.Popen(
        ["bash", str(BENCH / "run_all_gpu.sh"), "t_tiny", "s_tiny"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    record = out / "t_tiny.json"
    deadline = time.time() + 300
    while not record.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    still_running = proc.poll() is None
    output, _ = proc.communicate(timeout=300)
    assert record.exists(), output
    assert still_running, output  # copied when the row ended, not when the script did
    rec = json.loads(record.read_text())
    assert rec["kind"] == "diffusion" and rec["remat"] == "none" and rec["img_per_s"] > 0
    assert proc.returncode == 1 and "failed rows: s_tiny" in output
    assert "=== s_tiny: timed out (limit 5 s)" in output
    assert (out / "s_tiny.log").exists() and not (out / "s_tiny.json").exists()
    # Each row's and each group's wall time, measured by the script.
    timings = (out / "timings.log").read_text()
    assert re.search(r"^=== t_tiny: exit 0 after \d+ s$", timings, re.M), timings
    assert re.search(r"^=== group s_tiny: 1 row\(s\) in \d+ s \(limits sum 5 s\)$", timings, re.M)


def test_run_all_gpu_first_group_fits_one_device_call(tmp_path):
    proc = subprocess.run(
        ["bash", str(BENCH / "run_all_gpu.sh"), "first", "all"],
        env=_run_all_env(tmp_path, DRY_RUN="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(r"^row (\S+) limit (\d+) s: (.+)$", proc.stdout, re.M)
    first = [(name, int(limit)) for name, limit, _ in rows[:4]]
    assert [name for name, _ in first] == [
        "s64_ddim25_guided",
        "s64_ddim25_unguided",
        "s256_ddim25_guided",
        "t_diffusion_64",
    ]
    # The rows' limits plus the device probe's and the summary's (20 s each) stay under the
    # device tool's 600 s per call.
    assert sum(limit for _, limit in first) + 2 * 20 < 600
    assert "group first: 4 row(s), limits sum 520 s" in proc.stdout
    # `all` after `first` runs every other row once, the first group's rows not again; the
    # guided DPM-Solver++ 2M rows (20 steps, the released configs' command) among them.
    names = [name for name, _, _ in rows]
    assert len(names) == len(set(names)) == 15
    commands = {name: command for name, _, command in rows}
    for name, config in (("s64_dpm20_guided", "64"), ("s256_dpm20_guided", "256")):
        assert f"--config {config} " in commands[name]
        assert "--sampler dpm_solver --nfe 20 --thresholding --guided" in commands[name]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------------------------------------
# benchmarks/common.py in-process


def test_cost_flops_counts_a_matmul():
    n = 64
    a = jax.ShapeDtypeStruct((n, n), jnp.float32)
    flops = common.cost_flops(jax.jit(jnp.matmul).lower(a, a))
    assert flops == pytest.approx(2 * n**3, rel=0.01)


def test_hlo_structure_sees_one_loop_and_callbacks():
    def chain(x, key):
        def step(x, i):
            return x * 0.5 + jax.random.normal(jax.random.fold_in(key, i), x.shape), None

        return jax.lax.scan(step, x, jnp.arange(5))[0]

    x = jax.ShapeDtypeStruct((4, 3), jnp.float32)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    info = common.hlo_structure(jax.jit(chain).lower(x, key))
    assert info["hlo_while_loops"] == 1
    assert info["hlo_host_transfers"] == {}

    def with_callback(x):
        y = jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
        return y + 1

    info = common.hlo_structure(jax.jit(with_callback).lower(x))
    assert info["hlo_host_transfers"].get("callback", 0) >= 1
    assert info["hlo_while_loops"] == 0


def test_random_variables_scales_by_fan_in():
    abstract = {
        "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32)},
        "norm": {
            "scale": jax.ShapeDtypeStruct((128,), jnp.float32),
            "bias": jax.ShapeDtypeStruct((128,), jnp.float32),
        },
    }
    v = common.random_variables(abstract, jax.random.key(0))
    kernel = np.asarray(v["conv"]["kernel"])
    assert kernel.shape == (3, 3, 64, 128)
    assert np.std(kernel) == pytest.approx(1 / np.sqrt(3 * 3 * 64), rel=0.05)
    np.testing.assert_array_equal(np.asarray(v["norm"]["scale"]), np.ones(128))
    np.testing.assert_array_equal(np.asarray(v["norm"]["bias"]), np.zeros(128))
    assert sum(x.size for x in jax.tree.leaves(v)) == 3 * 3 * 64 * 128 + 2 * 128


def test_resolve_attention_and_bad_choices():
    """--attention follows the config's policy (gdiff.factory.resolve_attention_impl)."""
    assert jax.default_backend() == "cpu"
    assert common.resolve_attention("auto", "bfloat16") == "xla"
    assert common.resolve_attention("auto", "float32") == "xla"
    assert common.resolve_attention("xla", "bfloat16") == "xla"
    with pytest.raises(ValueError, match="--attention='cudnn' cannot run here"):
        common.resolve_attention("cudnn", "bfloat16")  # no CUDA GPU here
    with pytest.raises(ValueError, match="--attention"):
        common.resolve_attention("flash", "bfloat16")
    with pytest.raises(ValueError, match="config"):
        common.build_model("128", dtype="bfloat16", attention_impl=None)
    with pytest.raises(ValueError, match="repeats"):
        common.time_calls(lambda: jnp.zeros(()), repeats=0)


def test_released_flags_build_the_reference_networks():
    """The 64x64 README flags give the released model's and classifier's parameter counts."""
    model, diffusion = common.build_model("64", dtype="bfloat16", attention_impl="xla")
    # ../shared/bench/reference_training_h100.json: 295.9M (model), 65.44M (classifier, depth 4).
    assert factory.param_count(model) / 1e6 == pytest.approx(295.9, abs=0.1)
    classifier = common.build_classifier("64", dtype="bfloat16", attention_impl="xla")
    assert classifier.image_size == 64 and classifier.num_res_blocks == 4
    assert factory.param_count(classifier) / 1e6 == pytest.approx(65.44, abs=0.01)
    assert diffusion.num_timesteps == 1000 and model.dtype == jnp.bfloat16
    # Without overrides: the config's own precision (the README's use_fp16 and
    # classifier_use_fp16), attention "auto" (XLA on this CPU).
    model, _ = common.build_model("64")
    classifier = common.build_classifier("64")
    assert model.dtype == classifier.dtype == jnp.bfloat16
    assert model.attention_impl == classifier.attention_impl == "xla"
    classifier = common.build_classifier("64", dtype="float32")
    assert classifier.dtype == jnp.float32


def _mode_sample_program(name: str, overrides: dict):
    """`--mode=sample --config configs/released/<name>.py` with `overrides` as
    `--config.<group>.<key>=<value>`: build_sampler on that config's groups (nothing compiled)."""
    from configs.released import imagenet64, imagenet256
    from gdiff.sampling import sampler as sampler_lib

    cfg = {"imagenet64": imagenet64, "imagenet256": imagenet256}[name].get_config()
    for dotted, value in overrides.items():
        group, key = dotted.split(".")
        cfg[group][key] = value
    groups = {g: cfg[g] for g in ("model", "diffusion", "classifier", "sample")}
    return sampler_lib.build_sampler(groups, guided=True)


@pytest.mark.parametrize("config, name", [("64", "imagenet64"), ("256", "imagenet256")])
def test_benchmark_times_the_mode_sample_program(config, name):
    """bench_sampling builds what `--mode=sample --config configs/released/<name>.py` with its
    config overrides builds: the same networks (dtype, attention), diffusion and options."""
    import bench_sampling

    overrides = common.config_overrides(respacing="ddim25", use_ddim=True, attention_impl="xla")
    sampler, model, classifier = bench_sampling.build(config, overrides, guided=True, mesh=None)
    expected, model_e, classifier_e = _mode_sample_program(name, overrides)
    assert (model, classifier) == (model_e, classifier_e)
    assert sampler.options == expected.options and sampler.options.use_ddim
    np.testing.assert_array_equal(sampler.diffusion.timestep_map, expected.diffusion.timestep_map)
    assert sampler.diffusion.num_timesteps == 25
    assert model.dtype == classifier.dtype == jnp.bfloat16
    assert model.attention_impl == classifier.attention_impl == "xla"
    command = bench_sampling.equivalent_command(config, overrides)
    assert command == (
        f"python main.py --mode=sample --config configs/released/{name}.py "
        "--config.sample.timestep_respacing=ddim25 --config.sample.use_ddim=True "
        "--config.model.attention_impl=xla --config.classifier.attention_impl=xla"
    )
    with pytest.raises(KeyError, match="sample.nonsense"):
        common.sampling_groups(config, {"sample.nonsense": 1})


@pytest.mark.parametrize("config, name", [("64", "imagenet64"), ("256", "imagenet256")])
def test_benchmark_times_the_mode_sample_solver_program(config, name):
    """--sampler dpm_solver --nfe 20 --thresholding builds what `--mode=sample` builds with the
    released configs' DPM-Solver++ command: the same networks, the full 1000-step chain, the same
    solver options (DPM-Solver++ 2M, 20 steps, time_uniform, thresholding)."""
    import bench_sampling

    from gdiff.sampling import sampler as sampler_lib

    args = bench_sampling.parse_args(
        ["--config", config, "--guided", "--sampler", "dpm_solver", "--nfe", "20"]
        + ["--thresholding", "--attention", "xla"]
    )
    overrides = bench_sampling.sampling_overrides(args, config)
    sampler, model, classifier = bench_sampling.build(config, overrides, guided=True, mesh=None)
    expected, model_e, classifier_e = _mode_sample_program(name, overrides)
    assert (model, classifier) == (model_e, classifier_e)
    assert sampler.options == expected.options and sampler.options.sampler == "dpm_solver"
    assert sampler.options.dpm_solver == sampler_lib.DpmSolverOptions(
        steps=20,
        order=2,
        algorithm_type="dpmsolver++",
        skip_type="time_uniform",
        lower_order_final=True,
        thresholding=True,
        thresholding_ratio=0.995,
        thresholding_max_val=1.0,
    )
    assert sampler.diffusion.num_timesteps == expected.diffusion.num_timesteps == 1000
    np.testing.assert_array_equal(sampler.diffusion.betas, expected.diffusion.betas)
    assert model.dtype == classifier.dtype == jnp.bfloat16
    command = bench_sampling.equivalent_command(config, overrides)
    assert command == (
        f"python main.py --mode=sample --config configs/released/{name}.py "
        "--config.sample.sampler=dpm_solver --config.sample.use_ddim=False "
        "--config.sample.dpm_solver_steps=20 --config.sample.dpm_solver_thresholding=True "
        "--config.model.attention_impl=xla --config.classifier.attention_impl=xla"
    )


def test_tiny_networks():
    """The CPU stand-in: 16x16, two levels, attention at 8x8 in the model and the classifier."""
    model, diffusion = common.build_model(
        "tiny", dtype="float32", attention_impl="xla", respacing="ddim2"
    )
    classifier = common.build_classifier("tiny", dtype="float32", attention_impl="xla")
    for net in (model, classifier):
        assert net.image_size == 16 and net.channel_mult == (1, 2)
        assert net.attention_resolutions == (2,)  # downsample rate 2: the 8x8 level
    assert model.num_classes == 1000 and model.out_channels == 6 and model.dropout == 0.1
    assert classifier.out_channels == 1000 and classifier.pool == "attention"
    assert factory.param_count(model) == 956_358
    assert factory.param_count(classifier) == 446_184
    assert diffusion.num_timesteps == 2


def test_reference_figures_come_from_the_reference_folder(tmp_path, monkeypatch):
    row = dict(config="64", batch=256, respacing="ddim25", steps=25, seconds=20.0)
    sampling = [
        {**row, "guided": True, "ddim": True, "img_per_s": 12.0, "ms_per_step": 800.0,
         "flops_per_img_step": 333_830_191_104},
        {**row, "guided": True, "ddim": False, "img_per_s": 11.0, "ms_per_step": 900.0,
         "flops_per_img_step": 333_830_191_104},
    ]  # fmt: skip
    training = [{"kind": "classifier", "config": "256", "batch": 64, "ms_per_step": 314.9,
                 "img_per_s": 203.2, "params_m": 54.1, "peak_mem_gib": 40.4}]  # fmt: skip
    (tmp_path / "reference_sampling_h100.json").write_text(json.dumps(sampling))
    (tmp_path / "reference_training_h100.json").write_text(json.dumps(training))
    monkeypatch.setenv(common.REFERENCE_DIR_ENV, str(tmp_path))
    assert common.reference_sampling("64", guided=True, ddim=False) == {
        "img_per_s": 11.0,
        "ms_per_step": 900.0,
        "gflop_per_img_step": 333.8,
    }
    assert common.reference_sampling("64", guided=False, ddim=True) is None
    assert common.reference_training("classifier", "256") == {
        "batch": 64,
        "ms_per_step": 314.9,
        "img_per_s": 203.2,
        "params_m": 54.1,
    }
    missing = tmp_path / "absent"
    monkeypatch.setenv(common.REFERENCE_DIR_ENV, str(missing))
    # The tiny stand-in has no reference row and needs no reference files.
    assert common.reference_sampling("tiny", guided=True, ddim=True) is None
    with pytest.raises(FileNotFoundError) as err:
        common.reference_training("diffusion", "64")
    assert str(missing) in str(err.value) and common.REFERENCE_DIR_ENV in str(err.value)
