"""DPM-Solver in the production sampling program: `build_sampler` with sample.sampler=dpm_solver,
`--mode=sample` runs (resume, pinned settings) and `--mode=sweep` rows that vary the sampler.

The solver itself is checked against its reference in tests/test_dpm_solver_parity.py; here the
program around it: the same jit over the mesh, per-example noise, per-row labels and scales,
the model's timestep scale, the config keys and what a run pins.
"""

import csv
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_fixture, nchw_to_nhwc, perturbed, rel_l2

from configs import tiny as tiny_config
from gdiff import distributed, errors, factory
from gdiff.checkpoints import store
from gdiff.compat import flags, openai
from gdiff.diffusion import create_gaussian_diffusion
from gdiff.diffusion import guidance as guidance_lib
from gdiff.engine import manifest as manifest_lib
from gdiff.evaluation import ClassifierExtractor, SmallClassifier, metrics
from gdiff.jobs import sample as sample_run
from gdiff.jobs import sweep
from gdiff.sampling import plan as plan_lib
from gdiff.sampling import sample_files
from gdiff.sampling import sampler as sampler_lib

TOL = 1e-4
# The solvers.npz case the production program must reproduce (guided DPM-Solver++ 2M).
CASE = "dpmpp_2m/guided/time_uniform/steps10"


def _tiny():
    config = tiny_config.get_config()
    config.classifier.num_head_channels = 32  # the tiny classifier's width (the reference: 64)
    return config


def _solver(config, **keys):
    """`config` sampling with DPM-Solver and the given `dpm_solver_<key>` settings."""
    config.sample.sampler = "dpm_solver"
    for key, value in keys.items():
        config.sample[f"dpm_solver_{key}"] = value
    return config


# ----------------------------------------------------------------- (a) the reference's solve


def test_build_sampler_reproduces_the_reference_solver(monkeypatch):
    """build_sampler on the parity fixtures' UNet and classifier, as groups of the reference's
    flags (1000-step cosine chain, learned sigmas), reproduces solvers.npz's guided
    DPM-Solver++(2M): the program's own per-example noise is replaced by the fixture's x_T, the
    rest (jit over a 2-device mesh, per-row labels and scales, the time mapping) is production."""
    z = load_fixture("solvers.npz")
    cfg = json.loads(str(z["config_json"]))
    case = cfg["cases"][CASE]
    unet_fixture, clf_fixture = (
        load_fixture(cfg["unet_fixture"]),
        load_fixture(cfg["classifier_fixture"]),
    )
    unet_kw = json.loads(str(unet_fixture["config_json"]))["create_model"]
    clf_kw = json.loads(str(clf_fixture["config_json"]))["create_classifier"]
    kwargs = {
        **flags.model_and_diffusion_defaults(),
        **{k: v for k, v in flags.classifier_defaults().items() if k != "image_size"},
        **unet_kw,
        **{k: v for k, v in clf_kw.items() if k != "image_size"},
        "diffusion_steps": int(cfg["diffusion_steps"]),
        "noise_schedule": cfg["schedule"],
        **flags.sampling_flag_defaults(),
    }
    groups = flags.sampling_groups(kwargs)
    groups["sample"].update(
        sampler="dpm_solver",
        dpm_solver_steps=case["steps"],
        dpm_solver_order=case["order"],
        dpm_solver_algorithm_type=case["algorithm_type"],
        dpm_solver_skip_type=case["skip_type"],
        dpm_solver_lower_order_final=case["lower_order_final"],
        dpm_solver_thresholding=case["dynamic_thresholding"],
        timestep_respacing="250",  # ignored by the solver: it solves on the 1000-step chain
    )
    mesh = distributed.data_mesh(jax.devices()[:2])
    sampler, model, classifier = sampler_lib.build_sampler(
        groups, guided=True, mesh=mesh, float_output=True
    )
    assert sampler.diffusion.num_timesteps == 1000
    # The networks are exactly the fixture's (the reference adapter builds the same modules).
    assert model == openai.create_model(**unet_kw)
    assert classifier == openai.create_classifier(**clf_kw)

    def params(module, fixture):
        sd = {k[len("param/") :]: fixture[k] for k in fixture.files if k.startswith("param/")}
        return openai.convert_state_dict(module, sd)

    x_T = jnp.asarray(nchw_to_nhwc(z["x_T"]))  # noqa: N806
    monkeypatch.setattr(sampler_lib, "initial_noise", lambda keys, shape: x_T)
    y = np.asarray(z["y"], np.int32)
    batch = sampler.make_batch(
        {
            "ids": np.arange(2, dtype=np.int32),
            "labels": y,
            "scales": np.full(2, float(cfg["classifier_scale"]), np.float32),
        }
    )
    got = sampler(
        sampler.put_params(params(model, unet_fixture)),
        sampler.put_params(params(classifier, clf_fixture)),
        batch,
    )
    error = rel_l2(got, nchw_to_nhwc(z[f"{CASE}/sample"]))
    print(f"build_sampler vs reference {CASE}: rel-L2 {error:.2e}")
    assert error <= TOL


