"""Training steps at reference parity (training_step.npz and training_run/, ../shared/parity).

The reference's TrainLoop, super_res_train.py and classifier_train.py took these steps with
recorded timesteps and noise; gdiff's own step functions (the trainers' jitted `train_step` and
the gradient function it is made of) replay them from the same starting weights. Every network,
diffusion and optimiser setting comes from the file's config_json, so a differently configured
file of the same layout is checked the same way. Tolerances (README): losses and logits 1e-5
relative, gradients and parameters after AdamW steps 1e-4 relative L2 per tensor.

Gradients that are zero in exact arithmetic come out as float32 round-off in both frameworks,
and Adam normalises that noise into updates of up to ~lr per step, different in each framework,
on parameters that do not change the network's function. The rule that tells them apart follows
from the mathematics, at two levels:
- a whole tensor: where a GroupNorm has one channel per group (32-channel levels), a per-channel
  constant added before it is removed exactly, so the gradient of everything that only adds one
  (the conv bias before it, without scale-shift norm the timestep-embedding projection and the
  time-embedding MLP feeding it) is exactly zero. Its reference gradient is then round-off of the
  WHOLE gradient's scale (measured on training_step.npz: 6e-9 to 2e-8 of the largest element,
  while the smallest real tensor reaches 4e-3), so a tensor below TENSOR_FLOOR of the whole
  gradient's largest element is structurally zero: gdiff's must be too (below TENSOR_FLOOR of its
  own scale), and after n AdamW steps its parameters may differ from the reference's by at most
  the sum of the n learning rates on each side.
- single elements: the key part of an attention block's qkv bias (softmax ignores a constant
  added to every key) is zero while the rest of its layer is not; elements below NOISE_FLOOR of
  their layer's largest element are held to the same bound.
Every other element of every tensor is compared at the README's tolerance.
`test_the_rule_holds_where_groupnorm_has_one_channel_per_group` shows the rule on such a network.
"""

import json

import jax
import numpy as np
import pytest
from conftest import fixture_path, load_fixture, nchw_to_nhwc, perturbed, rel_l2

from configs import common
from gdiff import factory
from gdiff.checkpoints import locate
from gdiff.compat import convert, openai, reference_run
from gdiff.diffusion import timestep_sampler
from gdiff.models import layers
from gdiff.train import classifier_trainer, diffusion_trainer, optim
from gdiff.train import state as state_lib

LOSS_TOL = 1e-5
TENSOR_TOL = 1e-4
# Round-off of an exact zero, relative to the largest gradient element of the same layer: ~1e-7
# to 2e-6 here, while true gradient elements of those layers start near 6e-5.
NOISE_FLOOR = 1e-5
# A structurally zero tensor, relative to the whole gradient's largest element (see the docstring).
TENSOR_FLOOR = 1e-6


@pytest.fixture(scope="module")
def golden():
    z = load_fixture("training_step.npz")
    return z, json.loads(str(z["config_json"]))


def _prefixed(z, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: z[k] for k in z.files if k.startswith(prefix)}


def _config(cfg: dict, which: str):
    """A gdiff config holding what the trainers read besides the modules they are given: batch,
    optimiser settings, the super-resolution small size."""
    config = common.get_config()
    opt = cfg["optimizer"]
    if which == "classifier":
        config.optim.lr = opt["clf_lr"]
        config.optim.weight_decay = opt["clf_weight_decay"]
        # classifier_train.py --anneal_lr, over its iterations (the README's runs anneal).
        config.optim.anneal_lr = bool(opt.get("clf_anneal_lr", True))
        config.train.classifier_num_steps = opt["clf_iterations"]
        config.train.classifier_batch_size = cfg["batch"]
        return config
    config.optim.lr = opt["lr"]
    config.optim.weight_decay = opt["weight_decay"]
    # The TrainLoop anneals over lr_anneal_steps, which is also the run's length.
    config.optim.anneal_lr = opt["lr_anneal_steps"] > 0
    config.train.num_steps = opt["lr_anneal_steps"] or opt["steps"]
    config.train.batch_size = cfg["batch"]
    config.train.ema_rates = str(opt["ema_rate"])
    if which == "super_res":
        config.model.small_size = int(cfg["sr_create_model"]["small_size"])
    return config


