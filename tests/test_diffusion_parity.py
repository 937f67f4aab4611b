"""Every key of the reference's diffusion_math.npz, from the diffusion rebuilt out of config_json.

The reference arrays are NCHW and go through `nchw_to_nhwc`; the "model" returns the stored
model_output (its first C channels for fixed variances) and the cond_fn the stored cond_grad. The
timesteps both receive are recorded on the host (everything here runs eagerly).
"""

import json

import numpy as np
import pytest
from conftest import load_fixture, nchw_to_nhwc, rel_l2

from gdiff import diffusion as gdd

TOL = 1e-5
LEARNED = ("LEARNED", "LEARNED_RANGE")


@pytest.fixture(scope="module")
def z():
    return load_fixture("diffusion_math.npz")


def _nhwc(z, key):
    a = z[key]
    return nchw_to_nhwc(a) if a.ndim == 4 else a


class _Recorder:
    """model_fn / cond_fn returning a fixed tensor and remembering the ts they were given."""

    def __init__(self, out):
        self.out, self.ts = out, []

    def __call__(self, x, ts):
        self.ts.append(np.asarray(ts))
        return self.out


def _model(z, var: str):
    out = _nhwc(z, "model_output")
    c = _nhwc(z, "x_start").shape[-1]
    return _Recorder(out if var in LEARNED else out[..., :c])


def _diffusion(steps, schedule, mean, var, loss="MSE", rescale=False):
    return gdd.GaussianDiffusion(
        betas=gdd.get_named_beta_schedule(schedule, steps),
        model_mean_type=gdd.ModelMeanType[mean],
        model_var_type=gdd.ModelVarType[var],
        loss_type=gdd.LossType[loss],
        rescale_timesteps=rescale,
    )


def _check(got, z, key, checked):
    want = _nhwc(z, key)
    err = rel_l2(got, want)
    assert err < TOL, f"{key}: rel L2 {err:.3g}"
    checked.add(key)


def _loss_type(spec: dict) -> str:
    if "loss_type" in spec:
        return spec["loss_type"]
    # e.g. "MSE (hybrid with learned sigma)"
    return spec["loss"].split()[0]


def test_every_diffusion_math_key(z):
    cfg = json.loads(str(z["config_json"]))
    x_start, noise = _nhwc(z, "x_start"), _nhwc(z, "noise")
    x_t, t = _nhwc(z, "q_sample"), z["t"]
    step_noise, cond_grad = _nhwc(z, "step_noise"), _nhwc(z, "cond_grad")
    inputs = {"config_json", "x_start", "noise", "t", "model_output", "cond_grad", "step_noise"}
    checked: set[str] = set()

    def base(mean="EPSILON", var="FIXED_LARGE", loss="MSE"):
        return _diffusion(cfg["steps"], cfg["schedule"], mean, var, loss)

    d = base()
    names = ("mean", "variance", "log_variance_clipped")
    _check(d.q_sample(x_start, t, noise), z, "q_sample", checked)
    for k, v in zip(names[:2] + ("log_variance",), d.q_mean_variance(x_start, t), strict=True):
        _check(v, z, f"q_mean_variance/{k}", checked)
    for k, v in zip(names, d.q_posterior_mean_variance(x_start, x_t, t), strict=True):
        _check(v, z, f"q_posterior/{k}", checked)

    for key in z.files:
        parts = key.split("/")
        head = parts[0]
        if head == "p_mean_variance" and parts[-1] == "mean":
            _, mean, var, clip, _ = parts
            out = base(mean, var).p_mean_variance(
                _model(z, var), x_t, t, clip_denoised=clip == "clip1"
            )
            for k in out:
                _check(out[k], z, "/".join(parts[:-1] + [k]), checked)
        elif head == "guidance" and parts[-1] == "condition_mean":
            _, mean, var, _ = parts
            dd = base(mean, var)
            pmv = dd.p_mean_variance(_model(z, var), x_t, t, clip_denoised=True)
            cond = _Recorder(cond_grad)
            _check(dd.condition_mean(cond, pmv, x_t, t), z, key, checked)
            out = dd.condition_score(cond, pmv, x_t, t)
            for k in ("mean", "pred_xstart"):
                _check(out[k], z, f"guidance/{mean}/{var}/condition_score/{k}", checked)
            np.testing.assert_array_equal(cond.ts[0], t)
        elif head == "p_sample" and parts[-1] == "sample":
            _, mean, var, guided, _ = parts
            cond = _Recorder(cond_grad) if guided == "guided1" else None
            out = base(mean, var).p_sample(_model(z, var), x_t, t, step_noise, cond_fn=cond)
            for k in out:
                _check(out[k], z, "/".join(parts[:-1] + [k]), checked)
        elif head == "ddim_sample" and parts[-1] == "sample":
            _, mean, var, guided, eta, _ = parts
            cond = _Recorder(cond_grad) if guided == "guided1" else None
            out = base(mean, var).ddim_sample(
                _model(z, var), x_t, t, step_noise, eta=float(eta[3:]), cond_fn=cond
            )
            for k in out:
                _check(out[k], z, "/".join(parts[:-1] + [k]), checked)
        elif head == "ddim_reverse_sample":
            _, mean, var, _ = parts
            out = base(mean, var).ddim_reverse_sample(_model(z, var), x_t, t)
            _check(out["sample"], z, key, checked)
        elif head == "training_losses" and len(parts) == 5:
            _, loss, mean, var, term = parts
            out = base(mean, var, loss).training_losses(_model(z, var), x_start, t, noise)
            assert term in out, f"{key}: training_losses returned only {sorted(out)}"
            _check(out[term], z, key, checked)
        elif head == "vb_terms_bpd" and parts[-1] == "output":
            dd = base("EPSILON", "LEARNED_RANGE")
            out = dd._vb_terms_bpd(_model(z, "LEARNED_RANGE"), x_start, x_t, t, clip_denoised=False)
            for k in out:
                _check(out[k], z, f"vb_terms_bpd/{k}", checked)
        elif head == "normal_kl" and parts[-1] == "out":
            args = [_nhwc(z, f"normal_kl/{k}") for k in ("mean1", "logvar1", "mean2", "logvar2")]
            _check(gdd.normal_kl(*args), z, key, checked)
            checked.update(f"normal_kl/{k}" for k in ("mean1", "logvar1", "mean2", "logvar2"))
        elif head == "dgll" and parts[-1] == "out":
            got = gdd.discretized_gaussian_log_likelihood(
                _nhwc(z, "dgll/x"),
                means=_nhwc(z, "dgll/means"),
                log_scales=_nhwc(z, "dgll/log_scales"),
            )
            _check(got, z, key, checked)
            checked.update(f"dgll/{k}" for k in ("x", "means", "log_scales"))

    _check_spaced(z, cfg, x_start, x_t, noise, cond_grad, checked)
    _check_plain_rescaled(z, cfg, x_start, x_t, noise, checked)

    unchecked = sorted(set(z.files) - checked - inputs)
    assert not unchecked, f"keys not reproduced: {unchecked}"


