"""Gaussian diffusion as pure functions over an immutable schedule object.

Mirrors the reference's `gaussian_diffusion.GaussianDiffusion` and `respace.SpacedDiffusion`
(Ho et al. 2020; Nichol & Dhariwal 2021; Dhariwal & Nichol 2021) with NHWC arrays:

* The schedule lives in float64 numpy arrays with the reference's attribute names. Every
  coefficient is gathered as float32 before use, as the reference's `_extract_into_tensor` does, so
  results agree with it to float32 rounding.
* The model arrives as a function `model_fn(x [B, H, W, C], ts [B]) -> [B, H, W, C or 2C]` that
  closes over its parameters (and labels); `cond_fn(x, ts) -> [B, H, W, C]` likewise. `ts` are the
  timesteps the network was trained with: mapped through `timestep_map` for a respaced chain and
  rescaled to 0..1000 when `rescale_timesteps` is set.
* Nothing is random inside a single step: steps take their `noise` explicitly. The loops take a
  `jax.random.key` (or a replayed noise stream) and run as one `jax.lax.scan`, the single loop of
  `gdiff.diffusion.chain` that the sampler and the bound share.

The object holds no JAX arrays, so it can be closed over inside `jax.jit` freely; its arrays become
compile-time constants.
"""

import enum
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gdiff.diffusion import chain, losses

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
Array = Any


