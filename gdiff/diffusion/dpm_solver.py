"""DPM-Solver and DPM-Solver++: fast ODE samplers for a noise- or data-predicting diffusion model.

Lu et al., "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10
Steps" (NeurIPS 2022, arXiv:2206.00927) and "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models" (arXiv:2211.01095). The semantics are those of
`dpm_solver_pytorch.py` (LuChengTHU/dpm-solver, MIT) with `NoiseScheduleVP('discrete', betas)`,
`model_wrapper(model_type="noise")` or `model_type="x_start"` (classifier guidance when a
`cond_fn` is given) and
`DPM_Solver.sample(method="multistep")`; the names below mirror its functions.

Both solvers integrate the diffusion ODE in the half-log-SNR lambda_t = log(alpha_t / sigma_t)
with an exponential integrator, so the linear part is exact and only the model term is
approximated (DPM-Solver, Sec. 3; DPM-Solver++, Sec. 4):

    dpmsolver   (noise prediction eps):
        x_t = (alpha_t / alpha_s) x_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps dlambda
    dpmsolver++ (data prediction x0):
        x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^{lambda} x0 dlambda

A multistep solver of order k replaces the model term by its Taylor polynomial in lambda built from
the last k model outputs (divided differences D1, D2). Every time step is known before sampling,
so every coefficient of an update is a number computed once on the host in float64; an update is
then one fixed linear combination of the current x and the last `order` model outputs. This makes
the whole solve one `jax.lax.scan` with a fixed-size history buffer and no branch on the order:
a lower-order step simply has zero weights on the older outputs.

Arrays are NHWC; the schedule and the time steps are float64 numpy (as the reference computes its
schedule; only the two end lambdas of the logSNR spacing are float32, as in the reference, see
`get_time_steps`), what runs on the device is float32.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++")
SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
# What the network predicts (the reference's `model_wrapper` model_type): the noise eps, or x_0,
# which the wrapper turns into the noise eps = (x - alpha_t x_0) / sigma_t.
MODEL_TYPES = ("noise", "x_start")
METHODS = ("multistep",)
ORDERS = (1, 2, 3)
# The reference clips the schedule where the half-log-SNR falls below this (`numerical_clip_alpha`):
# the cosine schedule's last steps have sigma -> 1, alpha -> 0, and lambda diverges there.
CLIPPED_LAMBDA = -5.1


def _namespace(t):
    """numpy for host values (float64), jax.numpy for device arrays and tracers (float32)."""
    return jnp if isinstance(t, jax.Array) else np


def interpolate_fn(x, xp, fp):
    """Piecewise-linear f(x) through the keypoints (xp, fp), extrapolated by the end segments.

    Mirrors the reference's `interpolate_fn` (which sorts x into the keypoints): outside
    [xp[0], xp[-1]] the first or last segment is extended, unlike `np.interp`, which clamps.

    Args:
      x: [...] query points (numpy or jax).
      xp: [K] increasing keypoints, K >= 2, in the same namespace and dtype as x.
      fp: [K] values at xp.
    Returns:
      f(x), shaped like x.
    """
    xnp = _namespace(x)
    k = xp.shape[0]
    start = xnp.clip(xnp.searchsorted(xp, x, side="left") - 1, 0, k - 2)
    x0, x1 = xp[start], xp[start + 1]
    y0, y1 = fp[start], fp[start + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseScheduleVP:
    """The discrete-time VP schedule of the reference's `NoiseScheduleVP('discrete', ...)`.

    Step n = 0 .. N-1 of the chain sits at continuous time t_n = (n + 1) / N, and log(alpha_t) is
    the piecewise-linear interpolation of log(alpha_{t_n}) = 0.5 * log(alphas_cumprod[n]).
    alpha_t is the signal scale and sigma_t = sqrt(1 - alpha_t^2) the noise scale of
    q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I).

    Every method takes either host values (numpy / Python floats: computed in float64; float32
    numpy in float32) or jax arrays (computed in float32 on the device), and returns the same kind.

    Attributes:
      log_alpha_array: [N] float64 log(alpha_{t_n}) after the log-SNR clip at -5.1.
      t_array: [N] float64 t_n = (n + 1) / N.
    """

    log_alpha_array: np.ndarray
    t_array: np.ndarray
    T: float = 1.0

    @classmethod
    def discrete(cls, betas=None, alphas_cumprod=None) -> "NoiseScheduleVP":
        """From `betas` [T] or `alphas_cumprod` [T] (one of the two), in float64.

        log_alpha_n = 0.5 * cumsum(log(1 - betas)), then `numerical_clip_alpha`: the trailing
        steps whose lambda is below -5.1 are dropped (4 of the 1000-step cosine schedule, so
        total_N = 996 there; none of the linear one).
        """
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("give exactly one of betas and alphas_cumprod")
        if betas is not None:
            log_alphas = 0.5 * np.cumsum(np.log(1.0 - np.asarray(betas, np.float64)))
        else:
            log_alphas = 0.5 * np.log(np.asarray(alphas_cumprod, np.float64))
        if log_alphas.ndim != 1 or log_alphas.shape[0] < 2:
            raise ValueError(
                f"the schedule needs a 1-D array of >= 2 steps, got {log_alphas.shape}"
            )
        log_sigmas = 0.5 * np.log(1.0 - np.exp(2.0 * log_alphas))
        lambdas = log_alphas - log_sigmas
        # lambda decreases along the chain: count the trailing steps below the clip.
        drop = int(np.searchsorted(lambdas[::-1], CLIPPED_LAMBDA))
        if drop > 0:
            log_alphas = log_alphas[:-drop]
        total_n = log_alphas.shape[0]
        t_array = np.linspace(0.0, 1.0, total_n + 1, dtype=np.float64)[1:]
        for a in (log_alphas, t_array):
            a.setflags(write=False)
        return cls(log_alpha_array=log_alphas, t_array=t_array)

    @property
    def total_N(self) -> int:  # noqa: N802 (the reference's name)
        return int(self.log_alpha_array.shape[0])

    def _keypoints(self, t):
        """(namespace, t as an array, t_array, log_alpha_array) in t's namespace and precision:
        float64 for host values, float32 for float32 numpy (the reference's rounding, on the host)
        and for jax arrays."""
        xnp = _namespace(t)
        if xnp is np:
            t = np.asarray(t)
            if t.dtype == np.float32:
                return (
                    np,
                    t,
                    self.t_array.astype(np.float32),
                    self.log_alpha_array.astype(np.float32),
                )
            return np, t.astype(np.float64), self.t_array, self.log_alpha_array
        return (
            jnp,
            jnp.asarray(t, jnp.float32),
            jnp.asarray(self.t_array, jnp.float32),
            jnp.asarray(self.log_alpha_array, jnp.float32),
        )

    def marginal_log_mean_coeff(self, t):
        """log(alpha_t) for continuous times t in [0, T]."""
        _, t, t_array, log_alpha_array = self._keypoints(t)
        return interpolate_fn(t, t_array, log_alpha_array)

    def marginal_alpha(self, t):
        """alpha_t."""
        xnp = _namespace(t)
        return xnp.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        """sigma_t = sqrt(1 - alpha_t^2)."""
        xnp = _namespace(t)
        return xnp.sqrt(1.0 - xnp.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        """lambda_t = log(alpha_t) - log(sigma_t), the half-log-SNR."""
        xnp = _namespace(t)
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * xnp.log(1.0 - xnp.exp(2.0 * log_mean_coeff))
        return log_mean_coeff - log_std

    def inverse_lambda(self, lamb):
        """The time t with marginal_lambda(t) = lamb: log(alpha) = -0.5 log(1 + e^{-2 lambda}),
        then the schedule interpolated backwards (log(alpha) decreases with t, hence the flip)."""
        xnp, lamb, t_array, log_alpha_array = self._keypoints(lamb)
        log_alpha = -0.5 * xnp.logaddexp(0.0, -2.0 * lamb)
        return interpolate_fn(log_alpha, log_alpha_array[::-1], t_array[::-1])

    def model_time(self, t):
        """The time the network sees, t_input = (t - 1/N) * 1000 (`get_model_input_time`): the
        chain's step index n at t_n (scaled to a 1000-step chain), fractional in between."""
        return (t - 1.0 / self.total_N) * 1000.0


def get_time_steps(ns: NoiseScheduleVP, skip_type: str, t_T: float, t_0: float, N: int):  # noqa: N803
    """The N + 1 times from t_T down to t_0 (the reference's `DPM_Solver.get_time_steps`).

    Args:
      ns: the schedule.
      skip_type: 'time_uniform' (uniform in t), 'logSNR' (uniform in lambda) or 'time_quadratic'
        (uniform in sqrt(t), DDIM's quadratic spacing).
      t_T, t_0: start and end times (1 and 1 / total_N for a whole solve).
      N: the number of steps.
    Returns:
      float64 numpy [N + 1], decreasing.
    """
    if skip_type == "logSNR":
        # The reference evaluates the two end lambdas in float32 (`torch.tensor(t_T)`), and that
        # rounding is part of its time steps: near t = 0, 1 - alpha^2 cancels in float32 (for the
        # cosine schedule lambda_0 comes out 2.6e-4 too low), which shifts every logSNR step by
        # up to 5e-4 relative and the solution by about 1.5e-3. So the ends are float32, as
        # there; the steps between them are float64.
        ends = ns.marginal_lambda(np.array([t_T, t_0], np.float32)).astype(np.float64)
        return ns.inverse_lambda(np.linspace(ends[0], ends[1], N + 1, dtype=np.float64))
    if skip_type == "time_uniform":
        return np.linspace(t_T, t_0, N + 1, dtype=np.float64)
    if skip_type == "time_quadratic":
        return np.linspace(t_T**0.5, t_0**0.5, N + 1, dtype=np.float64) ** 2
    raise ValueError(f"unsupported skip_type {skip_type!r}; supported: {', '.join(SKIP_TYPES)}")


def multistep_orders(steps: int, order: int, lower_order_final: bool) -> tuple[int, ...]:
    """The order of each of the `steps` updates of `DPM_Solver.sample(method="multistep")`.

    The first updates have too little history and use orders 1, 2, .. (warm-up). With
    `lower_order_final` and fewer than 10 steps the last updates lower the order again,
    min(order, steps + 1 - step) at step = 1 .. steps, which the reference finds stabilises very
    short solves; from 10 steps on the order stays `order` to the end.
    """
    orders = []
    for step in range(1, steps + 1):
        if step < order:
            orders.append(step)
        elif lower_order_final and steps < 10:
            orders.append(min(order, steps + 1 - step))
        else:
            orders.append(order)
    return tuple(orders)


def _update_weights(
    algorithm_type, k, lambdas, lambda_t, log_alpha_s, log_alpha_t, sigma_s, sigma_t
):
    """The update s -> t of order k as weights: x_t = w_x x_s + sum_j w_m[j] m_j.

    Mirrors the reference's `dpm_solver_first_update`, `multistep_dpm_solver_second_update` and
    `multistep_dpm_solver_third_update` (solver_type 'dpmsolver'), in float64. DPM-Solver++(2M) is
    Algorithm 2 of the DPM-Solver++ paper. `lambdas` are the k history times' lambdas, oldest
    first (the last one is s); the returned w_m [k] weighs the k model outputs in the same order.
    """
    eye = np.eye(k)
    m = [eye[k - 1 - j] for j in range(k)]  # m[0] the newest output (at s), m[1] the one before...
    h = lambda_t - lambdas[-1]
    data = algorithm_type == "dpmsolver++"
    if data:
        # x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) x0 - ...
        phi_1 = np.expm1(-h)
        w_x = sigma_t / sigma_s
        scale = np.exp(log_alpha_t)
    else:
        # x_t = (alpha_t/alpha_s) x_s - sigma_t (e^{h} - 1) eps - ...
        phi_1 = np.expm1(h)
        w_x = np.exp(log_alpha_t - log_alpha_s)
        scale = sigma_t
    w_m = -scale * phi_1 * m[0]
    if k == 2:
        # First divided difference of the outputs in lambda, scaled by h: D1_0 ~ h * dm/dlambda.
        r0 = (lambdas[-1] - lambdas[-2]) / h
        d1_0 = (m[0] - m[1]) / r0
        w_m = w_m - 0.5 * scale * phi_1 * d1_0
    elif k == 3:
        r0 = (lambdas[-1] - lambdas[-2]) / h
        r1 = (lambdas[-2] - lambdas[-3]) / h
        d1_0 = (m[0] - m[1]) / r0
        d1_1 = (m[1] - m[2]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        if data:
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            w_m = w_m + scale * phi_2 * d1 - scale * phi_3 * d2
        else:
            phi_2 = phi_1 / h - 1.0
            phi_3 = phi_2 / h - 0.5
            w_m = w_m - scale * phi_2 * d1 - scale * phi_3 * d2
    elif k != 1:
        raise ValueError(f"solver order must be 1, 2 or 3, got {k}")
    return float(w_x), w_m


def multistep_plan(
    ns: NoiseScheduleVP, time_steps: np.ndarray, orders, algorithm_type: str, history: int
) -> dict[str, np.ndarray]:
    """Everything the multistep solve needs per step, computed on the host in float64.

    Step i (i = 0 .. steps-1) evaluates the model at time_steps[i] and then updates x to
    time_steps[i + 1] with order orders[i] from the last orders[i] outputs.

    Args:
      ns: the schedule.
      time_steps: float64 [steps + 1], decreasing.
      orders: [steps] the order of each update.
      algorithm_type: 'dpmsolver' or 'dpmsolver++'.
      history: the size of the history buffer (the solver's order).
    Returns:
      float64 numpy arrays: t_input [steps] (the model time at step i), alpha, sigma [steps] (at
      time_steps[i]), w_x [steps] and w_m [steps, history] (the update's weights on x and on the
      history buffer, oldest output first; zero where an output is not used).
    """
    lambdas = ns.marginal_lambda(time_steps)
    log_alphas = ns.marginal_log_mean_coeff(time_steps)
    sigmas = ns.marginal_std(time_steps)
    steps = len(orders)
    w_x = np.zeros(steps)
    w_m = np.zeros((steps, history))
    for i, k in enumerate(orders):
        if k > i + 1 or k > history:
            raise ValueError(f"step {i} of order {k} needs more history than it has")
        w_x[i], w = _update_weights(
            algorithm_type,
            k,
            lambdas[i + 1 - k : i + 1],
            lambdas[i + 1],
            log_alphas[i],
            log_alphas[i + 1],
            sigmas[i],
            sigmas[i + 1],
        )
        w_m[i, history - k :] = w
    return {
        "t_input": ns.model_time(time_steps[:-1]),
        "alpha": np.exp(log_alphas[:-1]),
        "sigma": sigmas[:-1],
        "w_x": w_x,
        "w_m": w_m,
    }


def dynamic_thresholding_fn(x0: jax.Array, ratio: float, max_val: float) -> jax.Array:
    """Imagen's dynamic thresholding (Saharia et al. 2022), as the reference's function so named.

    s = max(quantile_ratio(|x0|) per example, max_val); x0 -> clip(x0, -s, s) / s. The quantile
    interpolates linearly, as `torch.quantile` does, over all pixels and channels of an example.

    Args:
      x0: [B, H, W, C] data prediction.
    Returns:
      [B, H, W, C].
    """
    flat = jnp.abs(x0).reshape(x0.shape[0], -1)
    s = jnp.quantile(flat, ratio, axis=1, method="linear")
    s = jnp.maximum(s, max_val).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


def _check_options(
    method, algorithm_type, order, steps, skip_type, model_type, dynamic_thresholding
) -> None:
    """ValueError naming the first setting `dpm_solver_sample` does not support."""
    if method not in METHODS:
        raise ValueError(
            f"unsupported DPM-Solver method {method!r}; supported: {', '.join(METHODS)}"
        )
    if algorithm_type not in ALGORITHM_TYPES:
        raise ValueError(
            f"unsupported algorithm_type {algorithm_type!r}; "
            f"supported: {', '.join(ALGORITHM_TYPES)}"
        )
    if order not in ORDERS:
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if not isinstance(steps, int | np.integer) or steps < order:
        raise ValueError(f"steps must be an integer >= order = {order}, got {steps!r}")
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"unsupported skip_type {skip_type!r}; supported: {', '.join(SKIP_TYPES)}")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}"
        )
    if dynamic_thresholding and algorithm_type != "dpmsolver++":
        # The reference thresholds only inside its data prediction, which dpmsolver never uses.
        raise ValueError("dynamic_thresholding applies to algorithm_type='dpmsolver++' only")