# ------------------------------------------------------- tiny networks (b, c, d, e)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A perturbed tiny model and sharp classifier, in memory and saved as checkpoints."""
    root = tmp_path_factory.mktemp("dpm")
    config = _tiny()
    model_vars = perturbed(factory.init_variables(factory.build_model(config), jax.random.key(0)))
    cls_vars = factory.init_variables(factory.build_classifier(config), jax.random.key(1))
    cls_vars = perturbed(cls_vars, seed=1, scale=0.2)  # sharp logits: visible guidance
    store.save_params(root / "model", model_vars["params"], metadata={"kind": "model"})
    store.save_params(root / "cls", cls_vars["params"], metadata={"kind": "classifier"})
    return dict(root=root, mv=model_vars, cv=cls_vars)


IDS = np.arange(4)
LABELS = np.array([3, 1, 4, 1])


def _rows(scales):
    """Each of the 4 examples once per scale (scale-major), as a sampling run lays them out."""
    return {
        "ids": np.tile(IDS, len(scales)).astype(np.int32),
        "labels": np.tile(LABELS, len(scales)).astype(np.int32),
        "scales": np.repeat(np.asarray(scales, np.float32), len(IDS)),
    }


def _linear_1000(config):
    # A 1000-step linear chain: the log-SNR clip keeps all of it (N = T), so the solver's times
    # land on chain steps and the network sees them unchanged.
    config.diffusion.steps = 1000
    config.diffusion.noise_schedule = "linear"
    return config


@pytest.fixture(scope="module")
def order_one(tiny):
    """The guided order-1 solver and DDIM (eta 0, unclipped) at the same times, both built by
    build_sampler, on 8 rows (scales 0 and 2) over 8 devices."""
    solver_config = _solver(_linear_1000(_tiny()), steps=3, order=1)
    ddim_config = _linear_1000(_tiny())
    ddim_config.sample.sampler = "ddim"
    # Section respacing "4" keeps steps 0, 333, 666, 999: the solver's 3 time_uniform steps
    # from t = 1 to 1/1000 (model times 999, 666, 333, 0).
    ddim_config.sample.timestep_respacing = "4"
    ddim_config.sample.clip_denoised = False  # the solver never clips its x_0 predictions
    out = {}
    for name, config in (("solver", solver_config), ("ddim", ddim_config)):
        sampler, model, classifier = sampler_lib.build_sampler(
            sampler_lib.config_groups(config), guided=True, float_output=True
        )
        mv, cv = sampler.put_params(tiny["mv"]), sampler.put_params(tiny["cv"])
        x = sampler(mv, cv, sampler.make_batch(_rows([0.0, 2.0])))
        out[name] = dict(sampler=sampler, model=model, classifier=classifier, mv=mv, cv=cv, x=x)
    return out


def test_order_one_solver_is_ddim_at_the_same_times(tiny, order_one):
    """DPM-Solver++(1) = DDIM (eta 0) at the solver's times (DPM-Solver, Sec. 4.1). Compared:
    DDIM's 4 steps 999 -> 666 -> 333 -> 0 -> x_0 against the solver's 3 steps, which end at
    t = 1/N (step 0), followed by DDIM's own last step 0 -> x_0 (eta 0: the x_0 prediction)."""
    solver, ddim = order_one["solver"], order_one["ddim"]
    assert solver["sampler"].options.sampler == "dpm_solver"
    assert ddim["sampler"].options.sampler == "ddim"
    rows = _rows([0.0, 2.0])
    labels, scales = jnp.asarray(rows["labels"]), jnp.asarray(rows["scales"])

    def model_fn(x, ts):
        return ddim["model"].apply(tiny["mv"], x, ts, y=labels)

    cond_fn = guidance_lib.classifier_cond_fn(
        lambda x, ts: ddim["classifier"].apply(tiny["cv"], x, ts), labels, scales
    )
    diffusion = ddim["sampler"].diffusion
    assert diffusion.timestep_map.tolist() == [0, 333, 666, 999]

    @jax.jit
    def last_ddim_step(x):
        t = jnp.zeros((x.shape[0],), jnp.int32)
        return diffusion.ddim_sample(model_fn, x, t, jnp.zeros_like(x), 0.0, False, cond_fn)

    want = np.asarray(ddim["x"])
    got = np.asarray(last_ddim_step(jnp.asarray(np.asarray(solver["x"])))["sample"])
    error = rel_l2(got, want)
    print(f"order-1 DPM-Solver++ + DDIM's last step vs DDIM: rel-L2 {error:.2e}")
    assert error <= 1e-5
    # Guidance did something: the scale-2 rows are not the scale-0 rows.
    assert np.abs(want[4:] - want[:4]).mean() > 1e-3


