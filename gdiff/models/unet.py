"""The ADM networks (Dhariwal & Nichol 2021): UNetModel, SuperResModel, EncoderUNetModel.

Flax Linen, NHWC. Modules take explicit typed attributes and never read a config (the
`gdiff.factory` and `gdiff.compat.openai` factories do that). Submodule names mirror the
reference's state dict with `.` before an index written as `_` (`input_blocks.4.1.qkv` lives at
`input_blocks_4_1/qkv`), so weight conversion is a rename plus a layout transpose.

Precision: parameters are float32 and `dtype` is the compute dtype of the torso. As in the
reference's fp16 mode, the timestep/label embeddings, every GroupNorm, the attention softmax and
the output head run in float32, and outputs are float32.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gdiff.models import attention, layers

Dtype = Any


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding, optionally resampling (BigGAN-style).

    Parameters (reference names): `in_layers_0` norm, `in_layers_2` conv, `emb_layers_1` dense,
    `out_layers_0` norm, `out_layers_3` conv, `skip_connection` when the width changes.
    """

    out_channels: int
    dropout: float = 0.0
    use_conv: bool = False  # 3x3 instead of 1x1 skip projection when the width changes
    use_scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
        """x [B, H, W, C], emb [B, E] float32 -> [B, H', W', out_channels]."""
        channels = x.shape[-1]
        h = nn.silu(layers.normalize(layers.group_norm("in_layers_0"), x))
        if self.up or self.down:
            # Resample after the norm/activation but before the conv, and resample the skip path
            # without a conv, as the reference's updown blocks do.
            resample = layers.upsample_nearest if self.up else layers.avg_pool2
            h, x = resample(h), resample(x)
        h = layers.conv3x3(self.out_channels, self.dtype, "in_layers_2")(h)

        # The reference keeps Linear layers in float32 even in fp16 mode (only convs are cast).
        emb_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = layers.dense(emb_width, jnp.float32, "emb_layers_1")(nn.silu(emb))
        emb_out = emb_out[:, None, None, :].astype(h.dtype)
        out_norm = layers.group_norm("out_layers_0")
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = layers.normalize(out_norm, h) * (1 + scale) + shift
        else:
            h = layers.normalize(out_norm, h + emb_out)
        h = nn.silu(h)
        if self.dropout > 0:
            h = nn.Dropout(self.dropout)(h, deterministic=not train)
        # Zero-initialised (the reference's zero_module): a fresh block is the identity.
        h = layers.conv3x3(self.out_channels, self.dtype, "out_layers_3", zero_init=True)(h)

        if channels == self.out_channels:
            skip = x
        elif self.use_conv:
            skip = layers.conv3x3(self.out_channels, self.dtype, "skip_connection")(x)
        else:
            skip = layers.conv1x1(self.out_channels, self.dtype, "skip_connection")(x)
        return skip + h