def _parts(cfg: dict, which: str):
    """(config, network, diffusion, uniform sampler), built from config_json."""
    config = _config(cfg, which)
    if which == "unet":
        net = openai.create_model(**cfg["create_model"])
    elif which == "super_res":
        net = openai.sr_create_model(**cfg["sr_create_model"])
    else:
        net = openai.create_classifier(**cfg["create_classifier"])
    diffusion = openai.create_gaussian_diffusion(**cfg["create_gaussian_diffusion"])
    sampler = timestep_sampler.create_named_schedule_sampler("uniform", diffusion)
    return config, net, diffusion, sampler


def _labels(z, key: str):
    """The batch's labels (zeros for an unconditional model, which ignores them)."""
    return z[key] if key in z.files else np.zeros(z["x_start"].shape[0], np.int64)


def _start(z, net, prefix: str, config, ema_rates):
    params = convert.convert_state_dict(net, _prefixed(z, f"{prefix}/param/"))["params"]
    tx = optim.create_optimizer(config.optim)
    return state_lib.create(params, tx, rng=jax.random.key(0), ema_rates=ema_rates)


def _batch(images, labels, t, noise) -> dict:
    return {"image": nchw_to_nhwc(images), "label": labels, "t": t, "noise": nchw_to_nhwc(noise)}


def _module_max(grads: dict) -> dict[str, float]:
    """Per tensor, the largest gradient element of its layer (weight and bias together)."""
    top: dict[str, float] = {}
    for name, g in grads.items():
        layer = name.rsplit(".", 1)[0]
        top[layer] = max(top.get(layer, 0.0), float(np.abs(g).max()))
    return {name: top[name.rsplit(".", 1)[0]] for name in grads}


def _scale(grads: dict) -> float:
    """The whole gradient's largest element."""
    return max(float(np.abs(g).max()) for g in grads.values())


def _noise_masks(grads: dict) -> dict[str, np.ndarray]:
    """Per tensor, True where the reference's gradient is a real one: False on the whole of a
    structurally zero tensor and on the round-off elements of a layer (module docstring)."""
    top, scale = _module_max(grads), _scale(grads)
    return {
        k: np.abs(g) >= NOISE_FLOOR * top[k]
        if np.abs(g).max() >= TENSOR_FLOOR * scale
        else np.zeros(g.shape, bool)
        for k, g in grads.items()
    }


def _check_gradients(got: dict, want: dict) -> float:
    """Per tensor rel L2 <= TENSOR_TOL; a structurally zero tensor must be one in gdiff too."""
    assert sorted(got) == sorted(want)
    masks, top = _noise_masks(want), _module_max(want)
    want_scale, got_scale = _scale(want), _scale(got)
    worst = 0.0
    for name, w in want.items():
        if np.abs(w).max() < TENSOR_FLOOR * want_scale:  # structurally zero: in gdiff too
            assert np.abs(got[name]).max() < TENSOR_FLOOR * got_scale, name
            continue
        if not masks[name].any():  # every element round-off of its layer: so in gdiff
            assert np.abs(got[name]).max() < 10 * NOISE_FLOOR * top[name], name
            continue
        err = rel_l2(got[name], w)
        assert err <= TENSOR_TOL, (name, err)
        worst = max(worst, err)
    return worst


def _check_tensors(got: dict, want: dict, masks: dict, bound: float) -> float:
    """Per tensor rel L2 over the elements with a real gradient <= TENSOR_TOL; the others (see
    the module docstring) within `bound` (the sum of the learning rates) absolutely."""
    worst = 0.0
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        m, g = masks[name], np.asarray(got[name])
        if m.any():
            err = rel_l2(g[m], w[m])
            assert err <= TENSOR_TOL, (name, err)
            worst = max(worst, err)
        if (~m).any():
            assert np.abs(g[~m] - w[~m]).max() <= bound, name
    return worst