def test_per_row_scales_in_one_program_equal_each_scale_alone(order_one):
    """The scale sweep of one program (rows at scales 0 and 2) equals each scale's rows run
    alone through the same program, and the scales differ."""
    s = order_one["solver"]
    mixed = np.asarray(s["x"])
    for k, scale in enumerate((0.0, 2.0)):
        alone = np.asarray(
            s["sampler"](s["mv"], s["cv"], s["sampler"].make_batch(_rows([scale, scale])))
        )
        alone = alone.reshape(2, len(IDS), *alone.shape[1:])  # scale-major: both copies agree
        np.testing.assert_allclose(alone[0], alone[1], rtol=0, atol=1e-6)
        np.testing.assert_allclose(mixed[k * 4 : (k + 1) * 4], alone[0], rtol=0, atol=1e-6)
    assert np.abs(mixed[4:] - mixed[:4]).mean() > 1e-3
    assert s["sampler"]._jitted._cache_size() == 1  # one compiled program for all of it
    # The whole solve is a loop inside that program, with no trip to the host.
    text = s["sampler"].lower(s["mv"], s["cv"], s["sampler"].make_batch(_rows([0.0, 2.0])))
    text = text.as_text()
    assert "callback" not in text.lower() and text.count("stablehlo.while") >= 1


# ------------------------------------------------------------ config keys and time mapping


def test_sampler_keys_use_ddim_rule_and_one_line_errors():
    config = _tiny()
    s, d = config.sample, config.diffusion
    assert sampler_lib.sampler_kind(s, d) == "ancestral"  # "auto", use_ddim False
    s.use_ddim = True
    assert sampler_lib.sampler_kind(s, d) == "ddim"  # the reference's --use_ddim True
    s.sampler = "ddim"
    assert sampler_lib.sampler_kind(s, d) == "ddim"
    s.use_ddim = False
    assert sampler_lib.sampler_kind(s, d) == "ddim"
    bad = [
        (dict(sampler="euler"), "sample.sampler='euler' is not a sampler"),
        (dict(sampler="dpm_solver", use_ddim=True), "sample.use_ddim=True .* contradicts"),
        (dict(sampler="ancestral", use_ddim=True), "sample.use_ddim=True .* contradicts"),
        (dict(sampler="dpm_solver", dpm_solver_order=4), "sample.dpm_solver_order=4"),
        (dict(sampler="dpm_solver", dpm_solver_steps=2, dpm_solver_order=3), "dpm_solver_steps"),
        (dict(sampler="dpm_solver", dpm_solver_skip_type="karras"), "dpm_solver_skip_type"),
        (dict(sampler="dpm_solver", dpm_solver_algorithm_type="ddim"), "algorithm_type"),
        (
            dict(
                sampler="dpm_solver",
                dpm_solver_algorithm_type="dpmsolver",
                dpm_solver_thresholding=True,
            ),
            "sample.dpm_solver_thresholding=True",
        ),
        (dict(sampler="dpm_solver", dpm_solver_thresholding_ratio=0.0), "thresholding_ratio"),
    ]
    for keys, message in bad:
        c = _tiny()
        c.sample.update(keys)
        with pytest.raises(errors.ConfigError, match=message) as e:
            sampler_lib.build_sampler(sampler_lib.config_groups(c), guided=False)
        assert "\n" not in str(e.value)
    # An x_0-predicting model is solved through the reference's model_type="x_start" wrapper.
    c = _solver(_tiny())
    c.diffusion.predict_xstart = True
    assert sampler_lib.sampler_kind(c.sample, c.diffusion) == "dpm_solver"
    sampler, _, _ = sampler_lib.build_sampler(sampler_lib.config_groups(c), guided=False)
    assert sampler_lib.solver_model_type(sampler.diffusion) == "x_start"


