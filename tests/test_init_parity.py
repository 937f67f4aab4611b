"""Fresh networks start where the reference's do (training_step.npz: `init/unet/*` and config_json
`init_stats`): exact zeros where the reference zero-initialises (`zero_module`), PyTorch's default
initialisers elsewhere. Random values differ between frameworks; the zero pattern, the constants
and the distributions may not.

Every network is built from the file's config_json through the reference-compatible factories, so
a differently configured file of the same layout is checked the same way.
"""

import json
import math

import jax
import numpy as np
import pytest
from conftest import load_fixture
from scipy import stats

from gdiff import factory
from gdiff.compat import convert, openai

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")
MIN_SIZE = 1000  # tensors this large have a sample std good to a few percent


@pytest.fixture(scope="module")
def golden():
    z = load_fixture("training_step.npz")
    return z, json.loads(str(z["config_json"]))


def _build(cfg: dict, which: str, pool: str | None = None):
    if which == "unet":
        return openai.create_model(**cfg["create_model"])
    if which == "super_res":
        return openai.sr_create_model(**cfg["sr_create_model"])
    kw = dict(cfg["create_classifier"])
    if pool is not None:
        kw["classifier_pool"] = pool
    return openai.create_classifier(**kw)


def _fresh(module, seed: int) -> dict[str, np.ndarray]:
    """{reference state-dict name: array in the reference's layout} of a fresh gdiff network."""
    return convert.to_state_dict(factory.init_variables(module, jax.random.key(seed))["params"])


def _std_tolerance(n: int) -> float:
    # The sample std of n draws scatters by ~sqrt((kurtosis - 1) / 4n) relative; two samples
    # (ours, the reference's) and a normal's kurtosis 3 give sqrt(1 / n); allow 6 of those.
    return max(0.03, 6.0 * math.sqrt(1.0 / n))


def _analytic(name: str, shapes: dict[str, tuple]) -> tuple[float, float] | None:
    """(mean, std) of PyTorch's default initialiser for a non-zero tensor, in the reference's
    layout: weights and biases U(+-1/sqrt(fan_in)), GroupNorm weight 1 / bias 0, the label
    embedding N(0, 1), the attention pool's positional embedding N(0, 1 / C)."""
    shape = shapes[name]
    module, leaf = name.rsplit(".", 1)
    if name == "label_emb.weight":
        return 0.0, 1.0
    if leaf == "positional_embedding":
        return 0.0, 1.0 / math.sqrt(shape[0])
    weight = shapes[f"{module}.weight"]
    if len(weight) == 1:  # GroupNorm
        return (1.0, 0.0) if leaf == "weight" else (0.0, 0.0)
    fan_in = int(np.prod(weight[1:]))
    return 0.0, 1.0 / math.sqrt(3.0 * fan_in)


def _is_zero_initialised(name: str, pool: str | None) -> bool:
    """The reference's zero_module layers: every ResBlock's last conv, every attention block's
    proj_out, the UNet's output conv (`pool` None), the encoder's adaptive-pool head."""
    module = name.rsplit(".", 1)[0]
    if module.endswith("out_layers.3") or module.endswith(".proj_out"):
        return True
    if pool is None:
        return module == "out.2"
    return pool == "adaptive" and module == "out.3"


def _check_distribution(name: str, got: np.ndarray, mean: float, std: float) -> None:
    if std == 0.0:  # a constant (GroupNorm scale 1, bias 0) or a zero-initialised tensor
        np.testing.assert_array_equal(got, np.full_like(got, mean), err_msg=name)
        return
    n = got.size
    assert not np.all(got == 0), f"{name}: all zero where the reference is random"
    if n < MIN_SIZE:
        return
    ratio = float(got.std()) / std
    assert abs(ratio - 1.0) <= _std_tolerance(n), (name, n, float(got.std()), std)
    assert abs(float(got.mean()) - mean) <= 6.0 * std * math.sqrt(2.0 / n), (name, got.mean(), mean)


@pytest.mark.parametrize("which", ["unet", "super_res", "classifier"])
def test_fresh_network_matches_the_reference_init_stats(golden, which):
    z, cfg = golden
    want = cfg["init_stats"][which]
    got = _fresh(_build(cfg, which), int(cfg["init_seed"]))
    assert sorted(got) == sorted(want)
    worst = 0.0
    for name, w in want.items():
        g = got[name]
        assert g.size == int(np.prod(w["shape"])), name
        assert bool(np.all(g == 0)) == bool(w["all_zero"]), f"{name}: zero pattern differs"
        mean, std = (0.0, 0.0) if w["all_zero"] else (float(w["mean"]), float(w["std"]))
        _check_distribution(name, g, mean, std)
        if std and g.size >= MIN_SIZE:
            worst = max(worst, abs(float(g.std()) / std - 1.0))
    print(f"{which}: {len(want)} tensors, worst std ratio error {worst:.4f}")


def test_fresh_unet_is_distributed_like_the_reference_unet(golden):
    """Per tensor, a two-sample Kolmogorov-Smirnov test against the reference's own fresh UNet
    (`init/unet/*`): uniform where it is uniform, normal where it is normal."""
    z, cfg = golden
    got = _fresh(_build(cfg, "unet"), int(cfg["init_seed"]) + 1)
    names = [k.removeprefix("init/unet/") for k in z.files if k.startswith("init/unet/")]
    assert sorted(names) == sorted(got)
    tested = 0
    for name in names:
        ref = np.asarray(z[f"init/unet/{name}"], np.float64).ravel()
        g = got[name].ravel()
        assert g.size == ref.size, name
        if np.all(ref == ref[0]):
            np.testing.assert_array_equal(g, np.full_like(g, ref[0]), err_msg=name)
        elif ref.size >= MIN_SIZE:
            assert stats.ks_2samp(g, ref).pvalue > 1e-6, name
            tested += 1
    assert tested > 0


@pytest.mark.parametrize("pool", POOLS)
def test_every_classifier_pool_zeroes_and_draws_like_the_reference(golden, pool):
    """Every pool against PyTorch's initialisers computed from the shapes: the zero_module head of
    the adaptive pool, uniform Linear heads for the spatial pools, the attention pool's N(0, 1/C)
    positional embedding."""
    _, cfg = golden
    module = _build(cfg, "classifier", pool)
    got = _fresh(module, 3)
    shapes = {k: v.shape for k, v in got.items()}
    assert any(k.startswith("out.") for k in got)
    for name, g in got.items():
        if _is_zero_initialised(name, pool):
            assert np.all(g == 0), f"{name} must be zero-initialised"
            continue
        mean, std = _analytic(name, shapes)
        _check_distribution(name, g, mean, std)
        if std:  # every draw lies inside PyTorch's bound
            bound = std * math.sqrt(3.0) if name != "label_emb.weight" else np.inf
            if not name.endswith("positional_embedding"):
                assert np.abs(g).max() <= bound * (1 + 1e-6), name


@pytest.mark.parametrize("which", ["unet", "super_res"])
def test_fresh_diffusion_models_output_exactly_zero(golden, which):
    _, cfg = golden
    module = _build(cfg, which)
    variables = factory.init_variables(module, jax.random.key(0))
    size = module.image_size
    x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    kwargs = {"y": np.array([1, 2])} if module.num_classes else {}
    if which == "super_res":
        small = int(cfg["sr_create_model"]["small_size"])
        kwargs["low_res"] = jax.random.normal(jax.random.key(2), (2, small, small, 3))
    out = module.apply(variables, x, np.array([10, 500]), **kwargs)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