def _check_step_terms(terms: dict, z, prefix: str) -> float:
    worst = 0.0
    for key in ("loss", "mse", "vb"):
        if f"{prefix}/terms/{key}" in z.files:
            err = rel_l2(terms[key], z[f"{prefix}/terms/{key}"])
            assert err <= LOSS_TOL, (prefix, key, err)
            worst = max(worst, err)
    return worst


def test_unet_step0_losses_and_gradients(golden):
    """Per-example hybrid loss terms and the step-0 gradient (vb stops its gradient into the
    mean), through the diffusion trainer's gradient function."""
    z, cfg = golden
    config, model, diffusion, sampler = _parts(cfg, "unet")
    grad_fn = jax.jit(diffusion_trainer.make_gradient_fn(config, model, diffusion, sampler, 1))
    state = _start(z, model, "unet", config, [])
    batch = _batch(z["x_start"], _labels(z, "y"), z["unet/step0/t"], z["unet/step0/noise"])
    inputs = diffusion_trainer.draw_inputs(batch, jax.random.key(0))
    loss, grads, aux, _ = grad_fn(state.params, state.sampler_state, inputs, jax.random.key(1))
    assert rel_l2(loss, z["unet/step0/loss"]) <= LOSS_TOL
    terms_err = _check_step_terms(aux["terms"], z, "unet/step0")
    grad_err = _check_gradients(convert.to_state_dict(grads), _prefixed(z, "unet/step0/grad/"))
    print(f"unet step 0: terms {terms_err:.2e}, gradients {grad_err:.2e} (max rel)")


def test_unet_adamw_steps_with_annealing_and_ema(golden):
    """Every step's loss terms and learning rate (annealed after each step: steps 0 and 1 at the
    base rate), then the parameters and the EMA after the last AdamW step."""
    z, cfg = golden
    config, model, diffusion, sampler = _parts(cfg, "unet")
    rate = state_lib.parse_ema_rates(config.train.ema_rates)[0]
    step_fn = jax.jit(diffusion_trainer.make_train_step(config, model, diffusion, sampler, 1))
    grad_fn = jax.jit(diffusion_trainer.make_gradient_fn(config, model, diffusion, sampler, 1))
    state = _start(z, model, "unet", config, [rate])
    lrs, worst = [], 0.0
    for k in range(int(cfg["optimizer"]["steps"])):
        p = f"unet/step{k}"
        batch = _batch(z["x_start"], _labels(z, "y"), z[f"{p}/t"], z[f"{p}/noise"])
        inputs = diffusion_trainer.draw_inputs(batch, jax.random.key(0))
        _, _, aux, _ = grad_fn(state.params, state.sampler_state, inputs, jax.random.key(1))
        worst = max(worst, _check_step_terms(aux["terms"], z, p))
        state, metrics = step_fn(state, batch)
        assert rel_l2(metrics["loss"], z[f"{p}/loss"]) <= LOSS_TOL, k
        np.testing.assert_allclose(float(metrics["lr"]), float(z[f"{p}/lr"]), rtol=1e-6)
        lrs.append(float(z[f"{p}/lr"]))
    masks, bound = _noise_masks(_prefixed(z, "unet/step0/grad/")), 2 * sum(lrs)
    after = _check_tensors(
        convert.to_state_dict(state.params), _prefixed(z, "unet/after/"), masks, bound
    )
    ema = _check_tensors(
        convert.to_state_dict(state.ema_params[rate]), _prefixed(z, "unet/ema/"), masks, bound
    )
    print(f"unet {len(lrs)} steps: terms {worst:.2e}, params {after:.2e}, ema {ema:.2e}")


