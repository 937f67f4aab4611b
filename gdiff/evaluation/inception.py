"""The FID Inception-v3: TensorFlow's 2015-12-05 graph in pytorch-fid's `fid_inception_v3` layout.

Submodule names are pytorch-fid's (`Conv2d_1a_3x3`, `Mixed_5b.branch5x5_1`, `fc`, ...) so the
weight converter is a rename. The graph's quirks that decide every number downstream:

* every conv is conv (no bias) -> BatchNorm with eps 1e-3 (running statistics) -> ReLU;
* the average-pool branches exclude padded zeros from the divisor (TF SAME average pooling);
* Mixed_7c's pool branch is a 3x3 MAX pool, not an average pool;
* 1008 output classes; the evaluator's Inception Score drops the fc bias.

Inputs are already resized and scaled ([N, 299, 299, 3], (x - 128) / 128); see `features.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_EPS = 1e-3
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7  # the evaluator keeps mixed_6/conv[..., :7] as the sFID feature

Pad = int | tuple[int, int]


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3, running stats) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: Pad = 0  # symmetric; (ph, pw) for the 1x7 / 7x1 / 1x3 / 3x1 convs

    @nn.compact
    def __call__(self, x):
        ph, pw = (self.padding, self.padding) if isinstance(self.padding, int) else self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=(self.stride, self.stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _tower(x, name: str, convs: list[tuple]) -> jax.Array:
    """A chain of BasicConv2d named `<name>_1`, `<name>_2`, ...; each conv is
    (features, kernel) or (features, kernel, padding) or (features, kernel, padding, stride)."""
    for i, (features, kernel, *rest) in enumerate(convs):
        padding, stride = (rest + [0, 1][len(rest) :])[:2]
        x = BasicConv2d(features, kernel, stride=stride, padding=padding, name=f"{name}_{i + 1}")(x)
    return x


def _avg_pool_same(x):
    # TF SAME average pooling: border windows average only the cells inside the image.
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x):
    return nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))


def _max_pool_valid(x):
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
    """Mixed_5b/5c/5d: [1x1 64, 5x5 64, 3x3dbl 96, avg-pool proj] (35x35)."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = _tower(x, "branch5x5", [(48, (1, 1)), (64, (5, 5), 2)])
        b3 = _tower(x, "branch3x3dbl", [(64, (1, 1)), (96, (3, 3), 1), (96, (3, 3), 1)])
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: [3x3/2 384, 3x3dbl/2 96, max-pool/2] (35 -> 17)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = _tower(x, "branch3x3dbl", [(64, (1, 1)), (96, (3, 3), 1), (96, (3, 3), 0, 2)])
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e: [1x1 192, 7x7 192, 7x7dbl 192, avg-pool proj 192] (17x17).

    Returns the block output and its branch1x1 output (Mixed_6d's is the sFID feature).
    """

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of the 1-D convs
        b7 = _tower(x, "branch7x7", [(c7, (1, 1)), (c7, *row), (192, *col)])
        bd = _tower(
            x, "branch7x7dbl", [(c7, (1, 1)), (c7, *col), (c7, *row), (c7, *col), (192, *row)]
        )
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
    """Mixed_7a: [3x3/2 320, 7x7x3/2 192, max-pool/2] (17 -> 8)."""

    @nn.compact
    def __call__(self, x):
        b3 = _tower(x, "branch3x3", [(192, (1, 1)), (320, (3, 3), 0, 2)])
        b7 = _tower(
            x,
            "branch7x7x3",
            [(192, (1, 1)), (192, (1, 7), (0, 3)), (192, (7, 1), (3, 0)), (192, (3, 3), 0, 2)],
        )
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (average pool, `max_pool=False`) and Mixed_7c (max pool): 2048 channels (8x8)."""

    max_pool: bool

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        pooled = _max_pool_same(x) if self.max_pool else _avg_pool_same(x)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """The 2015 FID Inception graph. Call on preprocessed [N, 299, 299, 3] float32 inputs.

    Returns dict(pool_3 [N, 2048], spatial [N, 17*17*7] (Mixed_6d.branch1x1 channels 0..6 in
    H, W, C order), logits [N, 1008] (with the fc bias), logits_nobias [N, 1008]); with
    `return_debug=True` also `debug`: {block name: [N, h, w, c] block output}.
    """

    @nn.compact
    def __call__(self, x, return_debug: bool = False):
        debug = {}

        def keep(name, value):
            debug[name] = value
            return value

        x = keep("Conv2d_1a_3x3", BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x))
        x = keep("Conv2d_2a_3x3", BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x))
        x = keep("Conv2d_2b_3x3", BasicConv2d(64, (3, 3), padding=1, name="Conv2d_2b_3x3")(x))
        x = keep("maxpool1", _max_pool_valid(x))
        x = keep("Conv2d_3b_1x1", BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x))
        x = keep("Conv2d_4a_3x3", BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x))
        x = keep("maxpool2", _max_pool_valid(x))
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = keep(name, FIDInceptionA(pool_features, name=name)(x))
        x = keep("Mixed_6a", InceptionB(name="Mixed_6a")(x))
        spatial = None
        blocks_c = (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192))
        for name, c7 in blocks_c:
            x, branch1x1 = FIDInceptionC(c7, name=name)(x)
            keep(name, x)
            if name == "Mixed_6d":
                # TF's mixed_6/conv is Mixed_6d (not 6e); the evaluator keeps 7 channels.
                spatial = branch1x1[..., :SPATIAL_CHANNELS]
        x = keep("Mixed_7a", InceptionD(name="Mixed_7a")(x))
        x = keep("Mixed_7b", FIDInceptionE(max_pool=False, name="Mixed_7b")(x))
        x = keep("Mixed_7c", FIDInceptionE(max_pool=True, name="Mixed_7c")(x))
        pool_3 = jnp.mean(x, axis=(1, 2))
        fc = nn.Dense(NUM_CLASSES, name="fc")
        logits = fc(pool_3)
        logits_nobias = pool_3 @ fc.variables["params"]["kernel"]
        out = {
            "pool_3": pool_3,
            "spatial": spatial.reshape(spatial.shape[0], -1),
            "logits": logits,
            "logits_nobias": logits_nobias,
        }
        if return_debug:
            out["debug"] = debug
        return out


def create_fid_inception() -> FIDInceptionV3:
    """The FID Inception-v3 module; variables are {"params", "batch_stats"} (see
    `convert_fid_inception_state_dict` / `load_fid_inception_graph_def`)."""
    return FIDInceptionV3()


def block_names() -> Sequence[str]:
    """The blocks whose outputs `return_debug=True` exposes, in execution order."""
    return (
        "Conv2d_1a_3x3 Conv2d_2a_3x3 Conv2d_2b_3x3 maxpool1 Conv2d_3b_1x1 Conv2d_4a_3x3 maxpool2 "
        "Mixed_5b Mixed_5c Mixed_5d Mixed_6a Mixed_6b Mixed_6c Mixed_6d Mixed_6e Mixed_7a Mixed_7b "
        "Mixed_7c"
    ).split()
