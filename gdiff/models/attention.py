"""Self-attention of the ADM networks, on `jax.nn.dot_product_attention`.

The reference projects to one `3 * C` channel vector per position and splits it in one of two
orders; the weight shapes are identical, the outputs are not, so a converted checkpoint is only
right under the order it was trained with:

- legacy (`QKVAttentionLegacy`): channels are laid out as [heads, (q, k, v), head_ch];
- new (`QKVAttention`): channels are laid out as [(q, k, v), heads, head_ch].

Both write the result back as [heads, head_ch]. The reference scales q and k by head_ch ** -1/4
each, which is the usual 1 / sqrt(head_ch) on the logits.

Precision: the softmax statistics are float32 on both implementations, as the reference computes
its softmax in float32. `implementation="xla"` takes the logits of 16-bit q and k in float32
(`preferred_element_type`) and runs the softmax in float32, so a float32 network's attention is
exactly float32 throughout; `implementation="cudnn"` (cuDNN's fused flash attention, chosen by
`gdiff.factory.resolve_attention_impl` on a CUDA GPU for a 16-bit network) keeps its running max
and sum in float32 and only accepts fp16/bf16 q, k, v, so float32 inputs (the classifier's
attention pool, float32 like the reference's head) are cast to bfloat16 for the kernel and the
result cast back. JAX's cuDNN rule refuses odd sequence lengths under differentiation, so the
pool's H*W + 1 tokens are padded by one token the kernel masks out (`even_length_attention`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gdiff.models import layers

Dtype = Any
# cuDNN's fused attention takes 16-bit inputs only; bfloat16 is gdiff's reduced precision.
_CUDNN_INPUT_DTYPE = jnp.bfloat16


def qkv_attention(
    qkv: jax.Array, num_heads: int, *, new_order: bool, implementation: str | None = None
) -> jax.Array:
    """Multi-head attention over a packed projection.

    Args:
      qkv: [B, L, 3 * C] queries, keys and values in the reference's channel layout.
      num_heads: number of heads; C must be divisible by it.
      new_order: True for `QKVAttention` ((q, k, v) outermost), False for `QKVAttentionLegacy`
        (heads outermost).
      implementation: None, "xla" or "cudnn", passed to `jax.nn.dot_product_attention`
        (None: JAX's choice, which is XLA's). With "cudnn", float32 q, k, v are cast to bfloat16
        for the kernel (it rejects float32).

    Returns:
      [B, L, C] in qkv's dtype, channels ordered [heads, head_ch] as in the reference.
    """
    b, length, width = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 * num_heads ({num_heads})")
    ch = width // (3 * num_heads)
    if new_order:
        qkv = qkv.reshape(b, length, 3, num_heads, ch)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
        qkv = qkv.reshape(b, length, num_heads, 3, ch)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    if implementation == "cudnn":
        out = _cudnn_attention(q, k, v)
    else:
        out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    return out.reshape(b, length, num_heads * ch).astype(qkv.dtype)


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """cuDNN's fused attention over [B, L, heads, ch] q, k, v -> [B, L, heads, ch] (16-bit).

    Float32 inputs are cast to bfloat16 (the kernel takes fp16/bf16 only). JAX's cuDNN rule
    refuses odd sequence lengths once the call is differentiated (as the guidance gradient
    differentiates the classifier's attention pool, H*W + 1 tokens), so odd lengths go through
    `even_length_attention`.
    """
    if jnp.dtype(q.dtype).itemsize != 2:
        q, k, v = (a.astype(_CUDNN_INPUT_DTYPE) for a in (q, k, v))
    if q.shape[1] % 2 == 0:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return even_length_attention(q, k, v, implementation="cudnn")


def even_length_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str
) -> jax.Array:
    """Attention over [B, L, heads, ch] with L padded to an even length: one extra token that
    the kernel masks out as padding (`query_seq_lengths` / `key_value_seq_lengths` = L), whose
    query row is dropped, so the result is the unpadded attention's [B, L, heads, ch]."""
    length = q.shape[1]
    pad = ((0, 0), (0, length % 2), (0, 0), (0, 0))
    q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
    lengths = jnp.full((q.shape[0],), length, jnp.int32)
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )
    return out[:, :length]


def resolve_num_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """The reference's rule: a fixed head width wins over a fixed head count when it is set."""
    if num_head_channels == -1:
        return num_heads
    if channels % num_head_channels:
        raise ValueError(
            f"attention channels {channels} are not divisible by num_head_channels "
            f"{num_head_channels}"
        )
    return channels // num_head_channels


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection (the reference's `AttentionBlock`).

    Parameters: `norm` (GroupNorm), `qkv` (Dense C -> 3C, the reference's 1x1 Conv1d) and
    `proj_out` (Dense C -> C).
    """

    channels: int
    num_heads: int = 1
    num_head_channels: int = -1
    use_new_attention_order: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H, W, C]."""
        b, h, w, c = x.shape
        heads = resolve_num_heads(self.channels, self.num_heads, self.num_head_channels)
        flat = x.reshape(b, h * w, c)
        normed = layers.normalize(layers.group_norm("norm"), flat)
        qkv = layers.dense(3 * self.channels, self.dtype, "qkv")(normed.astype(self.dtype))
        attn = qkv_attention(
            qkv, heads, new_order=self.use_new_attention_order, implementation=self.attention_impl
        )
        # Zero-initialised (the reference's zero_module): a fresh block is the identity.
        out = layers.dense(self.channels, self.dtype, "proj_out", zero_init=True)(attn)
        return (flat + out).reshape(b, h, w, c)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling (the classifier's `attention` head; always the new order).

    Prepends the spatial mean as an extra token, adds a learned positional embedding, attends, and
    returns the projected mean token. `dtype` is float32 in the classifier (the reference keeps its
    head in float32 under fp16); with `attention_impl="cudnn"` the attention itself runs on
    bfloat16 q, k, v (see `qkv_attention`). Parameters: `positional_embedding` [H*W + 1, C] (the
    reference stores its transpose), `qkv_proj` (Dense C -> 3C), `c_proj` (Dense C -> out).
    """

    spatial_dim: int
    embed_dim: int
    num_head_channels: int
    output_dim: int
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, output_dim]."""
        b, h, w, c = x.shape
        if h * w != self.spatial_dim**2:
            raise ValueError(
                f"attention pool built for {self.spatial_dim}x{self.spatial_dim} features, got "
                f"{h}x{w}; the classifier's image_size must match its input"
            )
        pos = self.param(
            "positional_embedding",
            lambda key, shape: jax.random.normal(key, shape, jnp.float32) / self.embed_dim**0.5,
            (self.spatial_dim**2 + 1, self.embed_dim),
        )
        tokens = x.reshape(b, h * w, c)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        tokens = tokens + pos[None].astype(tokens.dtype)
        qkv = layers.dense(3 * self.embed_dim, self.dtype, "qkv_proj")(tokens)
        heads = self.embed_dim // self.num_head_channels
        attn = qkv_attention(qkv, heads, new_order=True, implementation=self.attention_impl)
        out = layers.dense(self.output_dim, self.dtype, "c_proj")(attn)
        return out[:, 0]
