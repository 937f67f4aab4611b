"""The precision and attention policy: `model.attention_impl` / `classifier.attention_impl` ("auto"
by default) resolved by the factory for a platform and a compute dtype, the classifier's dtype
from `classifier_use_fp16`, and float32 numerics unchanged by the policy.

The cuDNN side of the policy (the programs a GPU runs) is checked in tests/test_export_cuda.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from configs.released import imagenet64, imagenet512
from gdiff import factory
from gdiff.compat import flags, openai, released
from gdiff.models import attention
from gdiff.sampling import sampler as sampler_lib


@pytest.mark.parametrize(
    "choice, dtype, platform, expected",
    [
        ("auto", "bfloat16", "cuda", "cudnn"),
        ("auto", "float32", "cuda", "xla"),  # cuDNN's kernel rejects float32
        ("auto", "bfloat16", "cpu", "xla"),
        ("auto", "bfloat16", "rocm", "xla"),  # cuDNN is NVIDIA's
        ("auto", "bfloat16", "tpu", "xla"),
        ("xla", "bfloat16", "cuda", "xla"),
        ("cudnn", "bfloat16", "cuda", "cudnn"),
    ],
)
def test_attention_resolves_by_platform_and_dtype(choice, dtype, platform, expected):
    assert factory.resolve_attention_impl(choice, dtype, platform) == expected


def test_auto_resolves_for_the_running_backend_or_the_target_platform():
    assert factory.runtime_platform() == "cpu"  # the tests run on CPU devices
    assert factory.resolve_attention_impl("auto", "bfloat16") == "xla"
    with factory.target_platform("cuda"):
        assert factory.resolve_attention_impl("auto", "bfloat16") == "cudnn"
    assert factory.resolve_attention_impl("auto", "bfloat16") == "xla"  # restored


def test_forced_cudnn_where_it_cannot_run_names_key_dtype_and_platform():
    config = tiny.get_config()
    config.model.attention_impl = "cudnn"
    config.model.dtype = "bfloat16"
    with pytest.raises(ValueError) as err:
        factory.build_model(config)  # on this CPU
    message = str(err.value)
    assert "model.attention_impl='cudnn'" in message
    assert "bfloat16" in message and "'cpu'" in message
    config.classifier.attention_impl = "cudnn"  # float32 by default: impossible even on a GPU
    with pytest.raises(ValueError) as err:
        factory.build_classifier(config, platform="cuda")
    message = str(err.value)
    assert "classifier.attention_impl='cudnn'" in message
    assert "float32" in message and "'cuda'" in message


def test_the_config_default_is_auto_and_the_old_empty_value_is_refused():
    config = tiny.get_config()
    assert config.model.attention_impl == config.classifier.attention_impl == "auto"
    assert factory.build_model(config).attention_impl == "xla"  # auto, on a CPU
    assert factory.build_model(config, platform="cuda").attention_impl == "xla"  # float32
    config.model.dtype = "bfloat16"
    assert factory.build_model(config, platform="cuda").attention_impl == "cudnn"
    config.model.attention_impl = ""
    with pytest.raises(ValueError, match="model.attention_impl must be one of"):
        factory.build_model(config)


def test_classifier_use_fp16_sets_the_classifier_compute_dtype():
    assert flags.to_config({"classifier_use_fp16": True}) == {"classifier": {"dtype": "bfloat16"}}
    kwargs = {**flags.classifier_defaults(), "classifier_use_fp16": True}
    assert openai.create_classifier(**kwargs).dtype == jnp.bfloat16
    kwargs["classifier_use_fp16"] = False
    assert openai.create_classifier(**kwargs).dtype == jnp.float32
    kwargs.update(classifier_use_fp16=True, attention_impl="xla")
    assert openai.create_classifier(**kwargs).attention_impl == "xla"


def test_released_configs_sample_as_the_readme_classifier_flags_say():
    """The README's CLASSIFIER_FLAGS for guided sampling: --classifier_use_fp16 True, with the
    fp16 models; the 512x512 model (--use_fp16 False) keeps both networks in float32."""
    config = imagenet64.get_config()
    assert (config.model.dtype, config.classifier.dtype) == ("bfloat16", "bfloat16")
    config = imagenet512.get_config()
    assert (config.model.dtype, config.classifier.dtype) == ("float32", "float32")
    for name in ("imagenet64", "imagenet128", "imagenet256", "imagenet256_uncond"):
        assert "--classifier_use_fp16 True" in released.get(name).classifier_flags, name
    groups = released.sampling_groups("imagenet64")
    sampler, model, classifier = sampler_lib.build_sampler(groups, guided=True, platform="cuda")
    assert model.attention_impl == classifier.attention_impl == "cudnn"
    assert model.dtype == classifier.dtype == jnp.bfloat16


def _qkv(shape, dtype, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _reference_attention(qkv: np.ndarray, heads: int) -> np.ndarray:
    """The reference's QKVAttention (new order) in float64 numpy: [B, L, 3C] -> [B, L, C]."""
    b, length, width = qkv.shape
    ch = width // (3 * heads)
    q, k, v = np.moveaxis(qkv.astype(np.float64).reshape(b, length, 3, heads, ch), 2, 0)
    scale = ch**-0.25  # on q and on k, as the reference
    logits = np.einsum("bthc,bshc->bhts", q * scale, k * scale)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhts,bshc->bthc", weights, v).reshape(b, length, heads * ch)