def test_solver_ignores_respacing_and_names_its_nfe():
    config = _solver(_tiny(), steps=7)  # tiny: sample.timestep_respacing = "10", 100 steps
    s, d = config.sample, config.diffusion
    assert sampler_lib.respacing(s, d) == ""
    assert sampler_lib.nfe(s, d) == 7
    assert sampler_lib.sampler_label(s, d) == "DPM-Solver++(2M)"
    assert sampler_lib.describe(s, d).startswith("DPM-Solver++(2M) (dpmsolver++, order 2")
    sampler, _, _ = sampler_lib.build_sampler(sampler_lib.config_groups(config), guided=False)
    assert sampler.diffusion.num_timesteps == 100  # the full training chain
    assert sampler.options.dpm_solver.steps == 7 and not sampler.options.use_ddim
    s.sampler = "auto"
    assert (sampler_lib.nfe(s, d), sampler_lib.sampler_label(s, d)) == (10, "ancestral")
    s.sampler, s.timestep_respacing = "ddim", "ddim25"
    assert (sampler_lib.nfe(s, d), sampler_lib.sampler_label(s, d)) == (25, "DDIM")
    # A respaced chain cannot carry the solver.
    respaced = create_gaussian_diffusion(steps=100, timestep_respacing="10", learn_sigma=True)
    with pytest.raises(ValueError, match="full training chain"):
        sampler_lib.check_solver_diffusion(respaced)


def test_model_time_of_the_solver_on_other_chains():
    """t_input = (t - 1/N) * 1000 is the network's timestep for 1000-step chains (untouched) and
    with rescale_timesteps; other chains scale it to their steps."""
    t = jnp.asarray([0.0, 333.0, 666.5, 999.0], jnp.float32)
    for steps, rescale, want in (
        (1000, False, t),
        (100, True, t),
        (100, False, jnp.asarray([0.0, 33.3, 66.65, 99.9])),
    ):
        d = create_gaussian_diffusion(steps=steps, rescale_timesteps=rescale)
        got = sampler_lib.dpm_solver_model_time(d)(t)
        if steps == 1000 or rescale:
            assert got is t
        np.testing.assert_allclose(got, want, rtol=1e-6)
    d = create_gaussian_diffusion(steps=100)
    assert float(sampler_lib.dpm_solver_model_time(d)(jnp.float32(660.0))) == 66.0


# --------------------------------------------------------------- (d) --mode=sample runs

N = 10  # two 8-example global batches on the 8 test devices, the last one trimmed


def _sample_config(tiny, out, **solver):
    config = _solver(_tiny(), **{"steps": 3, **solver})
    s = config.sample
    s.num_samples = N
    s.batch_size = 1
    s.classifier_scale = "0,2"
    s.labels = "balanced"
    s.model_checkpoint = str(tiny["root"] / "model")
    s.classifier_checkpoint = str(tiny["root"] / "cls")
    s.output_dir = str(out)
    return config


def test_sample_run_resumes_and_pins_the_solver_settings(tiny, tmp_path):
    out = tmp_path / "out"
    config = _sample_config(tiny, out)

    class Killed(RuntimeError):
        pass

    def die(batch):
        raise Killed(batch)

    with pytest.raises(Killed):
        sample_run.run(config, str(tmp_path), on_batch_done=die)
    pinned = manifest_lib.read(out)
    assert pinned["sampler"] == "dpm_solver" and pinned["timestep_respacing"] == ""
    assert pinned["dpm_solver"] == {
        "steps": 3,
        "order": 2,
        "algorithm_type": "dpmsolver++",
        "skip_type": "time_uniform",
        "lower_order_final": True,
        "thresholding": False,
        "thresholding_ratio": 0.995,
        "thresholding_max_val": 1.0,
    }
    done = []
    paths = sample_run.run(config, str(tmp_path), on_batch_done=done.append)
    assert done == [1]  # only the missing batch
    images = {s: sample_files.read_sample_file(p)[0] for s, p in paths.items()}
    assert images[0.0].shape == (N, 8, 8, 3) and images[0.0].dtype == np.uint8
    assert np.abs(images[2.0].astype(int) - images[0.0]).mean() > 0.5  # guidance acted
    # The solver ignores the respacing: changing it is the same run (nothing to redo).
    config.sample.timestep_respacing = "7"
    assert sample_run.run(config, str(tmp_path), on_batch_done=done.append) == paths
    assert done == [1]
    # Another solver setting is another run: refused, naming it.
    for changed in (dict(steps=4), dict(order=3), dict(skip_type="logSNR")):
        with pytest.raises(errors.ConfigMismatchError, match="dpm_solver") as e:
            sample_run.run(_sample_config(tiny, out, **changed), str(tmp_path))
        key = next(iter(changed))
        assert f"dpm_solver.{key}" in str(e.value)
    ddim = _sample_config(tiny, out)
    ddim.sample.sampler = "ddim"
    with pytest.raises(errors.ConfigMismatchError, match="sampler"):
        sample_run.run(ddim, str(tmp_path))