def test_super_resolution_step(golden):
    """low_res = area-downsampled x_start (made inside the trainer), and the step's loss terms."""
    z, cfg = golden
    config, model, diffusion, sampler = _parts(cfg, "super_res")
    small = int(config.model.small_size)
    x = nchw_to_nhwc(z["super_res/x_start"])
    low = layers.area_resize(x, small, small)
    low_err = rel_l2(low, nchw_to_nhwc(z["super_res/low_res"]))
    assert low_err <= 1e-6
    grad_fn = jax.jit(diffusion_trainer.make_gradient_fn(config, model, diffusion, sampler, 1))
    state = _start(z, model, "super_res", config, [])
    p = "super_res/step0"
    batch = _batch(z["super_res/x_start"], _labels(z, "super_res/y"), z[f"{p}/t"], z[f"{p}/noise"])
    inputs = diffusion_trainer.draw_inputs(batch, jax.random.key(0))
    loss, _, aux, _ = grad_fn(state.params, state.sampler_state, inputs, jax.random.key(1))
    assert rel_l2(loss, z[f"{p}/loss"]) <= LOSS_TOL
    terms = _check_step_terms(aux["terms"], z, p)
    print(f"super-res: low_res {low_err:.2e}, terms {terms:.2e}")


def test_classifier_steps(golden):
    """Logits of the noised batch, loss and learning rate (annealed before each step) of every
    step, step 1 on the weights after step 0's AdamW update; the step-0 gradient."""
    z, cfg = golden
    config, net, diffusion, sampler = _parts(cfg, "classifier")
    step_fn = jax.jit(classifier_trainer.make_train_step(config, net, diffusion, sampler, 1))
    grad_fn = jax.jit(classifier_trainer.make_gradient_fn(config, net, 1))
    state = _start(z, net, "classifier", config, [])
    worst = 0.0
    for k in range(int(cfg["optimizer"]["clf_steps"])):
        p = f"classifier/step{k}"
        images, labels = z["classifier/x_start"], z["classifier/labels"]
        batch = _batch(images, labels, z[f"{p}/t"], z[f"{p}/noise"])
        inputs = classifier_trainer.noised_inputs(
            config, diffusion, sampler, {}, jax.random.key(0), batch
        )
        logits = net.apply({"params": state.params}, inputs["x"], inputs["t"])
        worst = max(worst, rel_l2(logits, z[f"{p}/logits"]))
        assert worst <= LOSS_TOL, k
        if k == 0:
            _, grads, _ = grad_fn(state.params, inputs)
            grad_err = _check_gradients(
                convert.to_state_dict(grads), _prefixed(z, "classifier/step0/grad/")
            )
        state, metrics = step_fn(state, batch)
        assert rel_l2(metrics["loss"], z[f"{p}/loss"]) <= LOSS_TOL, k
        np.testing.assert_allclose(float(metrics["lr"]), float(z[f"{p}/lr"]), rtol=1e-6)
    print(f"classifier: logits {worst:.2e}, step-0 gradients {grad_err:.2e}")


def test_a_resumed_reference_run_takes_the_reference_step(golden):
    """training_run/ (model, EMA and AdamW files of TrainLoop.save()) imported without PyTorch
    continues with exactly the step the reference's resumed run took."""
    z, cfg = golden
    config, model, diffusion, sampler = _parts(cfg, "unet")
    location = locate.locate(str(fixture_path("training_run")))
    assert location.format == "reference_run"
    tx = optim.create_optimizer(config.optim)
    rates = state_lib.parse_ema_rates(config.train.ema_rates)
    state = reference_run.load_train_state(
        location,
        params_like=factory.abstract_variables(model)["params"],
        tx=tx,
        ema_rates=rates,
        rng=jax.random.key(0),
        sampler_state=sampler.init_state(),
        optim_config=config.optim,
    )
    assert int(state.step) == location.step
    step_fn = jax.jit(diffusion_trainer.make_train_step(config, model, diffusion, sampler, 1))
    batch = _batch(z["x_start"], _labels(z, "y"), z["unet/resumed/t"], z["unet/resumed/noise"])
    state, metrics = step_fn(state, batch)
    loss_err = rel_l2(metrics["loss"], z["unet/resumed/loss"])
    assert loss_err <= LOSS_TOL
    np.testing.assert_allclose(float(metrics["lr"]), float(z["unet/resumed/lr"]), rtol=1e-6)
    masks = _noise_masks(_prefixed(z, "unet/step0/grad/"))
    bound = 2 * float(z["unet/resumed/lr"])
    after = _check_tensors(
        convert.to_state_dict(state.params), _prefixed(z, "unet/resumed/after/"), masks, bound
    )
    ema = _check_tensors(
        convert.to_state_dict(state.ema_params[rates[0]]),
        _prefixed(z, "unet/resumed/ema/"),
        masks,
        bound,
    )
    print(f"resumed step: loss {loss_err:.2e}, params {after:.2e}, ema {ema:.2e}")


