"""FID / sFID, Inception Score and improved precision/recall with the ADM evaluator's numerics.

Mirrors `evaluations/evaluator.py` of openai/guided-diffusion: `FIDStatistics.frechet_distance`
(scipy `sqrtm`, eps retry, imaginary-part check), `compute_inception_score` (the split is a chunk
SIZE), and `ManifoldEstimator` (k-NN radii and precision/recall from squared pairwise distances that
are computed in float16 first and in float32 only when a float16 block overflows).

The float16 distances are emulated exactly as TensorFlow's CPU kernels produce them (the golden
radii are float16 values, so any other rounding moves them): inputs rounded to float16; squared
norms summed the way Eigen reduces a float16 row (8-lane float16 accumulators, four of them
interleaved, lanes summed in float32, halves recursively above 1600 values); the Gram matrix
accumulated in float32 and rounded once; then `max(|u|^2 - 2 u.v + |v|^2, 0)` with a float16
rounding after each operation. The Gram matrix and the elementwise part run jitted in JAX with
explicit bit-level rounding, which XLA cannot fuse away.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

# ----------------------------------------------------------------------------- FID


def compute_statistics(acts) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (`np.cov(rowvar=False)`, float64) of activations [N, D]."""
    acts = np.asarray(acts)
    if acts.ndim != 2 or acts.shape[0] < 2:
        raise ValueError(f"activations must be [N >= 2, D]; got shape {acts.shape}")
    return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def _sqrtm(m):
    # The reference calls sqrtm(..., disp=False) (returns the root and an error estimate, prints
    # nothing); SciPy deprecates `disp`, so fall back to the plain call where it is gone. Same
    # algorithm either way. disp=False means "no singular-matrix warning": newer SciPy warns anyway,
    # and a rank-deficient covariance (few samples, ReLU features) is expected, so stay silent.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            return linalg.sqrtm(m, disp=False)[0]
    except TypeError:
        return linalg.sqrtm(m)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)), as the reference evaluator computes it.

    Args:
      mu1, mu2: [D] means; sigma1, sigma2: [D, D] covariances.
      eps: diagonal offset used only when sqrtm(S1 S2) is not finite.

    Raises:
      ValueError: mismatched shapes, or a significant imaginary part in sqrt(S1 S2).
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape}, {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances have different dimensions: {sigma1.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- Inception Score


def inception_score(probs, split_size: int = 5000) -> float:
    """exp(E_x KL(p(y|x) || p(y))) averaged over consecutive chunks of `split_size` rows.

    Args:
      probs: [N, K] class probabilities.
      split_size: rows per chunk (a SIZE, not a count); a short last chunk counts as much as a
        full one, as in the reference.
    """
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must be [N > 0, K]; got shape {probs.shape}")
    if split_size <= 0:
        raise ValueError(f"split_size must be positive; got {split_size}")
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- float16 distances

_F16_LANES = 8  # Eigen's Packet8h on AVX
_F16_ACCUMULATORS = 4
_F16_LEAF = 200 * _F16_LANES  # Eigen splits float16 reductions above LeafSize<half> packets


def _f16(x):
    with np.errstate(over="ignore"):  # overflow to inf is the signal for the float32 fallback
        return np.asarray(x, np.float16)


def _eigen_f16_sum_rows(sq: np.ndarray, first_index: np.ndarray) -> np.ndarray:
    """Row sums of a float16 [N, D] array as Eigen's vectorised inner-dim reduction rounds them.

    `first_index` [N] is each row's flat offset in the reduced tensor: the recursive split point is
    aligned to a packet boundary of the flat index, as Eigen aligns it.
    """
    n, d = sq.shape
    if d > _F16_LEAF:
        # Rows of different alignment split at different columns; group rows by alignment.
        out = np.empty(n, np.float16)
        half = -(-d // 2)
        for offset in np.unique(first_index % _F16_LANES):
            rows = np.nonzero(first_index % _F16_LANES == offset)[0]
            split = _F16_LANES * (-(-(int(offset) + half) // _F16_LANES)) - int(offset)
            split = min(split, d)
            left = _eigen_f16_sum_rows(sq[rows, :split], first_index[rows])
            right = (
                _eigen_f16_sum_rows(sq[rows, split:], first_index[rows] + split)
                if split < d
                else np.zeros(len(rows), np.float16)
            )
            out[rows] = _f16(_f16(np.float16(0) + left) + right)
        return out
    lanes, accs = _F16_LANES, _F16_ACCUMULATORS
    acc = [np.zeros((n, lanes), np.float16) for _ in range(accs)]
    block = lanes * accs
    v4 = (d // block) * block
    for j in range(0, v4, block):
        for a in range(accs):
            acc[a] = _f16(acc[a] + sq[:, j + a * lanes : j + (a + 1) * lanes])
    total = acc[0]
    if v4:
        for a in range(1, accs):
            total = _f16(total + acc[a])
    vec = (d // lanes) * lanes
    for j in range(v4, vec, lanes):
        total = _f16(total + sq[:, j : j + lanes])
    scalar = np.zeros(n, np.float16)
    for j in range(vec, d):
        scalar = _f16(scalar + sq[:, j])
    return _f16(scalar + _f16(total.astype(np.float32).sum(axis=1)))


def squared_norms_f16(features) -> np.ndarray:
    """TF's float16 `reduce_sum(square(cast(U, float16)), 1)` on CPU, returned as float32 [N]."""
    u = _f16(features)
    d = u.shape[1]
    with np.errstate(over="ignore", invalid="ignore"):
        return _eigen_f16_sum_rows(_f16(np.square(u)), np.arange(len(u)) * d).astype(np.float32)


def _round_f16(x):
    """Round float32 to the nearest float16 value (ties to even), staying in float32.

    Done on the bits, because XLA may drop a float32 -> float16 -> float32 round trip.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    # Normal range: keep 10 of 23 mantissa bits, rounding to nearest even.
    rounded = bits + jnp.uint32(0x0FFF) + ((bits >> 13) & jnp.uint32(1))
    normal = jax.lax.bitcast_convert_type(rounded & jnp.uint32(0xFFFFE000), jnp.float32)
    # Subnormal float16 range: a fixed grid of 2^-24 (round() is half-to-even).
    tiny = jnp.round(x * np.float32(2.0**24)) * np.float32(2.0**-24)
    out = jnp.where(jnp.abs(x) < np.float32(2.0**-14), tiny, normal)
    out = jnp.where(jnp.abs(out) > np.float32(65504.0), jnp.sign(x) * jnp.inf, out)
    return jnp.where(jnp.isnan(x), x, out)


@jax.jit
def _distance_block(u, v, nu16, nv16, rows_valid, cols_valid):
    """Squared distances of one [R, D] x [C, D] block; float16-emulated, float32 on overflow.

    `nu16`, `nv16` are the float16 squared norms; `rows_valid`/`cols_valid` mask padding out of
    the overflow test (the reference decides per block over its real entries).
    """
    hp = jax.lax.Precision.HIGHEST
    u16, v16 = _round_f16(u), _round_f16(v)
    gram16 = _round_f16(jnp.matmul(u16, v16.T, precision=hp))
    two = _round_f16(np.float32(2.0) * gram16)
    d16 = _round_f16(_round_f16(nu16[:, None] - two) + nv16[None, :])
    d16 = jnp.maximum(d16, np.float32(0.0))
    mask = rows_valid[:, None] & cols_valid[None, :]
    finite = jnp.all(jnp.where(mask, jnp.isfinite(d16), True))
    nu = jnp.sum(u * u, axis=1)
    nv = jnp.sum(v * v, axis=1)
    d32 = jnp.maximum(nu[:, None] - 2 * jnp.matmul(u, v.T, precision=hp) + nv[None, :], 0.0)
    return jnp.where(finite, d16, d32)


@functools.partial(jax.jit, static_argnames=("kmax",))
def _kth_smallest(dist, cols_valid, kmax):
    dist = jnp.where(cols_valid[None, :], dist, jnp.inf)
    return -jax.lax.top_k(-dist, kmax + 1)[0]


@jax.jit
def _less_thans(dist, radii_1, radii_2, rows_valid, cols_valid):
    # dist [R, C]; radii_1 [R, K] (row points), radii_2 [C, K] (column points).
    d = dist[..., None]
    mask = (rows_valid[:, None] & cols_valid[None, :])[..., None]
    row_in = jnp.any((d <= radii_2[None]) & mask, axis=1)
    col_in = jnp.any((d <= radii_1[:, None]) & mask, axis=0)
    return row_in, col_in


def _pad(x: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    valid = np.zeros(size, bool)
    valid[: len(x)] = True
    if len(x) < size:
        x = np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])
    return x, valid


class ManifoldEstimator:
    """k-NN manifold estimate of a feature set (Kynkaanniemi et al. 2019), the reference's numerics.

    Args:
      row_batch_size, col_batch_size: the block sizes of the pairwise distances; they decide
        which blocks fall back to float32, so they are part of the numerics.
      nhood_sizes: the k's (index into sorted distances; index 0 is the point itself).
      clamp_to_percentile: drop radii above this percentile (None: keep all).
      eps: used by the realism score.
    """

    def __init__(
        self,
        row_batch_size: int = 10000,
        col_batch_size: int = 10000,
        nhood_sizes=(3,),
        clamp_to_percentile=None,
        eps: float = 1e-5,
    ):
        self.row_batch_size = int(row_batch_size)
        self.col_batch_size = int(col_batch_size)
        self.nhood_sizes = tuple(int(k) for k in nhood_sizes)
        self.clamp_to_percentile = clamp_to_percentile
        self.eps = eps

    def _blocks(self, n, size):
        return [(b, min(b + size, n)) for b in range(0, n, size)]

    def _padded(self, feats, norms, begin, end, size):
        f, valid = _pad(feats[begin:end], size)
        nrm, _ = _pad(norms[begin:end], size)
        return jnp.asarray(f), jnp.asarray(nrm), jnp.asarray(valid)

    def manifold_radii(self, features) -> np.ndarray:
        """[N, len(nhood_sizes)] float32: squared distance to each point's k-th neighbour."""
        features = np.asarray(features, np.float32)
        n = len(features)
        norms = squared_norms_f16(features)
        kmax = max(self.nhood_sizes)
        if n <= kmax:
            raise ValueError(f"need more than {kmax} feature vectors for k={kmax}; got {n}")
        radii = np.zeros([n, len(self.nhood_sizes)], np.float32)
        # Blocks never exceed the data: padding to 10000 would only waste compute.
        rb, cb = min(self.row_batch_size, n), min(self.col_batch_size, n)
        for r0, r1 in self._blocks(n, rb):
            u, nu, rv = self._padded(features, norms, r0, r1, rb)
            row = []
            for c0, c1 in self._blocks(n, cb):
                v, nv, cv = self._padded(features, norms, c0, c1, cb)
                row.append(_distance_block(u, v, nu, nv, rv, cv)[:, : c1 - c0])
            dist = jnp.concatenate(row, axis=1)
            kth = np.asarray(_kth_smallest(dist, jnp.ones(n, bool), kmax=kmax))
            radii[r0:r1] = kth[: r1 - r0][:, list(self.nhood_sizes)]
        if self.clamp_to_percentile is not None:
            max_distances = np.percentile(radii, self.clamp_to_percentile, axis=0)
            radii[radii > max_distances] = 0
        return radii

    def evaluate_pr(self, features_1, radii_1, features_2, radii_2):
        """(precision [K1], recall [K2]): the fraction of set 2 inside set 1's manifold and the
        fraction of set 1 inside set 2's (set 1 = reference, set 2 = samples)."""
        f1, f2 = np.asarray(features_1, np.float32), np.asarray(features_2, np.float32)
        r1, r2 = np.asarray(radii_1, np.float32), np.asarray(radii_2, np.float32)
        n1, n2 = len(f1), len(f2)
        norms_1, norms_2 = squared_norms_f16(f1), squared_norms_f16(f2)
        status_1 = np.zeros([n1, r2.shape[1]], bool)
        status_2 = np.zeros([n2, r1.shape[1]], bool)
        rb, cb = min(self.row_batch_size, n1), min(self.col_batch_size, n2)
        for b1, e1 in self._blocks(n1, rb):
            u, nu, rv = self._padded(f1, norms_1, b1, e1, rb)
            rad1, _ = _pad(r1[b1:e1], rb)
            for b2, e2 in self._blocks(n2, cb):
                v, nv, cv = self._padded(f2, norms_2, b2, e2, cb)
                rad2, _ = _pad(r2[b2:e2], cb)
                dist = _distance_block(u, v, nu, nv, rv, cv)
                one_in, two_in = _less_thans(dist, jnp.asarray(rad1), jnp.asarray(rad2), rv, cv)
                status_1[b1:e1] |= np.asarray(one_in)[: e1 - b1]
                status_2[b2:e2] |= np.asarray(two_in)[: e2 - b2]
        return (
            np.mean(status_2.astype(np.float64), axis=0),
            np.mean(status_1.astype(np.float64), axis=0),
        )


def precision_recall(
    real_features,
    fake_features,
    *,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
    nhood_sizes=(3,),
    clamp_to_percentile=None,
    return_radii: bool = False,
):
    """Improved precision and recall (k=3 by default) of fake vs real features [N, D].

    Returns:
      (precision, recall) floats for the first neighbourhood size; with `return_radii=True`,
      (precision, recall, radii_real [N1, K], radii_fake [N2, K]).
    """
    real = np.asarray(real_features, np.float32)
    fake = np.asarray(fake_features, np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be [N, D] with equal D; got {real.shape}, {fake.shape}")
    est = ManifoldEstimator(row_batch_size, col_batch_size, nhood_sizes, clamp_to_percentile)
    radii_real = est.manifold_radii(real)
    radii_fake = est.manifold_radii(fake)
    precision, recall = est.evaluate_pr(real, radii_real, fake, radii_fake)
    if return_radii:
        return float(precision[0]), float(recall[0]), radii_real, radii_fake
    return float(precision[0]), float(recall[0])