def test_float32_attention_is_float32_and_unchanged():
    """ "auto" resolves to "xla" in float32, which computes in float32 (it matches the
    reference's attention in float64 to float32 precision) and is bit for bit what the previous
    default (None: JAX's choice) computed, so a float32 network's outputs are unchanged."""
    qkv = _qkv((2, 65, 3 * 128), jnp.float32)
    ours = attention.qkv_attention(qkv, 2, new_order=True, implementation="xla")
    assert ours.dtype == jnp.float32
    expected = _reference_attention(np.asarray(qkv), 2)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)
    for new_order in (True, False):
        ours = attention.qkv_attention(qkv, 2, new_order=new_order, implementation="xla")
        before = attention.qkv_attention(qkv, 2, new_order=new_order, implementation=None)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(before))


def test_bfloat16_xla_attention_takes_its_softmax_in_float32():
    """With 16-bit q, k, v the logits and the softmax (max, exp, sum) are float32."""
    qkv = jax.ShapeDtypeStruct((2, 64, 3 * 128), jnp.bfloat16)
    fn = jax.jit(lambda x: attention.qkv_attention(x, 2, new_order=True, implementation="xla"))
    text = fn.lower(qkv).as_text()
    exps = [line for line in text.splitlines() if "stablehlo.exponential" in line]
    assert exps and all("x64xf32>" in line for line in exps)  # [B, heads, L, L] float32
    assert fn.eval_shape(qkv).dtype == jnp.bfloat16


def test_even_length_padding_gives_the_unpadded_attention():
    """The pool's H*W + 1 tokens are padded by one masked token for cuDNN (odd lengths are
    refused under differentiation); checked here on XLA, the same masking contract."""
    q, k, v = (_qkv((2, 65, 4, 16), jnp.float32, seed) for seed in range(3))
    padded = attention.even_length_attention(q, k, v, implementation="xla")
    plain = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    assert padded.shape == plain.shape == (2, 65, 4, 16)
    np.testing.assert_allclose(np.asarray(padded), np.asarray(plain), rtol=1e-6, atol=1e-6)
    # Its gradient too (the guidance gradient differentiates the pool).
    g_pad = jax.grad(lambda q: attention.even_length_attention(q, k, v, implementation="xla").sum())
    g_plain = jax.grad(lambda q: jax.nn.dot_product_attention(q, k, v).sum())
    np.testing.assert_allclose(np.asarray(g_pad(q)), np.asarray(g_plain(q)), rtol=1e-5, atol=1e-6)