def _predictor(
    model_fn, cond_fn, *, batch, channels, model_type, algorithm_type, thresholding
) -> Callable:
    """predict(x, step) for `dpm_solver_sample`'s scan: the reference's `model_wrapper` (noise
    from the network, guided by `cond_fn`) then its data prediction for dpmsolver++, thresholded
    with (ratio, max value) when `thresholding` is given."""

    def predict(x, step):
        """The model's prediction at step's time: x0 for dpmsolver++, eps for dpmsolver."""
        t_input = jnp.full((batch,), step["t_input"], jnp.float32)
        out = model_fn(x, t_input)
        if out.shape[:-1] != x.shape[:-1] or out.shape[-1] < channels:
            raise ValueError(
                f"model_fn returned shape {tuple(out.shape)} for x of shape {x.shape}; expected "
                f"[B, H, W, >= {channels}] (NHWC, the prediction first)"
            )
        eps = out[..., :channels].astype(jnp.float32)
        if model_type == "x_start":
            # `model_wrapper(model_type="x_start")`: the noise the predicted x_0 implies.
            eps = (x - step["alpha"] * eps) / step["sigma"]
        if cond_fn is not None:
            # `model_wrapper` classifier guidance: the score gains grad log p(y | x_t).
            eps = eps - step["sigma"] * cond_fn(x, t_input).astype(jnp.float32)
        if algorithm_type == "dpmsolver":
            return eps
        x0 = (x - step["sigma"] * eps) / step["alpha"]
        if thresholding is not None:
            x0 = dynamic_thresholding_fn(x0, *thresholding)
        return x0

    return predict


