"""Shared test set-up.

Eight fake CPU devices for every test (multi-device code is exercised on CPU), true float32 matmuls,
and the parity fixtures of the reference implementation, found through $GDIFF_PARITY_DIR
(default: ../shared/parity next to the repository).
"""

import json
import os
import pathlib
import tempfile

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Identical programs (a resumed run, a subprocess, the same model in two test files) compile once.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "GDIFF_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "gdiff_test_jax_cache")
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

REPO = pathlib.Path(__file__).resolve().parents[1]
PARITY_DIR = pathlib.Path(os.environ.get("GDIFF_PARITY_DIR", REPO.parent / "shared" / "parity"))


def fixture_path(name: str) -> pathlib.Path:
    """`<parity dir>/<name>`, skipping (loudly, with the path) when the folder is absent."""
    path = PARITY_DIR / name
    if not PARITY_DIR.is_dir():
        pytest.skip(
            f"PARITY FIXTURES ABSENT: {PARITY_DIR} does not exist; set GDIFF_PARITY_DIR to the "
            "reference's golden outputs to run this parity test"
        )
    if not path.exists():
        raise FileNotFoundError(f"parity folder {PARITY_DIR} has no {name}")
    return path


def load_fixture(name: str):
    """Opens `<parity dir>/<name>` (see `fixture_path`)."""
    return np.load(fixture_path(name), allow_pickle=False)


def fixture_network(name: str, factory):
    """(module, converted variables) of a network fixture (unet_small.npz, classifier_small.npz):
    the module from its config_json's `create_*` kwargs through `factory` (a gdiff.compat.openai
    create_* function), the variables from its `param/` state dict."""
    from gdiff.compat import openai  # after the XLA flags above are set

    z = load_fixture(name)
    cfg = json.loads(str(z["config_json"]))
    module = factory(**next(v for k, v in cfg.items() if k.startswith("create_")))
    sd = {k[len("param/") :]: z[k] for k in z.files if k.startswith("param/")}
    return module, openai.convert_state_dict(module, sd)


def rel_l2(got, want) -> float:
    """||got - want|| / ||want||, the parity README's error measure."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    denom = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (denom if denom > 0 else 1.0))


def perturbed(variables, seed: int = 0, scale: float = 0.05):
    """`variables` plus N(0, scale^2) noise on every parameter: a network that looks trained.

    A fresh network is initialised like the reference's, whose zero-initialised output layers make
    it output exactly 0 and ignore its inputs; tests of what the inputs do start from this instead.
    """
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [
        x + scale * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


def tiny_unet(num_classes):
    """The samplers' tests' UNet: 8x8-capable, 32 channels, learned variances (6 outputs), one
    attention level; `num_classes` None for an unconditional one."""
    from gdiff.models import UNetModel

    return UNetModel(
        model_channels=32,
        out_channels=6,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 1),
        num_classes=num_classes,
        num_head_channels=32,
        use_scale_shift_norm=True,
    )


def tiny_classifier(image_size, num_classes):
    """The samplers' tests' noise-aware classifier (one level, adaptive pool)."""
    from gdiff.models import EncoderUNetModel

    return EncoderUNetModel(
        image_size=image_size,
        model_channels=32,
        out_channels=num_classes,
        num_res_blocks=1,
        attention_resolutions=(),
        channel_mult=(1,),
        pool="adaptive",
    )


def sharpened(classifier_variables):
    """A random classifier's logits barely depend on x (pooled, normalised features): its last
    layer's kernel x100 and no bias, so guidance has a visible, input-dependent gradient."""
    params = dict(classifier_variables["params"])
    last = sorted(k for k in params if k.startswith("out_"))[-1]
    params[last] = {"kernel": params[last]["kernel"] * 100.0, "bias": params[last]["bias"] * 0.0}
    return {"params": params}


def nchw_to_nhwc(a):
    return np.transpose(np.asarray(a), (0, 2, 3, 1))


def nhwc_to_nchw(a):
    return np.transpose(np.asarray(a), (0, 3, 1, 2))


@pytest.fixture
def fixture():
    return load_fixture