class ModelMeanType(enum.Enum):
    """What the network's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise epsilon


class ModelVarType(enum.Enum):
    """Where the reverse-process variance comes from."""

    LEARNED = enum.auto()  # the extra C channels are log-variances
    FIXED_SMALL = enum.auto()  # the posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t (with beta~_1 at t = 0)
    LEARNED_RANGE = enum.auto()  # the extra C channels interpolate log beta~_t .. log beta_t


class LossType(enum.Enum):
    MSE = enum.auto()  # simple MSE (plus the VB term when variances are learned)
    RESCALED_MSE = enum.auto()  # MSE with the VB term scaled by num_timesteps / 1000
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the bound times num_timesteps (an estimate of the full VLB)

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def _as_enum(cls: type[enum.Enum], value) -> enum.Enum:
    if isinstance(value, cls):
        return value
    if isinstance(value, str) and value in cls.__members__:
        return cls[value]
    raise ValueError(f"{value!r} is not a {cls.__name__}; expected one of {list(cls.__members__)}")


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a)
    a.flags.writeable = False
    return a


class GaussianDiffusion:
    """A T-step Gaussian diffusion (training losses, samplers, likelihood).

    Args (keyword-only, as in the reference):
      betas: 1-D [T] noise schedule, 0 < beta <= 1.
      model_mean_type, model_var_type, loss_type: enum members (or their names).
      rescale_timesteps: feed the model t * 1000 / T (float) instead of integer t.

    Attributes: `num_timesteps` and float64 numpy arrays [T] `betas`, `alphas_cumprod`,
    `alphas_cumprod_prev`, `alphas_cumprod_next`, `sqrt_alphas_cumprod`,
    `sqrt_one_minus_alphas_cumprod`, `log_one_minus_alphas_cumprod`, `sqrt_recip_alphas_cumprod`,
    `sqrt_recipm1_alphas_cumprod`, `posterior_variance`, `posterior_log_variance_clipped`,
    `posterior_mean_coef1`, `posterior_mean_coef2`.
    """

    _frozen = False

    def __init__(
        self,
        *,
        betas,
        model_mean_type,
        model_var_type,
        loss_type,
        rescale_timesteps: bool = False,
    ):
        self.model_mean_type = _as_enum(ModelMeanType, model_mean_type)
        self.model_var_type = _as_enum(ModelVarType, model_var_type)
        self.loss_type = _as_enum(LossType, loss_type)
        self.rescale_timesteps = bool(rescale_timesteps)

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(
                f"betas must lie in (0, 1], got min {betas.min()} and max {betas.max()} "
                "(the linear schedule exceeds 1 below T = 50 steps)"
            )
        self.num_timesteps = int(betas.shape[0])

        # The posterior terms below divide by 1 - alphas_cumprod; float64 keeps them accurate.
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0, so its log is clipped to the t = 1 value (and the
        # FIXED_LARGE variance starts there too). A one-step chain, which the reference cannot
        # build, falls back to beta_0.
        var_head = posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        arrays = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "alphas_cumprod_next": np.append(alphas_cumprod[1:], 0.0),
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.append(var_head, posterior_variance[1:])),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev)
            * np.sqrt(alphas)
            / (1.0 - alphas_cumprod),
        }
        for name, value in arrays.items():
            setattr(self, name, _readonly(value))

        # Derived float64 arrays the steps gather, then the float32 copies they gather from
        # (the reference casts each gathered coefficient to float32: so do we, for parity).
        fixed_large_var = np.append(var_head, betas[1:])
        derived = {
            "one_minus_alphas_cumprod": 1.0 - alphas_cumprod,
            "log_betas": np.log(betas),
            "recip_posterior_mean_coef1": 1.0 / arrays["posterior_mean_coef1"],
            "coef2_over_coef1": arrays["posterior_mean_coef2"] / arrays["posterior_mean_coef1"],
            "fixed_large_variance": fixed_large_var,
            "fixed_large_log_variance": np.log(fixed_large_var),
        }
        self._f32 = {k: _readonly(v.astype(np.float32)) for k, v in {**arrays, **derived}.items()}
        self._frozen = True

    # The object is shared by jitted functions that close over it: keep it immutable.
    def __setattr__(self, name, value):
        if self._frozen:
            raise AttributeError(f"{type(self).__name__} is immutable (tried to set {name!r})")
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} is immutable (tried to delete {name!r})")

    # ------------------------------------------------------------------ helpers

    def _extract(self, name: str, t: Array, shape: tuple[int, ...]) -> jnp.ndarray:
        """Gathers float32 coefficient `name` at `t` [B] and broadcasts it to `shape` [B, ...]."""
        t = self._check_t(t, shape)
        res = jnp.asarray(self._f32[name])[t]
        return jnp.broadcast_to(res.reshape(res.shape + (1,) * (len(shape) - 1)), shape)

    @staticmethod
    def _check_t(t: Array, shape: tuple[int, ...]) -> jnp.ndarray:
        t = jnp.asarray(t)
        if t.shape != (shape[0],):
            raise ValueError(
                f"t must have shape [B] = ({shape[0]},) for x of shape {shape}, got {t.shape}"
            )
        return t

    def _scale_timesteps(self, t: jnp.ndarray) -> jnp.ndarray:
        if self.rescale_timesteps:
            return t.astype(jnp.float32) * np.float32(1000.0 / self.num_timesteps)
        return t

    def _model_timesteps(self, t: Array) -> jnp.ndarray:
        """The timesteps the model and cond_fn see for chain indices `t` [B]."""
        return self._scale_timesteps(jnp.asarray(t))

    def _call_model(self, model_fn: ModelFn, x: jnp.ndarray, t: Array) -> jnp.ndarray:
        out = model_fn(x, self._model_timesteps(t))
        learned = self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
        want = x.shape[:-1] + (2 * x.shape[-1] if learned else x.shape[-1],)
        if tuple(out.shape) != want:
            why = (
                f"2*C = {want[-1]} channels because the variance is learned ({self.model_var_type})"
                if learned
                else f"C = {want[-1]} channels for a fixed variance ({self.model_var_type})"
            )
            raise ValueError(
                f"model_fn returned shape {tuple(out.shape)} for x of shape {x.shape}; expected "
                f"{want}: {why}, NHWC"
            )
        return out

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        # (xprev - coef2 * x_t) / coef1
        return (
            self._extract("recip_posterior_mean_coef1", t, x_t.shape) * xprev
            - self._extract("coef2_over_coef1", t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape)

    # ------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start, t):
        """q(x_t | x_0): returns (mean, variance, log_variance), each [B, H, W, C]."""
        x_start = jnp.asarray(x_start)
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise):
        """Draws x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise; [B, H, W, C]."""
        x_start, noise = jnp.asarray(x_start), jnp.asarray(noise)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {noise.shape} != x_start shape {x_start.shape}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """q(x_{t-1} | x_t, x_0): returns (mean, variance, log_variance_clipped), [B, H, W, C]."""
        x_start, x_t = jnp.asarray(x_start), jnp.asarray(x_t)
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {x_start.shape} != x_t shape {x_t.shape}")
        mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t.shape)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------ reverse process

    def p_mean_variance(
        self,
        model_fn: ModelFn,
        x,
        t,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
    ) -> dict[str, jnp.ndarray]:
        """p(x_{t-1} | x_t) from the model, and its prediction of x_0.

        Args:
          model_fn: (x [B, H, W, C], ts [B]) -> [B, H, W, C] (or 2C channels, learned variance).
          x: x_t [B, H, W, C]; t: chain indices [B].
          clip_denoised: clip the x_0 prediction to [-1, 1].
          denoised_fn: applied to the x_0 prediction before clipping.
        Returns:
          dict(mean, variance, log_variance, pred_xstart), each [B, H, W, C].
        """
        x = jnp.asarray(x)
        t = self._check_t(t, x.shape)
        model_output = self._call_model(model_fn, x, t)

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, var_values = jnp.split(model_output, 2, axis=-1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = var_values
            else:
                # var_values in [-1, 1] interpolates between the posterior and the beta variance.
                min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
                max_log = self._extract("log_betas", t, x.shape)
                frac = (var_values + 1) / 2
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = jnp.exp(model_log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            # beta~_1 rather than beta_0 at t = 0 gives a better decoder likelihood.
            model_variance = self._extract("fixed_large_variance", t, x.shape)
            model_log_variance = self._extract("fixed_large_log_variance", t, x.shape)
        else:
            model_variance = self._extract("posterior_variance", t, x.shape)
            model_log_variance = self._extract("posterior_log_variance_clipped", t, x.shape)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return jnp.clip(x0, -1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, model_output))
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def condition_mean(self, cond_fn: ModelFn, p_mean_var: dict, x, t) -> jnp.ndarray:
        """Classifier guidance on the mean (Sohl-Dickstein et al. 2015): mean + variance * grad.

        `cond_fn(x, ts)` returns grad_x log p(y | x_t) [B, H, W, C] (already scaled).
        Returns the new mean [B, H, W, C].
        """
        x = jnp.asarray(x)
        gradient = cond_fn(x, self._model_timesteps(self._check_t(t, x.shape)))
        return p_mean_var["mean"].astype(jnp.float32) + p_mean_var["variance"] * gradient.astype(
            jnp.float32
        )

    def condition_score(self, cond_fn: ModelFn, p_mean_var: dict, x, t) -> dict[str, jnp.ndarray]:
        """Classifier guidance on the score (Song et al. 2020): eps -= sqrt(1 - abar) * grad.

        Returns a copy of `p_mean_var` with `pred_xstart` and `mean` recomputed from the guided eps.
        """
        x = jnp.asarray(x)
        t = self._check_t(t, x.shape)
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - jnp.sqrt(1 - alpha_bar) * cond_fn(x, self._model_timesteps(t))
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    def _guided_prediction(self, model_fn, x, t, clip_denoised, denoised_fn, cond_fn, *, on_score):
        """p_mean_variance at x_t [B, H, W, C], t [B], guided by `cond_fn` when given.

        The reference guides ancestral steps on the mean and DDIM steps on the score (`on_score`).
        Returns (x, t, out) with x and t checked, out as `p_mean_variance`.
        """
        x = jnp.asarray(x)
        t = self._check_t(t, x.shape)
        out = self.p_mean_variance(model_fn, x, t, clip_denoised, denoised_fn)
        if cond_fn is None:
            return x, t, out
        if on_score:
            guided = self.condition_score(cond_fn, out, x, t)
        else:
            guided = {**out, "mean": self.condition_mean(cond_fn, out, x, t)}
        active = getattr(cond_fn, "active", None)
        if active is None:
            return x, t, guided
        # A cond_fn with per-row intervals (guidance.IntervalCondFn, which skips the gradient at
        # steps where no row needs it): rows outside theirs keep the unguided prediction (a zero
        # gradient on the score would still round-trip x_0 through the noise).
        mask = active(self._model_timesteps(t)).reshape((-1,) + (1,) * (x.ndim - 1))
        return x, t, {k: jnp.where(mask, guided[k], out[k]) for k in out}

    @staticmethod
    def _nonzero_mask(t, x):
        # No noise is added on the last step (t == 0).
        return (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))

    def p_sample(
        self,
        model_fn: ModelFn,
        x,
        t,
        noise,
        clip_denoised: bool = True,
        cond_fn: ModelFn | None = None,
        denoised_fn: Callable | None = None,
    ) -> dict[str, jnp.ndarray]:
        """One ancestral step x_t -> x_{t-1}, guided on the mean (`condition_mean`) by `cond_fn`.

        `noise` [B, H, W, C] is ignored where t == 0. Returns dict(sample, pred_xstart), each
        [B, H, W, C].
        """
        x, t, out = self._guided_prediction(
            model_fn, x, t, clip_denoised, denoised_fn, cond_fn, on_score=False
        )
        sample = out["mean"] + self._nonzero_mask(t, x) * jnp.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model_fn: ModelFn,
        x,
        t,
        noise,
        eta=0.0,
        clip_denoised: bool = True,
        cond_fn: ModelFn | None = None,
        denoised_fn: Callable | None = None,
    ) -> dict[str, jnp.ndarray]:
        """One DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12); eta = 0 is deterministic.

        With `cond_fn`, the score is guided (`condition_score`). Returns dict(sample, pred_xstart),
        each [B, H, W, C].
        """
        x, t, out = self._guided_prediction(
            model_fn, x, t, clip_denoised, denoised_fn, cond_fn, on_score=True
        )
        # Re-derive eps so that x_0- and x_{t-1}-predicting models work too.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = (
            eta
            * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * jnp.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        mean_pred = (
            out["pred_xstart"] * jnp.sqrt(alpha_bar_prev)
            + jnp.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        sample = mean_pred + self._nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model_fn: ModelFn,
        x,
        t,
        eta=0.0,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
    ) -> dict[str, jnp.ndarray]:
        """One reverse-ODE DDIM step x_t -> x_{t+1} (deterministic: eta must be 0).

        Returns dict(sample, pred_xstart), each [B, H, W, C].
        """
        if isinstance(eta, int | float) and eta != 0.0:
            raise ValueError(f"ddim_reverse_sample is deterministic only: eta must be 0, got {eta}")
        x = jnp.asarray(x)
        t = self._check_t(t, x.shape)
        out = self.p_mean_variance(model_fn, x, t, clip_denoised, denoised_fn)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        mean_pred = (
            out["pred_xstart"] * jnp.sqrt(alpha_bar_next) + jnp.sqrt(1 - alpha_bar_next) * eps
        )
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    # ------------------------------------------------------------------- loops

    def sample_step(
        self,
        model_fn: ModelFn,
        *,
        use_ddim: bool = False,
        eta=0.0,
        clip_denoised: bool = True,
        cond_fn: ModelFn | None = None,
        denoised_fn: Callable | None = None,
    ) -> chain.Step:
        """The reverse step the sampling loops scan: `ddim_sample` (with eta) or `p_sample`.

        Returns step(x [B, H, W, C], t [B], noise [B, H, W, C]) -> dict(sample, pred_xstart), the
        `step` of `chain.scan_chain`; the sampler scans the same step with its own noise.
        """
        if use_ddim:
            return lambda x, t, noise: self.ddim_sample(
                model_fn, x, t, noise, eta, clip_denoised, cond_fn, denoised_fn
            )
        return lambda x, t, noise: self.p_sample(
            model_fn, x, t, noise, clip_denoised, cond_fn, denoised_fn
        )

    def _trajectory_loop(self, step, x_init, noise_fn, *, reverse, return_trajectory):
        """`chain.scan_chain` with the loops' return convention (see `p_sample_loop`)."""
        collect = chain.TRAJECTORY if return_trajectory else ()
        final, ys = chain.scan_chain(
            step, x_init, self.num_timesteps, noise_fn, reverse=reverse, collect=collect
        )
        if not return_trajectory:
            return final
        return {
            "sample": final,
            "trajectory": ys["sample"],
            "pred_xstart_trajectory": ys["pred_xstart"],
        }

    def _sample_loop(self, step, shape, rng, noise, step_noise, return_trajectory):
        """Runs `step` from x_T (drawn from `rng` or given as `noise`) down to t = 0.

        rng splits into an x_T key and a key per step, so a replayed x_T or step stream leaves the
        other draws as they were.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2:
            raise ValueError(f"shape must be [B, ...] (NHWC), got {shape}")
        if rng is None and (noise is None or step_noise is None):
            raise ValueError("rng may be None only when both noise and step_noise are given")
        init_key = steps_key = None
        if rng is not None:
            init_key, steps_key = jax.random.split(rng)
        if noise is None:
            x = jax.random.normal(init_key, shape, jnp.float32)
        else:
            x = jnp.asarray(noise, jnp.float32)
            if x.shape != shape:
                raise ValueError(f"noise (x_T) has shape {x.shape}, expected {shape}")
        noise_fn = chain.step_noise_fn(
            shape,
            self.num_timesteps,
            key=steps_key,
            stream=step_noise,
            hint=" (one draw per step, in call order)",
        )
        return self._trajectory_loop(
            step, x, noise_fn, reverse=True, return_trajectory=return_trajectory
        )

    def p_sample_loop(
        self,
        model_fn: ModelFn,
        shape,
        rng,
        clip_denoised: bool = True,
        cond_fn: ModelFn | None = None,
        noise=None,
        denoised_fn: Callable | None = None,
        step_noise=None,
        return_trajectory: bool = False,
    ):
        """Ancestral sampling over the whole chain as one `lax.scan`.

        Args:
          shape: (B, H, W, C). rng: a `jax.random.key` (x_T and one draw per step come from it).
          noise: optional x_T [B, H, W, C]. step_noise: optional [T, B, H, W, C], each step's noise
            in call order (replaces the per-step draws; the last one is unused, t = 0).
          cond_fn: optional guidance gradient (condition_mean).
        Returns:
          the final sample [B, H, W, C]; with return_trajectory, dict(sample, trajectory
          [T, B, H, W, C], pred_xstart_trajectory [T, B, H, W, C]), in step order.
        """
        step = self.sample_step(
            model_fn, clip_denoised=clip_denoised, cond_fn=cond_fn, denoised_fn=denoised_fn
        )
        return self._sample_loop(step, shape, rng, noise, step_noise, return_trajectory)

    def ddim_sample_loop(
        self,
        model_fn: ModelFn,
        shape,
        rng,
        eta=0.0,
        clip_denoised: bool = True,
        cond_fn: ModelFn | None = None,
        noise=None,
        denoised_fn: Callable | None = None,
        step_noise=None,
        return_trajectory: bool = False,
    ):
        """DDIM sampling over the whole chain as one `lax.scan`; arguments as `p_sample_loop`.

        Noise is drawn every step even when eta = 0, so a stream replays identically for any eta.
        """
        step = self.sample_step(
            model_fn,
            use_ddim=True,
            eta=eta,
            clip_denoised=clip_denoised,
            cond_fn=cond_fn,
            denoised_fn=denoised_fn,
        )
        return self._sample_loop(step, shape, rng, noise, step_noise, return_trajectory)

    def ddim_reverse_sample_loop(
        self,
        model_fn: ModelFn,
        x_0,
        clip_denoised: bool = True,
        eta=0.0,
        return_trajectory: bool = False,
    ):
        """Encodes x_0 [B, H, W, C] into x_T with the reverse DDIM ODE, t = 0 .. T-1 (one scan).

        Returns x_T [B, H, W, C]; with return_trajectory, dict(sample, trajectory,
        pred_xstart_trajectory) with [T, B, H, W, C] trajectories in step order.
        """

        def step(x, t, _):
            return self.ddim_reverse_sample(model_fn, x, t, eta, clip_denoised)

        return self._trajectory_loop(
            step, x_0, None, reverse=False, return_trajectory=return_trajectory
        )

    # ------------------------------------------------------------------ losses

    def _vb_terms_bpd(self, model_fn: ModelFn, x_start, x_t, t, clip_denoised: bool = True):
        """One term of the variational bound, in bits per dimension.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the decoder NLL at t = 0.
        Returns dict(output [B], pred_xstart [B, H, W, C]).
        """
        x_start = jnp.asarray(x_start)
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_fn, x_t, t, clip_denoised=clip_denoised)
        kl = losses.normal_kl(
            true_mean, true_log_variance_clipped, out["mean"], out["log_variance"]
        )
        kl = losses.mean_flat(kl) / np.log(2.0)
        decoder_nll = -losses.discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = losses.mean_flat(decoder_nll) / np.log(2.0)
        output = jnp.where(jnp.asarray(t) == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model_fn: ModelFn, x_start, t, noise) -> dict[str, jnp.ndarray]:
        """Per-example training losses at chain indices `t` [B] with the given `noise`.

        Args:
          model_fn: the network (see `p_mean_variance`); x_start, noise: [B, H, W, C].
        Returns:
          dict(loss [B]) plus mse [B] for MSE losses and vb [B] when the variance is learned
          (the hybrid objective; the vb term does not move the mean prediction).
        """
        x_start = jnp.asarray(x_start)
        t = self._check_t(t, x_start.shape)
        x_t = self.q_sample(x_start, t, noise)
        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model_fn, x_start, x_t, t, clip_denoised=False)[
                "output"
            ]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = self._call_model(model_fn, x_t, t)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, var_values = jnp.split(model_output, 2, axis=-1)
            # The vb term trains only the variance: the mean prediction is frozen for it.
            frozen_out = jnp.concatenate([jax.lax.stop_gradient(model_output), var_values], axis=-1)
            terms["vb"] = self._vb_terms_bpd(
                lambda *_: frozen_out, x_start, x_t, t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # /1000 keeps the vb term from swamping the MSE (the reference's convention).
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = jnp.asarray(noise)
        terms["mse"] = losses.mean_flat(jnp.square(target - model_output))
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start) -> jnp.ndarray:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, [B]."""
        x_start = jnp.asarray(x_start)
        t = jnp.full((x_start.shape[0],), self.num_timesteps - 1, jnp.int32)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = losses.normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)
        return losses.mean_flat(kl_prior) / np.log(2.0)

    def calc_bpd_loop(
        self,
        model_fn: ModelFn,
        x_start,
        rng,
        clip_denoised: bool = True,
        noise=None,
        noise_fn: chain.NoiseFn | None = None,
    ) -> dict[str, jnp.ndarray]:
        """The whole variational bound in bits per dimension, one `lax.scan` over t = T-1 .. 0.

        Args:
          x_start: [B, H, W, C]; rng: a `jax.random.key` for each step's q_sample noise, or
          noise: [T, B, H, W, C] to replay (in step order), or noise_fn: noise_fn(t) -> [B, H, W, C]
          (e.g. per-example streams, as --mode=nll draws them).
        Returns:
          dict(total_bpd [B], prior_bpd [B], vb [B, T], xstart_mse [B, T], mse [B, T]); the T axis
          is in step order (t = T-1 first), as the reference stacks it.
        """
        x_start = jnp.asarray(x_start, jnp.float32)
        if noise is None and rng is None and noise_fn is None:
            raise ValueError("calc_bpd_loop needs an rng, a noise stream or a noise_fn")
        if noise_fn is None:
            noise_fn = chain.step_noise_fn(
                x_start.shape, self.num_timesteps, key=rng, stream=noise, name="noise"
            )

        def step(x_0, t, n):
            # Each term noises the same x_0 afresh: the chain's state stays x_0.
            x_t = self.q_sample(x_0, t, n)
            out = self._vb_terms_bpd(model_fn, x_0, x_t, t, clip_denoised=clip_denoised)
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            return {
                "sample": x_0,
                "vb": out["output"],
                "xstart_mse": losses.mean_flat(jnp.square(out["pred_xstart"] - x_0)),
                "mse": losses.mean_flat(jnp.square(eps - n)),
            }

        _, terms = chain.scan_chain(
            step, x_start, self.num_timesteps, noise_fn, collect=("vb", "xstart_mse", "mse")
        )
        vb, xstart_mse, mse = terms["vb"].T, terms["xstart_mse"].T, terms["mse"].T
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(axis=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that keeps only `use_timesteps` of a base chain (respacing, e.g. for DDIM).

    Its betas are re-derived from the base alphas_cumprod at the kept steps, so the marginals
    q(x_t | x_0) at those steps are unchanged. The model and cond_fn receive the ORIGINAL timesteps
    (`timestep_map[t]`), rescaled by 1000 / original_num_steps when `rescale_timesteps` is set.

    Args:
      use_timesteps: original step indices to keep (a set, e.g. from `space_timesteps`).
      **kwargs: the base `GaussianDiffusion` arguments (betas of the original chain, ...).
    Attributes (besides the base ones): `use_timesteps` (frozenset), `timestep_map` (int64 numpy
    [num_timesteps], respaced index -> original step), `original_num_steps`.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        base_betas = np.array(kwargs["betas"], dtype=np.float64)
        if base_betas.ndim != 1:
            raise ValueError(f"betas must be 1-D, got shape {base_betas.shape}")
        use = frozenset(int(i) for i in use_timesteps)
        bad = sorted(i for i in use if not 0 <= i < base_betas.shape[0])
        if bad:
            raise ValueError(
                f"use_timesteps {bad[:5]} lie outside the original 0..{base_betas.shape[0] - 1}"
            )
        if not use:
            raise ValueError("use_timesteps is empty")
        alphas_cumprod = np.cumprod(1.0 - base_betas)
        last_alpha_cumprod = 1.0
        new_betas, timestep_map = [], []
        for i, alpha_cumprod in enumerate(alphas_cumprod):
            if i in use:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                timestep_map.append(i)
        self.use_timesteps = use
        self.timestep_map = _readonly(np.array(timestep_map, dtype=np.int64))
        self.original_num_steps = int(base_betas.shape[0])
        super().__init__(**{**kwargs, "betas": np.array(new_betas)})

    def _model_timesteps(self, t: Array) -> jnp.ndarray:
        new_ts = jnp.asarray(self.timestep_map.astype(np.int32))[jnp.asarray(t)]
        if self.rescale_timesteps:
            # By the ORIGINAL chain length: the network was trained on that scale.
            return new_ts.astype(jnp.float32) * np.float32(1000.0 / self.original_num_steps)
        return new_ts