# What each `remat` policy keeps from a block's forward pass for the backward pass (None: the
# block is not wrapped at all). `checkpoint_dots` saves the outputs of every `dot_general` *and*
# `conv_general_dilated`, so a ResBlock keeps its convolutions' outputs and recomputes only the
# cheap GroupNorm / SiLU / scale-shift arithmetic; `dots_with_no_batch_dims_saveable` saves no
# convolution (nor attention's batched matmuls), which in a conv net is nearly "full" (measured
# on tests/test_remat.py's network: 9.8 MB kept, against 8.2 for full, 13.4 for dots and 46.4
# without remat). "full" saves nothing inside a block: the reference's use_checkpoint.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def check_remat(remat: str) -> str:
    """`remat` if it names a policy of REMAT_POLICIES, else ValueError listing them."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}; got {remat!r}")
    return remat


class _Blocks:
    """Creates the blocks shared by the UNet and the encoder, honouring the `remat` policy.

    Used only inside a compact method: every block is created under the calling module's scope with
    an explicit reference-mirroring name.
    """

    def __init__(self, net: nn.Module):
        self.net = net
        res_cls, attn_cls = ResBlock, attention.AttentionBlock
        if check_remat(net.remat) != "none":
            # Rematerialise block activations in the backward pass, per block as the reference
            # checkpoints them. Without differentiation jax.checkpoint lowers to the plain block,
            # so sampling programs are the same under every policy. `train` (argument 3,
            # counting self) is a Python bool.
            policy = REMAT_POLICIES[net.remat]
            res_cls = nn.remat(ResBlock, static_argnums=(3,), policy=policy)
            attn_cls = nn.remat(attention.AttentionBlock, policy=policy)
        self.res_cls, self.attn_cls = res_cls, attn_cls

    def res(self, name: str, out_channels: int, **kw) -> nn.Module:
        n = self.net
        return self.res_cls(
            out_channels=out_channels,
            dropout=n.dropout,
            use_scale_shift_norm=n.use_scale_shift_norm,
            dtype=n.dtype,
            name=name,
            **kw,
        )

    def attn(self, name: str, channels: int, num_heads: int) -> nn.Module:
        n = self.net
        return self.attn_cls(
            channels=channels,
            num_heads=num_heads,
            num_head_channels=n.num_head_channels,
            use_new_attention_order=n.use_new_attention_order,
            dtype=n.dtype,
            attention_impl=n.attention_impl,
            name=name,
        )

    def time_embed(self, timesteps: jax.Array, batch: int) -> jax.Array:
        """[B] timesteps -> [B, 4 * model_channels] float32 embedding (time_embed_0/2)."""
        n = self.net
        t = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        emb = layers.timestep_embedding(t, n.model_channels)
        width = 4 * n.model_channels
        emb = layers.dense(width, jnp.float32, "time_embed_0")(emb)
        return layers.dense(width, jnp.float32, "time_embed_2")(nn.silu(emb))

    def encoder(self, h: jax.Array, emb: jax.Array, train: bool) -> tuple[jax.Array, list]:
        """The downsampling half plus the middle block.

        Returns the middle block's output and the list of every input block's output (the UNet's
        skip connections; the encoder's spatial pools).
        """
        n = self.net
        ch = int(n.channel_mult[0] * n.model_channels)
        h = layers.conv3x3(ch, n.dtype, "input_blocks_0_0")(h)
        hs = [h]
        ds, idx = 1, 1
        for level, mult in enumerate(n.channel_mult):
            for _ in range(n.num_res_blocks):
                ch = int(mult * n.model_channels)
                h = self.res(f"input_blocks_{idx}_0", ch)(h, emb, train)
                if ds in n.attention_resolutions:
                    h = self.attn(f"input_blocks_{idx}_1", ch, n.num_heads)(h)
                hs.append(h)
                idx += 1
            if level != len(n.channel_mult) - 1:
                name = f"input_blocks_{idx}_0"
                if n.resblock_updown:
                    h = self.res(name, ch, down=True)(h, emb, train)
                else:
                    h = layers.Downsample(ch, n.conv_resample, n.dtype, name=name)(h)
                hs.append(h)
                idx += 1
                ds *= 2
        h = self.res("middle_block_0", ch)(h, emb, train)
        h = self.attn("middle_block_1", ch, n.num_heads)(h)
        h = self.res("middle_block_2", ch)(h, emb, train)
        return h, hs


class UNetModel(nn.Module):
    """The ADM UNet (reference `unet.UNetModel`, 2-D only).

    Attributes mirror the reference constructor; `attention_resolutions` are downsample rates
    (1 = full resolution), as `create_model` passes them. `num_classes=None` is unconditional.
    `null_class=True` (class-conditional only; classifier-free guidance) gives `label_emb`
    num_classes + 1 rows: label `num_classes` is the null label, "no class"; False keeps the
    reference's num_classes rows (its checkpoints convert unchanged).
    `remat` ("none" | "dots" | "full") replaces the reference's `use_checkpoint` (True = "full").
    Call: `apply(variables, x [B, H, W, C], timesteps [B], y=None [B] int, train=False)`
    -> [B, H, W, out_channels] float32; dropout (train=True) needs the "dropout" rng.
    """

    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    image_size: int | None = None  # informational (init helpers); the input sets the size
    in_channels: int = 3
    dropout: float = 0.0
    channel_mult: Sequence[float] = (1, 2, 4, 8)
    conv_resample: bool = True
    num_classes: int | None = None
    null_class: bool = False  # one extra label_emb row, label num_classes: see the docstring
    remat: str = "none"  # none | dots | full: see REMAT_POLICIES
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    def __call__(self, x, timesteps, y=None, train: bool = False):
        """x [B, H, W, C], timesteps [B] (may be fractional), y [B] int -> [B, H, W, out]."""
        return self._forward(x, timesteps, y, train)

    @nn.compact
    def _forward(self, x, timesteps, y, train):
        if (y is None) != (self.num_classes is None):
            raise ValueError(
                "y must be given if and only if the model is class-conditional "
                f"(num_classes={self.num_classes}, y is {'None' if y is None else 'given'})"
            )
        if self.null_class and self.num_classes is None:
            raise ValueError("null_class=True needs a class-conditional model (num_classes set)")
        blocks = _Blocks(self)
        emb = blocks.time_embed(timesteps, x.shape[0])
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape [{x.shape[0]}], got {y.shape}")
            emb = emb + nn.Embed(
                self.num_classes + int(self.null_class),
                emb.shape[-1],
                param_dtype=jnp.float32,
                embedding_init=nn.initializers.normal(1.0),  # PyTorch's nn.Embedding: N(0, 1)
                name="label_emb",
            )(y)

        h, hs = blocks.encoder(x.astype(self.dtype), emb, train)

        heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        ds = 2 ** (len(self.channel_mult) - 1)
        idx = 0
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                ch = int(self.model_channels * mult)
                h = blocks.res(f"output_blocks_{idx}_0", ch)(h, emb, train)
                sub = 1
                if ds in self.attention_resolutions:
                    h = blocks.attn(f"output_blocks_{idx}_{sub}", ch, heads_up)(h)
                    sub += 1
                if level and i == self.num_res_blocks:
                    name = f"output_blocks_{idx}_{sub}"
                    if self.resblock_updown:
                        h = blocks.res(name, ch, up=True)(h, emb, train)
                    else:
                        h = layers.Upsample(ch, self.conv_resample, self.dtype, name=name)(h)
                    ds //= 2
                idx += 1

        # The output head runs in float32, as the reference casts back before `self.out`.
        h = h.astype(jnp.float32)
        h = nn.silu(layers.group_norm("out_0")(h))
        # Zero-initialised like the reference's: a fresh model outputs exactly 0.
        return layers.conv3x3(self.out_channels, jnp.float32, "out_2", zero_init=True)(h)


class SuperResModel(UNetModel):
    """A UNet conditioned on a low-resolution image, upsampled bilinearly and concatenated.

    `in_channels` is the image's channel count, as in the reference; the network itself sees
    twice as many. Call: `apply(variables, x [B, H, W, C], timesteps [B], low_res=[B, h, w, C],
    y=None)`.
    """

    def __call__(self, x, timesteps, low_res=None, y=None, train: bool = False):
        if low_res is None:
            raise ValueError("SuperResModel needs low_res [B, h, w, C]")
        up = layers.bilinear_resize(low_res.astype(x.dtype), x.shape[1], x.shape[2])
        return self._forward(jnp.concatenate([x, up], axis=-1), timesteps, y, train)


class EncoderUNetModel(nn.Module):
    """The half UNet used as the noise-aware classifier (reference `unet.EncoderUNetModel`).

    `pool` is one of "adaptive", "attention", "spatial", "spatial_v2".
    Call: `apply(variables, x [B, H, W, C], timesteps [B])` -> logits [B, out_channels] float32.
    """

    image_size: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    in_channels: int = 3
    dropout: float = 0.0
    channel_mult: Sequence[float] = (1, 2, 4, 8)
    conv_resample: bool = True
    remat: str = "none"  # none | dots | full: see REMAT_POLICIES
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1  # unused by the encoder; kept for the reference's signature
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    pool: str = "adaptive"
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, timesteps, train: bool = False):
        """x [B, H, W, C], timesteps [B] -> logits [B, out_channels] float32."""
        if self.pool not in ("adaptive", "attention", "spatial", "spatial_v2"):
            raise ValueError(f"unknown classifier pool {self.pool!r}")
        if self.pool == "attention" and self.num_head_channels == -1:
            raise ValueError("the attention pool needs num_head_channels != -1")
        blocks = _Blocks(self)
        emb = blocks.time_embed(timesteps, x.shape[0])
        h, hs = blocks.encoder(x.astype(self.dtype), emb, train)

        if self.pool.startswith("spatial"):
            # Mean of every input block's output and the middle block's, in float32.
            feats = [a.astype(jnp.float32).mean(axis=(1, 2)) for a in [*hs, h]]
            h = jnp.concatenate(feats, axis=-1)
            h = layers.dense(2048, jnp.float32, "out_0")(h)
            if self.pool == "spatial":
                h = nn.relu(h)
                return layers.dense(self.out_channels, jnp.float32, "out_2")(h)
            h = nn.silu(layers.group_norm("out_1")(h))
            return layers.dense(self.out_channels, jnp.float32, "out_3")(h)

        h = nn.silu(layers.group_norm("out_0")(h.astype(jnp.float32)))
        if self.pool == "adaptive":
            h = h.mean(axis=(1, 2), keepdims=True)
            head = layers.conv1x1(self.out_channels, jnp.float32, "out_3", zero_init=True)
            return head(h)[:, 0, 0]  # zero-initialised, as the reference's adaptive head
        ds = 2 ** (len(self.channel_mult) - 1)
        return attention.AttentionPool2d(
            spatial_dim=self.image_size // ds,
            embed_dim=h.shape[-1],
            num_head_channels=self.num_head_channels,
            output_dim=self.out_channels,
            dtype=jnp.float32,
            attention_impl=self.attention_impl,
            name="out_2",
        )(h)


def example_inputs(module: nn.Module, *, batch: int = 1, image_size: int | None = None):
    """Zero inputs that trace `module` (for `init` / `jax.eval_shape`): `(args, kwargs)`.

    Parameter shapes do not depend on the spatial size except through the classifier's attention
    pool, so `image_size` defaults to the module's own, or to the smallest size every level of
    the network can halve.
    """
    size = image_size or getattr(module, "image_size", None)
    if not size:
        size = 2 ** (len(module.channel_mult) - 1)
    x = jnp.zeros((batch, size, size, module.in_channels), jnp.float32)
    t = jnp.zeros((batch,), jnp.float32)
    if isinstance(module, EncoderUNetModel):
        return (x, t), {}
    kwargs = {}
    if module.num_classes is not None:
        kwargs["y"] = jnp.zeros((batch,), jnp.int32)
    if isinstance(module, SuperResModel):
        small = max(1, size // 4)
        kwargs["low_res"] = jnp.zeros((batch, small, small, module.in_channels), jnp.float32)
    return (x, t), kwargs