def test_chain_runs_pin_what_they_always_pinned():
    """Ancestral and DDIM manifests keep the keys of earlier versions (their runs resume)."""
    config = _tiny()
    settings = sampler_lib.sampler_settings(config.sample, config.diffusion)
    assert settings == {
        "use_ddim": False,
        "eta": 0.0,
        "clip_denoised": True,
        "timestep_respacing": "10",
    }
    config.sample.sampler = "ddim"  # the same run as use_ddim=True with "auto"
    by_name = sampler_lib.sampler_settings(config.sample, config.diffusion)
    config.sample.sampler, config.sample.use_ddim = "auto", True
    assert by_name == sampler_lib.sampler_settings(config.sample, config.diffusion)


def test_bad_solver_settings_fail_before_anything_is_written(tiny, tmp_path):
    config = _sample_config(tiny, tmp_path / "out", order=3, steps=2)
    with pytest.raises(errors.ConfigError, match="sample.dpm_solver_steps=2"):
        plan_lib.make_plan(config, str(tmp_path), plan_lib.Topology(num_devices=8, local_devices=8))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ (e) sweep rows per sampler


@functools.cache
def _extractor():
    small = SmallClassifier(num_classes=10, width=8)
    small_vars = small.init(jax.random.key(2), np.zeros((1, 8, 8, 3), np.float32))
    return ClassifierExtractor(small, small_vars, batch_size=8)


def _reference_batch(path):
    rng = np.random.default_rng(0)
    feats = _extractor()(rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8))
    mu, sigma = metrics.compute_statistics(feats["pool"])
    mu_s, sigma_s = metrics.compute_statistics(feats["spatial"])
    images = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    return str(path)


def test_sweep_rows_vary_the_sampler_over_one_checkpoint(tiny, tmp_path):
    config = _tiny()
    s = config.sample
    s.num_samples = 8
    s.batch_size = 8
    s.classifier_scale = "2"
    s.labels = "balanced"
    s.classifier_checkpoint = str(tiny["root"] / "cls")
    s.output_dir = str(tmp_path / "samples")
    config.eval.ref_batch = _reference_batch(tmp_path / "ref.npz")
    model = str(tiny["root"] / "model")
    config.sweep.models = {
        "ddim4": {
            "sample": {"sampler": "ddim", "timestep_respacing": "4", "model_checkpoint": model}
        },
        "dpmpp3": {
            "sample": {"sampler": "dpm_solver", "dpm_solver_steps": 3, "model_checkpoint": model}
        },
    }
    mesh = distributed.data_mesh(jax.devices()[:1])
    rows = sweep.run(config, str(tmp_path), extractor=_extractor(), mesh=mesh)
    assert [(r["model"], r["sampler"], r["nfe"], r["scale"]) for r in rows] == [
        ("ddim4", "DDIM", 4, 2.0),
        ("dpmpp3", "DPM-Solver++(2M)", 3, 2.0),
    ]
    out = tmp_path / "samples"
    with np.load(out / "ddim4/scale_2/samples_8x8x8x3.npz") as a:
        with np.load(out / "dpmpp3/scale_2/samples_8x8x8x3.npz") as b:
            np.testing.assert_array_equal(a["arr_1"], b["arr_1"])  # the same labels
            assert np.any(a["arr_0"] != b["arr_0"])
    with open(tmp_path / sweep.TABLE_CSV, newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["model"], r["sampler"], r["nfe"]) for r in table] == [
        ("ddim4", "DDIM", "4"),
        ("dpmpp3", "DPM-Solver++(2M)", "3"),
    ]
    md = (tmp_path / sweep.TABLE_MD).read_text()
    assert "| model | scale | sampler | nfe | fid |" in md
    assert "| dpmpp3 | 2 | DPM-Solver++(2M) | 3 |" in md
    sampling = next(line for line in md.splitlines() if line.startswith("- sampling:"))
    assert "ddim4: DDIM, 4 steps" in sampling and "dpmpp3: DPM-Solver++(2M)" in sampling