def _solve(predict, x_T, xs, *, order: int, return_intermediate: bool):  # noqa: N803
    """The multistep solve as one `lax.scan` over the plan's per-step arrays `xs`, carrying x and
    a fixed [order, B, H, W, C] buffer of the model outputs (see `dpm_solver_sample`)."""

    def body(carry, step):
        x, history = carry
        # Oldest first; the output this step adds goes last. Unfilled slots stay zero and have
        # zero weight, so warm-up and final lower-order steps need no branch.
        history = jnp.concatenate([history[1:], predict(x, step)[None]], axis=0)
        # An explicit sum, not a tensordot: a dot could run in reduced precision on accelerators.
        x_next = step["w_x"] * x
        for j in range(order):
            x_next = x_next + step["w_m"][j] * history[j]
        return (x_next, history), (x_next if return_intermediate else None)

    history = jnp.zeros((order, *x_T.shape), jnp.float32)
    (x, _), states = jax.lax.scan(body, (x_T, history), xs)
    if return_intermediate:
        return x, jnp.concatenate([x_T[None], states], axis=0)
    return x


def dpm_solver_sample(
    model_fn: ModelFn,
    x_T,  # noqa: N803 (the paper's name)
    *,
    betas,
    steps: int,
    order: int = 2,
    algorithm_type: str = "dpmsolver++",
    skip_type: str = "time_uniform",
    method: str = "multistep",
    lower_order_final: bool = True,
    dynamic_thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    thresholding_max_val: float = 1.0,
    cond_fn: ModelFn | None = None,
    return_intermediate: bool = False,
    model_type: str = "noise",
):
    """Solves the diffusion ODE from t = 1 to t_end = 1 / total_N with multistep DPM-Solver(++).

    `DPM_Solver(model_fn, NoiseScheduleVP('discrete', betas), algorithm_type).sample(x_T, steps,
    order=order, skip_type=skip_type, method="multistep", lower_order_final=...)` of the reference,
    as one `jax.lax.scan` (so it runs in one `jax.jit`). Uses `steps` model evaluations.

    Args:
      model_fn: model_fn(x [B, H, W, C], t_input [B] float32) -> [B, H, W, C'] with C' >= C; the
        first C channels are the prediction `model_type` names (a learned-sigma model's raw output
        works).
        t_input = (t - 1/total_N) * 1000 is the (fractional) chain step the network sees.
      x_T: [B, H, W, C] the starting noise.
      betas: [T] the diffusion's beta schedule (float64 numpy); clipped at lambda = -5.1.
      steps: the number of steps (= model evaluations), >= order.
      order: 1, 2 or 3. Order 1 is DDIM (eta 0) at the solver's times.
      algorithm_type: 'dpmsolver++' (data prediction; recommended with guidance) or 'dpmsolver'
        (noise prediction).
      skip_type: 'time_uniform', 'logSNR' or 'time_quadratic' (see `get_time_steps`).
      method: 'multistep' (the only one supported).
      lower_order_final: lower the order over the last steps when steps < 10.
      dynamic_thresholding: threshold each data prediction (dpmsolver++ only) with
        `dynamic_thresholding_ratio` and `thresholding_max_val`.
      cond_fn: cond_fn(x, t_input) -> [B, H, W, C], the scaled grad_x log p(y | x_t) (section 5 of
        CONTRACT.md); guides the noise prediction as eps - sigma_t * cond_fn(x, t_input).
      return_intermediate: also return the states.
      model_type: 'noise' (the first C channels are eps) or 'x_start' (they are x_0; the
        reference's `model_wrapper` converts them to the noise (x - alpha_t x_0) / sigma_t before
        guidance and the solver's own data prediction, exactly as for a noise model).

    Returns:
      x [B, H, W, C] float32 at t_end, or with `return_intermediate` (x, trajectory) where
      trajectory [steps + 1, B, H, W, C] is x_T followed by the state after each step.
    """
    _check_options(
        method, algorithm_type, order, steps, skip_type, model_type, dynamic_thresholding
    )
    ns = NoiseScheduleVP.discrete(betas=betas)
    time_steps = get_time_steps(ns, skip_type, ns.T, 1.0 / ns.total_N, int(steps))
    orders = multistep_orders(int(steps), order, lower_order_final)
    plan = multistep_plan(ns, time_steps, orders, algorithm_type, history=order)
    xs = {k: jnp.asarray(v, jnp.float32) for k, v in plan.items()}

    x_T = jnp.asarray(x_T, jnp.float32)  # noqa: N806
    if x_T.ndim != 4:
        raise ValueError(f"x_T must be NHWC [B, H, W, C], got shape {x_T.shape}")
    batch, channels = x_T.shape[0], x_T.shape[-1]

    predict = _predictor(
        model_fn,
        cond_fn,
        batch=batch,
        channels=channels,
        model_type=model_type,
        algorithm_type=algorithm_type,
        thresholding=(dynamic_thresholding_ratio, thresholding_max_val)
        if dynamic_thresholding
        else None,
    )

    return _solve(predict, x_T, xs, order=order, return_intermediate=return_intermediate)
