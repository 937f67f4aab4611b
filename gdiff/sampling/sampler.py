"""The compiled, device-mapped guided sampler.

One call samples one global batch: the whole reverse chain is a single `jax.lax.scan` inside one
`jax.jit`, data-parallel over a one-axis device mesh (`gdiff.distributed.data_mesh()`, batch axis
sharded with `NamedSharding`), so nothing returns to the host between steps. Classifier guidance is
`jax.grad` of the classifier's log-softmax at the target labels, evaluated inside the scanned step
(`condition_mean` for ancestral steps, `condition_score` for DDIM; the diffusion core pairs them).

The program is one of three samplers (`sample.sampler`): ancestral steps, DDIM steps (both
`sample_chain` over a possibly respaced chain) or DPM-Solver / DPM-Solver++ (`dpm_solver_chain`:
the ODE solved on the model's full training chain in `dpm_solver_steps` model evaluations). All
three start from the same per-example x_T and take the same labels and per-row scales, so a sweep
can compare them over the same noise.

Randomness is per EXAMPLE, not per batch: example `i` of a run draws its starting noise and every
step's noise from `fold_in(key(seed), i)`. A sample therefore depends only on (seed, i, label,
scale), never on the batch size, the number of devices or hosts, or which batch it landed in; that
is what makes resumed runs, 1-vs-8-device runs and scale sweeps over shared noise agree exactly.
A scale sweep simply repeats each example id (and label) once per scale and passes a per-row
scale array, so all scales run in ONE compiled program over the same noise.

`build_sampler` is the one way a sampling program is built from config groups: `--mode=sample`
(gdiff/jobs/sample.py) hands it the config's groups, benchmarks/bench_sampling.py the same groups
as plain dicts, so the benchmark times the production program (networks, compute dtypes, attention
implementation, sampler).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gdiff import distributed, errors, factory, xla_options
from gdiff.diffusion import chain, dpm_solver, schedules
from gdiff.diffusion import gaussian_diffusion as gd
from gdiff.diffusion import guidance as guidance_lib
from gdiff.sampling import guidance_rows

# cond_fn(x [B,H,W,C], ts [B]) -> gradient [B,H,W,C]; see CONTRACT.md section 5.
CondFn = Callable[[jax.Array, jax.Array], jax.Array]
# guidance(classifier_variables, labels [B], scales [B]) -> cond_fn, or None for no guidance.
Guidance = Callable[[Any, jax.Array, jax.Array], CondFn | None]

# Stream tags folded into an example's key: one for x_T, one for the per-step noise.
_X_T_STREAM = 0
_STEP_STREAM = 1


def classifier_guidance(classifier) -> Guidance:
    """The paper's guidance hook: `scale * grad_x log p(y | x_t)` from a noise-aware classifier.

    Args:
      classifier: a flax module with `apply(variables, x, t) -> logits [B, K]`.

    Returns:
      guidance(variables, labels [B], scales [B]) -> cond_fn. Other guidance kinds (e.g. a
      classifier-free one) plug in by passing another function with this signature.
    """

    def guidance(variables, labels, scales):
        def classifier_apply(x, ts):
            return classifier.apply(variables, x, ts)

        return guidance_lib.classifier_cond_fn(classifier_apply, labels, scales)

    return guidance


def example_keys(base_key: jax.Array, ids: jax.Array) -> jax.Array:
    """Per-example keys [B] from the run key and global example ids [B] (int32)."""
    return jax.vmap(lambda i: jax.random.fold_in(base_key, i))(ids)


def initial_noise(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x_T [B, *shape] (float32), one draw per example key."""
    return jax.vmap(
        lambda k: jax.random.normal(jax.random.fold_in(k, _X_T_STREAM), shape, jnp.float32)
    )(keys)