def _check_spaced(z, cfg, x_start, x_t, noise, cond_grad, checked):
    spec = cfg["spaced"]
    prefixes = sorted({k.split("/")[1] for k in z.files if k.startswith("spaced/")})
    assert prefixes, "fixture has no spaced/ keys"
    for prefix in prefixes:
        rescale = prefix == "rescale1"
        d = gdd.SpacedDiffusion(
            gdd.space_timesteps(spec["steps"], spec["respacing"]),
            betas=gdd.get_named_beta_schedule(spec["schedule"], spec["steps"]),
            model_mean_type=gdd.ModelMeanType.EPSILON,
            model_var_type=gdd.ModelVarType.LEARNED_RANGE
            if spec.get("learn_sigma", True)
            else gdd.ModelVarType.FIXED_LARGE,
            loss_type=gdd.LossType[_loss_type(spec)],
            rescale_timesteps=rescale,
        )
        root = f"spaced/{prefix}"
        t = z[f"{root}/t"]
        model = _model(z, "LEARNED_RANGE")
        pmv = d.p_mean_variance(model, x_t, t, clip_denoised=True)
        for k in pmv:
            _check(pmv[k], z, f"{root}/p_mean_variance/{k}", checked)
        _check(model.ts[0], z, f"{root}/model_ts", checked)
        assert model.ts[0].dtype.kind == ("f" if rescale else "i")
        cond = _Recorder(cond_grad)
        _check(d.condition_mean(cond, pmv, x_t, t), z, f"{root}/condition_mean", checked)
        _check(cond.ts[0], z, f"{root}/cond_fn_ts", checked)
        out = d.training_losses(model, x_start, t, noise)
        for k in out:
            _check(out[k], z, f"{root}/training_losses/{k}", checked)
        for ts in model.ts:
            _check(ts, z, f"{root}/model_ts", checked)
        checked.add(f"{root}/t")


def _check_plain_rescaled(z, cfg, x_start, x_t, noise, checked):
    spec = cfg["plain_rescaled"]
    d = _diffusion(
        spec["steps"],
        spec["schedule"],
        spec["model_mean_type"],
        spec["model_var_type"],
        spec["loss_type"],
        spec["rescale_timesteps"],
    )
    assert not isinstance(d, gdd.SpacedDiffusion)
    t = z["plain_rescaled/t"]
    model = _model(z, spec["model_var_type"])
    pmv = d.p_mean_variance(model, x_t, t, clip_denoised=True)
    for k in pmv:
        _check(pmv[k], z, f"plain_rescaled/p_mean_variance/{k}", checked)
    out = d.training_losses(model, x_start, t, noise)
    for k in out:
        _check(out[k], z, f"plain_rescaled/training_losses/{k}", checked)
    for ts in model.ts:
        _check(ts, z, "plain_rescaled/model_ts", checked)
    checked.add("plain_rescaled/t")


def test_jitted_step_matches_eager(z):
    """The same maths under jit (the diffusion closed over as constants) gives the same numbers."""
    import jax

    cfg = json.loads(str(z["config_json"]))
    d = _diffusion(cfg["steps"], cfg["schedule"], "EPSILON", "LEARNED_RANGE", "RESCALED_MSE")
    x_start, noise, t = _nhwc(z, "x_start"), _nhwc(z, "noise"), z["t"]
    model = _model(z, "LEARNED_RANGE")
    eager = d.training_losses(model, x_start, t, noise)
    jitted = jax.jit(lambda a, b, c: d.training_losses(lambda x, ts: model.out, a, b, c))(
        x_start, t, noise
    )
    for k in eager:
        assert rel_l2(jitted[k], eager[k]) < 1e-6, k