def test_the_rule_holds_where_groupnorm_has_one_channel_per_group(golden):
    """32-channel levels without scale-shift norm: every GroupNorm has one channel per group, so
    the timestep-embedding projections, the time-embedding MLP and the label embedding feeding
    them have exactly zero gradient. A stand-in reference takes the same maths in another
    summation order (the batch reversed: the loss is a mean over examples), which is what a second
    framework's round-off looks like. Those tensors' round-off differs between the two by far more
    than the tolerance, and the per-layer rule alone would compare them (a whole layer of
    round-off is its own largest element); the whole-gradient rule recognises them, and bounds
    their parameters after AdamW steps by the learning rates."""
    z, cfg = golden
    model = openai.create_model(
        **{**cfg["create_model"], "channel_mult": "1,1", "use_scale_shift_norm": False}
    )
    config, _, diffusion, sampler = _parts(cfg, "unet")
    params = perturbed(factory.init_variables(model, jax.random.key(0)), seed=3)["params"]
    tx = optim.create_optimizer(config.optim)
    grad_fn = jax.jit(diffusion_trainer.make_gradient_fn(config, model, diffusion, sampler, 1))
    step_fn = jax.jit(diffusion_trainer.make_train_step(config, model, diffusion, sampler, 1))

    def batch(k: int, order):
        p = f"unet/step{k}"
        b = _batch(z["x_start"], _labels(z, "y"), z[f"{p}/t"], z[f"{p}/noise"])
        return {key: np.asarray(v)[order] for key, v in b.items()}

    n = z["x_start"].shape[0]
    forward, backward = np.arange(n), np.arange(n)[::-1]

    def run(order):
        state = state_lib.create(params, tx, rng=jax.random.key(0), ema_rates=[])
        inputs = diffusion_trainer.draw_inputs(batch(0, order), jax.random.key(0))
        _, grads, _, _ = grad_fn(state.params, state.sampler_state, inputs, jax.random.key(1))
        lrs = []
        for k in range(int(cfg["optimizer"]["steps"])):
            state, metrics = step_fn(state, batch(k, order))
            lrs.append(float(metrics["lr"]))
        return convert.to_state_dict(grads), convert.to_state_dict(state.params), lrs

    got, got_after, lrs = run(forward)
    want, want_after, _ = run(backward)
    zero = sorted(k for k, w in want.items() if np.abs(w).max() < TENSOR_FLOOR * _scale(want))
    assert any(".emb_layers." in k for k in zero) and "time_embed.0.weight" in zero, zero
    # Round-off, not agreement: compared per tensor they fail the tolerance...
    assert max(rel_l2(got[k], want[k]) for k in zero) > TENSOR_TOL
    assert max(rel_l2(got_after[k], want_after[k]) for k in zero) > TENSOR_TOL
    # ...and the per-layer rule alone would have compared them (their layers are all round-off).
    top = _module_max(want)
    embeddings = [k for k in zero if ".emb_layers." in k or k.startswith(("time_embed", "label_"))]
    assert all((np.abs(want[k]) >= NOISE_FLOOR * top[k]).any() for k in embeddings)
    # The rule: structurally zero in both, parameters within the learning rates, the rest exact.
    _check_gradients(got, want)
    _check_tensors(got_after, want_after, _noise_masks(want), 2 * sum(lrs))