def step_noise(keys: jax.Array, index: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The noise [B, *shape] that step `index` of the chain draws for each example key."""
    return jax.vmap(
        lambda k: jax.random.normal(
            jax.random.fold_in(jax.random.fold_in(k, _STEP_STREAM), index), shape, jnp.float32
        )
    )(keys)


def sample_chain(
    diffusion,
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x_T: jax.Array,
    noise_fn: Callable[[jax.Array], jax.Array],
    *,
    use_ddim: bool = False,
    eta: float = 0.0,
    clip_denoised: bool = True,
    cond_fn: CondFn | None = None,
) -> jax.Array:
    """Runs the reverse chain from x_T to x_0 as one `lax.scan` (`gdiff.diffusion.chain`).

    Args:
      diffusion: a (possibly respaced) `GaussianDiffusion` (CONTRACT.md section 4).
      model_fn: model_fn(x [B,H,W,C], ts [B]) -> raw model output.
      x_T: [B, H, W, C] starting noise.
      noise_fn: noise_fn(step index, a scalar int32 from T-1 down to 0) -> [B, H, W, C], the noise
        that step draws (ancestral steps use it for t > 0; DDIM uses it when eta > 0).
      use_ddim, eta, clip_denoised: as the reference sampling script's flags.
      cond_fn: guidance gradient cond_fn(x, ts) or None.

    Returns:
      x_0 [B, H, W, C] (float32, in [-1, 1] when clip_denoised).
    """
    step = diffusion.sample_step(
        model_fn, use_ddim=use_ddim, eta=eta, clip_denoised=clip_denoised, cond_fn=cond_fn
    )
    x_0, _ = chain.scan_chain(step, x_T, diffusion.num_timesteps, noise_fn)
    return x_0


def dpm_solver_model_time(diffusion) -> Callable[[jax.Array], jax.Array]:
    """The network's timestep for the solver's model time t_input (float32 [B] -> [B]).

    The solver's reference hands the network t_input = (t - 1/N) * 1000: the chain step in units
    of a 1000-step chain (N is the clipped schedule's length; see `NoiseScheduleVP.model_time`).
    A network trained on T steps takes step indices 0..T-1, or t * 1000 / T with
    `rescale_timesteps`; so it is given t_input * T / 1000, and t_input itself when T = 1000 or
    timesteps are rescaled (exactly the reference's t_input, no arithmetic). A schedule the log-SNR
    clip shortens (cosine: N < T) keeps the reference's offset of a factor T / N, as at T = 1000.
    """
    steps = int(diffusion.num_timesteps)
    if diffusion.rescale_timesteps or steps == 1000:
        return lambda t_input: t_input
    # Product first: integral times stay exact (660 * 100 / 1000 = 66, where 660 * 0.1 is not).
    return lambda t_input: t_input * np.float32(steps) / np.float32(1000.0)


def check_solver_diffusion(diffusion) -> None:
    """The solver needs the full training chain of a noise- or x_0-predicting model.

    Raises:
      ValueError: a respaced chain (its betas are not the training schedule the solver's
        continuous time interpolates) or a model that predicts neither the noise nor x_0.
    """
    timestep_map = getattr(diffusion, "timestep_map", None)
    if timestep_map is not None and len(timestep_map) != diffusion.original_num_steps:
        raise ValueError(
            f"DPM-Solver solves on the full training chain, but the diffusion keeps "
            f"{len(timestep_map)} of its {diffusion.original_num_steps} steps; build it without "
            "timestep respacing"
        )
    solver_model_type(diffusion)


# The solver's `model_type` (`dpm_solver.dpm_solver_sample`) of each prediction a diffusion's
# model makes.
_SOLVER_MODEL_TYPES = {gd.ModelMeanType.EPSILON: "noise", gd.ModelMeanType.START_X: "x_start"}


def solver_model_type(diffusion) -> str:
    """ "noise" for a noise-predicting model, "x_start" for an x_0-predicting one
    (`diffusion.predict_xstart`): what the solver's model wrapper converts from.

    Raises:
      ValueError: a model that predicts the previous step's mean.
    """
    kind = _SOLVER_MODEL_TYPES.get(diffusion.model_mean_type)
    if kind is None:
        raise ValueError(
            f"DPM-Solver needs a model that predicts the noise or x_0; this diffusion's predicts "
            f"{diffusion.model_mean_type.name}"
        )
    return kind


def dpm_solver_chain(
    diffusion,
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x_T: jax.Array,
    solver: DpmSolverOptions,
    *,
    cond_fn: CondFn | None = None,
) -> jax.Array:
    """Solves the diffusion ODE from x_T with DPM-Solver(++) as one `lax.scan`
    (`gdiff.diffusion.dpm_solver.dpm_solver_sample`).

    Args:
      diffusion: the model's full training chain (`check_solver_diffusion`); its betas are the
        solver's schedule.
      model_fn: model_fn(x [B,H,W,C], ts [B]) -> raw model output (its first C channels the noise,
        or x_0 for an x_0-predicting model: the solver's model_type "x_start", converted to the
        noise (x - alpha_t x_0) / sigma_t as the reference's `model_wrapper` does).
      x_T: [B, H, W, C] starting noise.
      solver: the solver's settings.
      cond_fn: guidance gradient cond_fn(x, ts) or None; the solver guides the noise prediction
        as eps - sigma_t * cond_fn.

    Both networks see the solver's time through `dpm_solver_model_time`.

    Returns:
      x at t_end = 1/N [B, H, W, C] (float32, not clipped).
    """
    check_solver_diffusion(diffusion)
    model_type = solver_model_type(diffusion)
    to_model = dpm_solver_model_time(diffusion)
    solver_cond = None
    if cond_fn is not None:

        def solver_cond(x, t_input):
            return cond_fn(x, to_model(t_input))

    return dpm_solver.dpm_solver_sample(
        lambda x, t_input: model_fn(x, to_model(t_input)),
        x_T,
        betas=np.asarray(diffusion.betas, np.float64),
        steps=solver.steps,
        order=solver.order,
        algorithm_type=solver.algorithm_type,
        skip_type=solver.skip_type,
        method="multistep",
        lower_order_final=solver.lower_order_final,
        dynamic_thresholding=solver.thresholding,
        dynamic_thresholding_ratio=solver.thresholding_ratio,
        thresholding_max_val=solver.thresholding_max_val,
        cond_fn=solver_cond,
        model_type=model_type,
    )


def to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8 pixels exactly as the reference sampling scripts convert them
    (scale by 127.5, clamp, truncate toward zero)."""
    return jnp.clip((x + 1.0) * 127.5, 0.0, 255.0).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class DpmSolverOptions:
    """DPM-Solver's settings: the `sample.dpm_solver_*` keys (`dpm_solver.dpm_solver_sample`)."""

    steps: int  # model evaluations (NFE)
    order: int  # 1, 2 or 3 (multistep)
    algorithm_type: str  # dpmsolver++ | dpmsolver
    skip_type: str  # time_uniform | logSNR | time_quadratic
    lower_order_final: bool
    thresholding: bool  # dynamic thresholding of the x_0 prediction (dpmsolver++ only)
    thresholding_ratio: float
    thresholding_max_val: float

    def label(self) -> str:
        """The paper's short name, e.g. "DPM-Solver++(2M)", plus what differs from the usual."""
        name = "DPM-Solver++" if self.algorithm_type == "dpmsolver++" else "DPM-Solver"
        extras = [self.skip_type] if self.skip_type != "time_uniform" else []
        extras += ["thresholding"] if self.thresholding else []
        return " ".join([f"{name}({self.order}M)", *extras])


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """What a sampling run draws (the `config.sample` flags that shape the compiled program)."""

    image_shape: tuple[int, int, int]  # (H, W, C) of one sample
    use_ddim: bool = False
    eta: float = 0.0
    clip_denoised: bool = True  # ancestral and DDIM steps
    class_cond: bool = False  # pass the labels to the model as `y`
    float_output: bool = False  # return the float32 samples in [-1, 1] instead of uint8 pixels
    # Set: solve with DPM-Solver instead of the chain (use_ddim, eta, clip_denoised unused).
    dpm_solver: DpmSolverOptions | None = None
    # The model's null class (trained with model.class_dropout): rows may use classifier-free
    # guidance (batch `guide_kinds` == GUIDE_NULL_LABEL). None: the model has no null class.
    null_label: int | None = None
    # Whether the guide network (Sampler's `guide_apply`) takes the labels (autoguidance with a
    # conditional guide) or not (an unconditional guide: two-network guidance).
    guide_class_cond: bool = False
    # Rows carry guidance intervals (`sigma_lo`, `sigma_hi`): guidance only where the noise level
    # sigma lies in (sigma_lo, sigma_hi]. False: every step is guided (no per-step test at all).
    intervals: bool = False

    def __post_init__(self):
        if self.use_ddim and self.dpm_solver is not None:
            raise ValueError("use_ddim and dpm_solver name two samplers; set one")

    @property
    def sampler(self) -> str:
        """ancestral | ddim | dpm_solver."""
        if self.dpm_solver is not None:
            return "dpm_solver"
        return "ddim" if self.use_ddim else "ancestral"


class Sampler:
    """A guided sampler compiled once and mapped data-parallel over a device mesh.

    `sampler(model_vars, classifier_vars, batch, guide_vars=...)` samples one global batch.
    `batch` holds global arrays sharded on the leading (row) axis (see `make_batch`):
      ids     int32 [R]        global example id of each row (its noise stream)
      labels  int32 [R]        target class (model `y` when class-conditional, guidance target)
      scales  float32 [R]      classifier-guidance scale of each row (a sweep repeats ids)
      low_res float32 [R,h,w,C] (super-resolution only) the low-resolution input in [-1, 1]
    with output guidance (`options.null_label` or a `guide_apply`; gdiff/diffusion/guidance.py):
      guide_kinds  int32 [R]   GUIDE_NONE, GUIDE_NULL_LABEL (classifier-free) or GUIDE_NETWORK
      guide_scales float32 [R] w: u + w (c - u); 1 is the conditional prediction alone
    and with `options.intervals`:
      sigma_lo, sigma_hi float32 [R]  guidance (of every kind) only where sigma in (lo, hi]
    and it returns uint8 images [R, H, W, C], sharded the same way. Rows of every kind, weight
    and interval share one compiled program; classifier guidance on top of output guidance is a
    row with both a classifier scale and a guide weight.
    """

    def __init__(
        self,
        diffusion,
        model_apply: Callable[..., jax.Array],
        options: SamplerOptions,
        *,
        guidance: Guidance | None = None,
        guide_apply: Callable[..., jax.Array] | None = None,
        mesh: jax.sharding.Mesh | None = None,
        seed: int = 0,
    ):
        """Args:
        diffusion: the (respaced) diffusion to sample from; with `options.dpm_solver`, the
          model's full training chain (`check_solver_diffusion`).
        model_apply: model_apply(variables, x, ts, **kwargs) -> raw output; kwargs are `y`
          (when options.class_cond) and `low_res` (when the batch has it), e.g. `module.apply`.
        options: see SamplerOptions.
        guidance: the guidance hook (see `classifier_guidance`), or None for unguided sampling.
        guide_apply: the guide network of two-network guidance and autoguidance, called as
          model_apply (with `y` when options.guide_class_cond), or None.
        mesh: the device mesh (default: every device of every host).
        seed: the run seed; example i's noise comes from fold_in(key(seed), i).
        """
        self.diffusion = diffusion
        self.model_apply = model_apply
        self.options = options
        self.guidance = guidance
        self.guide_apply = guide_apply
        self.mesh = mesh if mesh is not None else distributed.data_mesh()
        self.seed = seed
        if options.dpm_solver is not None:
            check_solver_diffusion(diffusion)
        self._noise_level = guidance_lib.noise_level_fn(diffusion)
        self._base_key = self._key_data(seed)
        rows = distributed.batch_sharding(self.mesh)
        rep = distributed.replicated(self.mesh)
        self._jitted = jax.jit(
            self._sample,
            in_shardings=(rep, rep, rep, rows, rep),
            out_shardings=rows,
            compiler_options=xla_options.compiler_options(),
        )

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def _key_data(self, seed: int) -> jax.Array:
        key = jax.random.key_data(jax.random.key(seed))
        return jax.device_put(key, distributed.replicated(self.mesh))

    def _guided_fns(self, model_vars, classifier_vars, guide_vars, batch):
        """(model_fn, cond_fn) of a batch: the conditional network with the rows' output
        guidance, and the classifier's gradient, each only inside the rows' intervals."""
        opts = self.options
        extra = {"low_res": batch["low_res"]} if "low_res" in batch else {}
        labels = {"y": batch["labels"]} if opts.class_cond else {}

        def model_fn(x, ts):
            return self.model_apply(model_vars, x, ts, **labels, **extra)

        active = None
        if opts.intervals:

            def active(ts):
                sigma = self._noise_level(ts)
                return guidance_lib.in_interval(sigma, batch["sigma_lo"], batch["sigma_hi"])

        guides = {}
        if opts.null_label is not None:
            null = {"y": jnp.full_like(batch["labels"], opts.null_label)}
            guides[guidance_lib.GUIDE_NULL_LABEL] = lambda x, ts: self.model_apply(
                model_vars, x, ts, **null, **extra
            )
        if self.guide_apply is not None:
            guide_labels = labels if opts.guide_class_cond else {}
            guides[guidance_lib.GUIDE_NETWORK] = lambda x, ts: self.guide_apply(
                guide_vars, x, ts, **guide_labels, **extra
            )
        if guides:
            channels = opts.image_shape[-1]
            model_fn = guidance_lib.guided_model_fn(model_fn, guides, batch, active, channels)
        cond_fn = None
        if self.guidance is not None:
            cond_fn = self.guidance(classifier_vars, batch["labels"], batch["scales"])
            if active is not None:
                cond_fn = guidance_lib.IntervalCondFn(cond_fn, active, batch["scales"])
        return model_fn, cond_fn

    def _sample(self, model_vars, classifier_vars, key_data, batch, guide_vars):
        opts = self.options
        base_key = jax.random.wrap_key_data(key_data)
        keys = example_keys(base_key, batch["ids"])
        x_T = initial_noise(keys, opts.image_shape)
        model_fn, cond_fn = self._guided_fns(model_vars, classifier_vars, guide_vars, batch)
        if opts.dpm_solver is not None:
            x_0 = dpm_solver_chain(self.diffusion, model_fn, x_T, opts.dpm_solver, cond_fn=cond_fn)
            return x_0 if opts.float_output else to_uint8(x_0)
        x_0 = sample_chain(
            self.diffusion,
            model_fn,
            x_T,
            lambda index: step_noise(keys, index, opts.image_shape),
            use_ddim=opts.use_ddim,
            eta=opts.eta,
            clip_denoised=opts.clip_denoised,
            cond_fn=cond_fn,
        )
        return x_0 if opts.float_output else to_uint8(x_0)

    def put_params(self, tree: Any) -> Any:
        """Replicates parameters over the mesh once, so each call does not re-transfer them."""
        return jax.device_put(tree, distributed.replicated(self.mesh))

    def make_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows (numpy) -> global arrays sharded on the row axis."""
        return distributed.global_batch(dict(local), self.mesh)

    def _check_rows(self, batch: Mapping[str, jax.Array]) -> None:
        """The per-row arrays this program reads are in the batch."""
        need = ["ids", "labels", "scales"]
        if self.options.null_label is not None or self.guide_apply is not None:
            need += ["guide_kinds", "guide_scales"]
        if self.options.intervals:
            need += ["sigma_lo", "sigma_hi"]
        missing = [k for k in need if k not in batch]
        if missing:
            raise ValueError(f"the sampling batch lacks {', '.join(missing)} (per-row arrays [R])")

    def __call__(
        self,
        model_vars,
        classifier_vars,
        batch: Mapping[str, jax.Array],
        *,
        seed=None,
        guide_vars=None,
    ) -> jax.Array:
        """Samples one global batch; returns uint8 [R, H, W, C] sharded over the mesh.

        `seed` overrides the constructor's seed for this call (same compiled program);
        `guide_vars` are the guide network's variables (with a `guide_apply`).
        """
        rows = int(batch["ids"].shape[0])
        distributed.check_batch_divisible(rows, what="sampling rows per batch", mesh=self.mesh)
        self._check_rows(batch)
        key = self._base_key if seed is None else self._key_data(seed)
        return self._jitted(model_vars, classifier_vars, key, dict(batch), guide_vars)

    def lower(self, model_vars, classifier_vars, batch, guide_vars=None):
        """The lowered program (for inspection: one scan, no host callbacks)."""
        return self._jitted.lower(
            model_vars, classifier_vars, self._base_key, dict(batch), guide_vars
        )

    def export(self, model_vars, classifier_vars, batch, *, platforms, disabled_checks=()):
        """The program serialised by `jax.export` for `platforms` (e.g. ("cuda",)), from any
        backend; arguments may be abstract (`jax.ShapeDtypeStruct`s with shardings).
        `disabled_checks`: `jax.export.DisabledSafetyCheck`s, e.g. for cuDNN's custom calls,
        which carry no compatibility guarantee."""
        exporter = jax.export.export(
            self._jitted, platforms=platforms, disabled_checks=disabled_checks
        )
        return exporter(model_vars, classifier_vars, self._base_key, dict(batch), None)


# The config groups a sampling program is built from (`build_sampler`).
GROUPS = ("model", "diffusion", "classifier", "sample")


def config_groups(config) -> dict[str, Any]:
    """A full config's groups that `build_sampler` reads."""
    return {name: config[name] for name in GROUPS}


SAMPLERS = ("auto", "ancestral", "ddim", "dpm_solver")


def sampler_kind(sample: Mapping[str, Any], diffusion: Mapping[str, Any]) -> str:
    """The sampler a `sample` group asks for: "ancestral", "ddim" or "dpm_solver", checked.

    `sample.sampler` names it; "auto" keeps the reference's switch, `sample.use_ddim` (its
    --use_ddim flag) picking DDIM, else ancestral steps. `use_ddim=True` with an explicit
    ancestral or dpm_solver is a contradiction. The solver takes noise- and x_0-predicting
    models (`diffusion.predict_xstart`; `solver_model_type`).

    Raises:
      errors.ConfigError: in one line, naming the key.
    """
    name = str(sample["sampler"])
    if name not in SAMPLERS:
        raise errors.ConfigError(
            f"sample.sampler={name!r} is not a sampler; use one of {', '.join(SAMPLERS)}"
        )
    if bool(sample["use_ddim"]) and name not in ("auto", "ddim"):
        raise errors.ConfigError(
            f"sample.use_ddim=True (the reference's --use_ddim) contradicts sample.sampler="
            f"{name!r}: set sample.use_ddim=False, or sample.sampler=ddim"
        )
    del diffusion  # every sampler takes every prediction the chain's models make
    if name == "auto":
        name = "ddim" if bool(sample["use_ddim"]) else "ancestral"
    return name


def dpm_solver_options(sample: Mapping[str, Any]) -> DpmSolverOptions:
    """The `sample.dpm_solver_*` keys as `DpmSolverOptions`, checked.

    Raises:
      errors.ConfigError: in one line, naming the key.
    """
    opts = DpmSolverOptions(
        steps=int(sample["dpm_solver_steps"]),
        order=int(sample["dpm_solver_order"]),
        algorithm_type=str(sample["dpm_solver_algorithm_type"]),
        skip_type=str(sample["dpm_solver_skip_type"]),
        lower_order_final=bool(sample["dpm_solver_lower_order_final"]),
        thresholding=bool(sample["dpm_solver_thresholding"]),
        thresholding_ratio=float(sample["dpm_solver_thresholding_ratio"]),
        thresholding_max_val=float(sample["dpm_solver_thresholding_max_val"]),
    )
    choices = (
        ("order", opts.order, dpm_solver.ORDERS),
        ("algorithm_type", opts.algorithm_type, dpm_solver.ALGORITHM_TYPES),
        ("skip_type", opts.skip_type, dpm_solver.SKIP_TYPES),
    )
    for key, value, allowed in choices:
        if value not in allowed:
            raise errors.ConfigError(
                f"sample.dpm_solver_{key}={value!r} is not supported; use one of "
                f"{', '.join(map(str, allowed))}"
            )
    if opts.steps < opts.order:
        raise errors.ConfigError(
            f"sample.dpm_solver_steps={opts.steps} is fewer than sample.dpm_solver_order="
            f"{opts.order}: a multistep solver of order k takes at least k steps"
        )
    if opts.thresholding and opts.algorithm_type != "dpmsolver++":
        raise errors.ConfigError(
            "sample.dpm_solver_thresholding=True thresholds the x_0 prediction, which only "
            "sample.dpm_solver_algorithm_type='dpmsolver++' makes"
        )
    if not 0.0 < opts.thresholding_ratio <= 1.0:
        raise errors.ConfigError(
            f"sample.dpm_solver_thresholding_ratio={opts.thresholding_ratio} must be in (0, 1]: "
            "the quantile of |x_0| that sets the threshold"
        )
    if not opts.thresholding_max_val > 0.0:
        raise errors.ConfigError(
            f"sample.dpm_solver_thresholding_max_val={opts.thresholding_max_val} must be positive"
        )
    return opts


def respacing(sample: Mapping[str, Any], diffusion: Mapping[str, Any]) -> str:
    """The timestep respacing sampling uses: `sample.timestep_respacing` when set, else the
    diffusion's own ("" = every training step); always "" for DPM-Solver, which solves on the full
    training chain in `sample.dpm_solver_steps` steps and ignores both."""
    if sampler_kind(sample, diffusion) == "dpm_solver":
        return ""
    return str(sample["timestep_respacing"] or diffusion["timestep_respacing"])


def nfe(sample: Mapping[str, Any], diffusion: Mapping[str, Any]) -> int:
    """Network evaluations per sample (each also a classifier gradient when guided): the chain's
    steps for ancestral and DDIM sampling, `dpm_solver_steps` for the solver."""
    if sampler_kind(sample, diffusion) == "dpm_solver":
        return dpm_solver_options(sample).steps
    steps, spacing = int(diffusion["steps"]), respacing(sample, diffusion)
    return len(schedules.space_timesteps(steps, spacing)) if spacing else steps


def sampler_label(sample: Mapping[str, Any], diffusion: Mapping[str, Any]) -> str:
    """A short name of the sampler, for a table row: "ancestral", "DDIM" (with its eta when not
    0), "DPM-Solver++(2M)" (`DpmSolverOptions.label`)."""
    kind = sampler_kind(sample, diffusion)
    if kind == "dpm_solver":
        return dpm_solver_options(sample).label()
    if kind == "ddim":
        eta = float(sample["eta"])
        return "DDIM" if eta == 0 else f"DDIM(eta={eta:g})"
    return "ancestral"


def describe(sample: Mapping[str, Any], diffusion: Mapping[str, Any]) -> str:
    """How a `sample` group samples, in words (a report's "sampling" line)."""
    kind, steps = sampler_kind(sample, diffusion), nfe(sample, diffusion)
    if kind == "dpm_solver":
        o = dpm_solver_options(sample)
        text = f"{o.label()} ({o.algorithm_type}, order {o.order}, {o.skip_type}"
        text += ", lower_order_final" if o.lower_order_final else ""
        if o.thresholding:
            text += f", thresholding ratio {o.thresholding_ratio:g} max {o.thresholding_max_val:g}"
        return f"{text}), {steps} steps (NFE {steps}) on the {diffusion['steps']}-step chain"
    spacing = respacing(sample, diffusion) or "none"
    return f"{sampler_label(sample, diffusion)}, {steps} steps (respacing {spacing})"


def sampler_settings(sample: Mapping[str, Any], diffusion: Mapping[str, Any]) -> dict[str, Any]:
    """The `sample` settings that shape the sampling program, as a run's manifest pins them.

    Ancestral and DDIM runs keep the keys of earlier versions (use_ddim, eta, clip_denoised,
    timestep_respacing), so their runs on disk still resume; a solver run pins `sampler` and every
    `dpm_solver_*` setting instead of the chain's (which it does not read)."""
    kind = sampler_kind(sample, diffusion)
    if kind != "dpm_solver":
        return {
            "use_ddim": kind == "ddim",
            "eta": float(sample["eta"]),
            "clip_denoised": bool(sample["clip_denoised"]),
            "timestep_respacing": respacing(sample, diffusion),
        }
    return {
        "sampler": kind,
        "use_ddim": False,
        "eta": None,
        "clip_denoised": None,
        "timestep_respacing": "",
        "dpm_solver": dataclasses.asdict(dpm_solver_options(sample)),
    }


def _rows(sample: Mapping[str, Any]) -> tuple:
    """The rows of a `sample` group; a group without classifier scales (the plain groups of a
    released model's flags, which no scale belongs to) has classifier rows at scale 0 (the
    classifier itself is `build_sampler`'s `guided`)."""
    if "classifier_scale" not in sample:
        sample = {**dict(sample), "classifier_scale": "0"}
    return guidance_rows.parse_rows(sample)


def null_label(groups: Mapping[str, Mapping[str, Any]]) -> int | None:
    """The model's null label when a row is classifier-free (`sample.guidance` cfg), else None.

    Raises:
      errors.ConfigError: cfg rows on a model without a null class (trained without
        `model.class_dropout`).
    """
    return _null_label(_rows(groups["sample"]), groups["model"])


def _null_label(rows, m: Mapping[str, Any]) -> int | None:
    if not guidance_rows.uses(rows, guidance_lib.GUIDE_NULL_LABEL):
        return None
    null = factory.null_label(m)
    if null is None:
        raise errors.ConfigError(
            "sample.guidance=cfg guides with the model's null label, but this model has none: "
            "train it with model.class_dropout > 0 (e.g. 0.1), and set the same "
            "model.class_dropout here"
        )
    return null


def _guidance_options(rows, m: Mapping[str, Any], guide: Mapping[str, Any] | None) -> dict:
    """The `SamplerOptions` of the rows' output guidance, checked.

    Args:
      rows: the run's guidance rows (`_rows`).
      m: the model group.
      guide: the guide network's `model` group (two_network / autoguidance rows), or None.

    Raises:
      errors.ConfigError: cfg rows on a model without a null class, or a guide that predicts
        other outputs than the model.
      ValueError: guide-network rows without a guide group (the sampling plan refuses a missing
        sample.guide_checkpoint before this: a caller's error).
    """
    needs_guide = guidance_rows.uses(rows, guidance_lib.GUIDE_NETWORK)
    if needs_guide and guide is None:
        raise ValueError("rows guide with a second network: build_sampler needs its `guide` group")
    if needs_guide and bool(guide["learn_sigma"]) != bool(m["learn_sigma"]):
        raise errors.ConfigError(
            f"the guide network has learn_sigma={guide['learn_sigma']} but the model "
            f"{m['learn_sigma']}: both must predict the same outputs to be combined"
        )
    return {
        "null_label": _null_label(rows, m),
        "guide_class_cond": bool(needs_guide and guide["class_cond"]),
        "intervals": any(not r.every_step for r in rows),
    }


def build_sampler(
    groups: Mapping[str, Mapping[str, Any]],
    *,
    guided: bool,
    guide: Mapping[str, Any] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    platform: str | None = None,
    float_output: bool = False,
) -> tuple[Sampler, Any, Any]:
    """The sampling program of a config's groups: networks, diffusion and the compiled sampler.

    Args:
      groups: the `model`, `diffusion`, `classifier` and `sample` groups (configs/common.py keys;
        an ml_collections config's groups or plain dicts, e.g. `gdiff.compat.released
        .sampling_groups`). `sample.sampler` picks the sampler (`sampler_kind`);
        `sample.timestep_respacing`, when set, overrides the diffusion's for ancestral and DDIM
        steps; DPM-Solver solves on the full training chain in `sample.dpm_solver_steps` steps.
      guided: build the classifier and its guidance (some scale of the run is non-zero).
      guide: the guide network's `model` group, when a row guides with a second network
        (`sample.guidance` two_network / autoguidance); its parameters go to each call as
        `guide_vars`. The rows' other guidance (cfg, intervals) is read from `sample`.
      mesh: the device mesh (default: every device).
      platform: what "auto" attention resolves for (`gdiff.factory.resolve_attention_impl`;
        None: the running backend).
      float_output: return float32 samples (in [-1, 1] for the chain; the solver's x at t_end,
        not clipped) instead of uint8 pixels.

    Returns:
      (sampler, model, classifier or None). Parameters are not loaded: pass them per call.
    """
    m, s = groups["model"], groups["sample"]
    kind = sampler_kind(s, groups["diffusion"])
    # Sampling never differentiates the model, so its training-memory setting `remat` changes
    # nothing here (tests/test_remat.py): one sampling program, one module.
    model = factory.unet_from_group({**m, "remat": "none"}, platform=platform)
    diffusion = factory.diffusion_from_group(
        groups["diffusion"],
        learn_sigma=bool(m["learn_sigma"]),
        timestep_respacing=respacing(s, groups["diffusion"]),
    )
    size = int(m["image_size"])
    classifier, guidance = None, None
    if guided:
        classifier = factory.classifier_from_group(groups["classifier"], size, platform=platform)
        guidance = classifier_guidance(classifier)
    rows = _rows(s)
    output_guidance = _guidance_options(rows, m, guide)
    guide_apply = None
    if guide is not None and guidance_rows.uses(rows, guidance_lib.GUIDE_NETWORK):
        guide_apply = factory.unet_from_group({**guide, "remat": "none"}, platform=platform).apply
    options = SamplerOptions(
        image_shape=(size, size, 3),
        use_ddim=kind == "ddim",
        eta=float(s["eta"]),
        clip_denoised=bool(s["clip_denoised"]),
        class_cond=bool(m["class_cond"]),
        float_output=float_output,
        dpm_solver=dpm_solver_options(s) if kind == "dpm_solver" else None,
        **output_guidance,
    )
    sampler = Sampler(
        diffusion,
        model.apply,
        options,
        guidance=guidance,
        guide_apply=guide_apply,
        mesh=mesh,
        seed=int(s["seed"]),
    )
    return sampler, model, classifier


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a row-sharded global array, in global row order (numpy)."""
    if array.is_fully_addressable:
        return np.asarray(array)
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, parts = set(), []
    for shard in shards:
        start = shard.index[0].start or 0
        if start in seen:  # replicas of the same rows on several local devices
            continue
        seen.add(start)
        parts.append(np.asarray(shard.data))
    return np.concatenate(parts, axis=0)
