"""The compiled, device-mapped guided sampler.

One call samples one global batch: the whole reverse chain is a single `jax.lax.scan` inside one
`jax.jit`, data-parallel over a one-axis device mesh (`gdiff.distributed.data_mesh()`, batch axis
sharded with `NamedSharding`), so nothing returns to the host between steps. Classifier guidance is
`jax.grad` of the classifier's log-softmax at the target labels, evaluated inside the scanned step
(`condition_mean` for ancestral steps, `condition_score` for DDIM; the diffusion core pairs them).

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

from gdiff import distributed, factory, xla_options
from gdiff.diffusion import chain
from gdiff.diffusion import guidance as guidance_lib

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


def to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8 pixels exactly as the reference sampling scripts convert them
    (scale by 127.5, clamp, truncate toward zero)."""
    return jnp.clip((x + 1.0) * 127.5, 0.0, 255.0).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """What a sampling run draws (the `config.sample` flags that shape the compiled program)."""

    image_shape: tuple[int, int, int]  # (H, W, C) of one sample
    use_ddim: bool = False
    eta: float = 0.0
    clip_denoised: bool = True
    class_cond: bool = False  # pass the labels to the model as `y`
    float_output: bool = False  # return the float32 samples in [-1, 1] instead of uint8 pixels


class Sampler:
    """A guided sampler compiled once and mapped data-parallel over a device mesh.

    `sampler(model_vars, classifier_vars, batch)` samples one global batch. `batch` holds global
    arrays sharded on the leading (row) axis (see `make_batch`):
      ids     int32 [R]        global example id of each row (its noise stream)
      labels  int32 [R]        target class (model `y` when class-conditional, guidance target)
      scales  float32 [R]      guidance scale of each row (a sweep repeats ids across scales)
      low_res float32 [R,h,w,C] (super-resolution only) the low-resolution input in [-1, 1]
    and it returns uint8 images [R, H, W, C], sharded the same way.
    """

    def __init__(
        self,
        diffusion,
        model_apply: Callable[..., jax.Array],
        options: SamplerOptions,
        *,
        guidance: Guidance | None = None,
        mesh: jax.sharding.Mesh | None = None,
        seed: int = 0,
    ):
        """Args:
        diffusion: the (respaced) diffusion to sample from.
        model_apply: model_apply(variables, x, ts, **kwargs) -> raw output; kwargs are `y`
          (when options.class_cond) and `low_res` (when the batch has it), e.g. `module.apply`.
        options: see SamplerOptions.
        guidance: the guidance hook (see `classifier_guidance`), or None for unguided sampling.
        mesh: the device mesh (default: every device of every host).
        seed: the run seed; example i's noise comes from fold_in(key(seed), i).
        """
        self.diffusion = diffusion
        self.model_apply = model_apply
        self.options = options
        self.guidance = guidance
        self.mesh = mesh if mesh is not None else distributed.data_mesh()
        self.seed = seed
        self._base_key = self._key_data(seed)
        rows = distributed.batch_sharding(self.mesh)
        rep = distributed.replicated(self.mesh)
        self._jitted = jax.jit(
            self._sample,
            in_shardings=(rep, rep, rep, rows),
            out_shardings=rows,
            compiler_options=xla_options.compiler_options(),
        )

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def _key_data(self, seed: int) -> jax.Array:
        key = jax.random.key_data(jax.random.key(seed))
        return jax.device_put(key, distributed.replicated(self.mesh))

    def _sample(self, model_vars, classifier_vars, key_data, batch):
        opts = self.options
        base_key = jax.random.wrap_key_data(key_data)
        keys = example_keys(base_key, batch["ids"])
        x_T = initial_noise(keys, opts.image_shape)
        kwargs = {}
        if opts.class_cond:
            kwargs["y"] = batch["labels"]
        if "low_res" in batch:
            kwargs["low_res"] = batch["low_res"]

        def model_fn(x, ts):
            return self.model_apply(model_vars, x, ts, **kwargs)

        cond_fn = None
        if self.guidance is not None:
            cond_fn = self.guidance(classifier_vars, batch["labels"], batch["scales"])
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

    def __call__(
        self, model_vars, classifier_vars, batch: Mapping[str, jax.Array], *, seed=None
    ) -> jax.Array:
        """Samples one global batch; returns uint8 [R, H, W, C] sharded over the mesh.

        `seed` overrides the constructor's seed for this call (same compiled program).
        """
        rows = int(batch["ids"].shape[0])
        distributed.check_batch_divisible(rows, what="sampling rows per batch", mesh=self.mesh)
        key = self._base_key if seed is None else self._key_data(seed)
        return self._jitted(model_vars, classifier_vars, key, dict(batch))

    def lower(self, model_vars, classifier_vars, batch):
        """The lowered program (for inspection: one scan, no host callbacks)."""
        return self._jitted.lower(model_vars, classifier_vars, self._base_key, dict(batch))

    def export(self, model_vars, classifier_vars, batch, *, platforms, disabled_checks=()):
        """The program serialised by `jax.export` for `platforms` (e.g. ("cuda",)), from any
        backend; arguments may be abstract (`jax.ShapeDtypeStruct`s with shardings).
        `disabled_checks`: `jax.export.DisabledSafetyCheck`s, e.g. for cuDNN's custom calls,
        which carry no compatibility guarantee."""
        exporter = jax.export.export(
            self._jitted, platforms=platforms, disabled_checks=disabled_checks
        )
        return exporter(model_vars, classifier_vars, self._base_key, dict(batch))


# The config groups a sampling program is built from (`build_sampler`).
GROUPS = ("model", "diffusion", "classifier", "sample")


def config_groups(config) -> dict[str, Any]:
    """A full config's groups that `build_sampler` reads."""
    return {name: config[name] for name in GROUPS}


def respacing(sample: Mapping[str, Any], diffusion: Mapping[str, Any]) -> str:
    """The timestep respacing sampling uses: `sample.timestep_respacing` when set, else the
    diffusion's own ("" = every training step)."""
    return str(sample["timestep_respacing"] or diffusion["timestep_respacing"])


def build_sampler(
    groups: Mapping[str, Mapping[str, Any]],
    *,
    guided: bool,
    mesh: jax.sharding.Mesh | None = None,
    platform: str | None = None,
) -> tuple[Sampler, Any, Any]:
    """The sampling program of a config's groups: networks, diffusion and the compiled sampler.

    Args:
      groups: the `model`, `diffusion`, `classifier` and `sample` groups (configs/common.py keys;
        an ml_collections config's groups or plain dicts, e.g. `gdiff.compat.released
        .sampling_groups`). `sample.timestep_respacing`, when set, overrides the diffusion's.
      guided: build the classifier and its guidance (some scale of the run is non-zero).
      mesh: the device mesh (default: every device).
      platform: what "auto" attention resolves for (`gdiff.factory.resolve_attention_impl`;
        None: the running backend).

    Returns:
      (sampler, model, classifier or None). Parameters are not loaded: pass them per call.
    """
    m, s = groups["model"], groups["sample"]
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
    options = SamplerOptions(
        image_shape=(size, size, 3),
        use_ddim=bool(s["use_ddim"]),
        eta=float(s["eta"]),
        clip_denoised=bool(s["clip_denoised"]),
        class_cond=bool(m["class_cond"]),
    )
    sampler = Sampler(
        diffusion, model.apply, options, guidance=guidance, mesh=mesh, seed=int(s["seed"])
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
