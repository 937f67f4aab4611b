"""`--mode=sample`: draw a run of samples, sharded over every device, resumable, per guidance scale.

    python main.py --mode=sample --config configs/<model>.py --workdir <dir> \
        --config.sample.classifier_checkpoint=<dir> --config.sample.classifier_scale=1.0

The model (and, when any guidance scale is non-zero, the classifier) is loaded with
`gdiff.checkpointing.load_params`, from `sample.model_checkpoint` / `sample.classifier_checkpoint`
or the workdir. Every scale of `sample.classifier_scale` is sampled in the same compiled program
over the same noise and labels (see gdiff/sampling/sampler.py), batch by batch; each batch leaves
one shard per scale and process on disk, so an interrupted run continues where it stopped. At the
end process 0 merges each scale into the reference's `samples_<N>x<H>x<W>x3.npz` and a grid PNG.

Super-resolution configs (`model.super_res`) read `sample.base_samples` (the reference's
super_res_sample.py input: arr_0 uint8 [N, small, small, 3], arr_1 labels) as the low-resolution
input; example i is conditioned on base sample i (cycled when the base file is shorter).
"""

from __future__ import annotations

import math
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from gdiff import checkpointing, distributed
from gdiff.sampling import grid as grid_lib
from gdiff.sampling import labels as labels_lib
from gdiff.sampling import sampler as sampler_lib
from gdiff.sampling import shards


def _as_variables(params: Any) -> dict:
    """load_params returns the inner params tree; tolerate a full {"params": ...} dict too."""
    if isinstance(params, dict) and set(params) == {"params"}:
        return dict(params)
    return {"params": params}


def load_base_samples(path: str, small_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The low-resolution inputs of a super-resolution run.

    Args:
      path: .npz with arr_0 uint8 [N, h, w, 3] (and arr_1 int labels [N] when class-conditional).
      small_size: the model's low-resolution size (config.model.small_size); h and w must equal it.

    Returns:
      (low_res float32 [N, h, w, 3] in [-1, 1], labels [N] or None)
    """
    if not path:
        raise ValueError(
            "model.super_res is set but sample.base_samples is empty: give the .npz of "
            "low-resolution samples to upsample (arr_0 uint8 [N, h, w, 3], arr_1 labels)"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"sample.base_samples={path} does not exist")
    images, labels = shards.read_sample_file(path)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"base samples {path}: arr_0 must be [N, h, w, 3]; got {images.shape}")
    if images.shape[1:3] != (small_size, small_size):
        raise ValueError(
            f"base samples {path} are {images.shape[1]}x{images.shape[2]}, but the model upsamples "
            f"from model.small_size={small_size}x{small_size}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"base samples {path} hold no images")
    low_res = images.astype(np.float32) / 127.5 - 1.0
    return low_res, (None if labels is None else np.asarray(labels, np.int64))


def output_dir(config, workdir: str) -> pathlib.Path:
    return pathlib.Path(config.sample.output_dir or os.path.join(workdir, "samples"))


def _load(path: str, what: str, kind: str, ema_rate):
    try:
        return checkpointing.load_params(path, ema_rate=ema_rate, kind=kind)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"cannot load the {what} from {path}: {e}") from e


def _all_agree(local_flags: np.ndarray) -> np.ndarray:
    """Elementwise AND of a bool vector over all processes (every host must skip the same
    batches, because each batch is one collective program)."""
    if jax.process_count() == 1:
        return local_flags
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(local_flags.astype(np.int32))
    return np.all(np.asarray(gathered).reshape(jax.process_count(), -1) > 0, axis=0)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run(
    config,
    workdir: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    on_batch_done: Callable[[int], None] | None = None,
) -> dict[float, pathlib.Path]:
    """Samples `config.sample.num_samples` images per guidance scale.

    Args:
      config: a full gdiff config (configs/common.py); reads `model`, `diffusion`, `classifier`,
        `sample`.
      workdir: default place of the checkpoints and of the output (`<workdir>/samples`).
      mesh: the device mesh (default: all devices of all hosts).
      on_batch_done: called with the batch index after each batch's shards are written (progress
        hooks; tests inject a failure here to simulate a killed run).

    Returns:
      {scale: path of the merged samples_<N>x<H>x<W>x3.npz}.
    """
    from gdiff import factory

    s = config.sample
    scales = labels_lib.parse_scales(s.classifier_scale)
    guided = any(scale != 0 for scale in scales)
    num_samples = int(s.num_samples)
    if num_samples <= 0:
        raise ValueError(f"sample.num_samples must be positive; got {num_samples}")
    if int(s.batch_size) <= 0:
        raise ValueError(f"sample.batch_size (per device) must be positive; got {s.batch_size}")
    class_cond = bool(config.model.class_cond)
    super_res = bool(config.model.get("super_res", False))
    image_size = int(config.model.image_size)
    model_ckpt = s.model_checkpoint or workdir
    classifier_ckpt = s.get("classifier_checkpoint", "") or ""
    if guided and not classifier_ckpt:
        # The workdir may hold a classifier trained there (classifier_checkpoints/).
        candidates = [os.path.join(workdir, n) for n in checkpointing.WORKDIR_LAYOUT["classifier"]]
        if not any(os.path.isdir(c) for c in candidates):
            raise ValueError(
                f"sample.classifier_scale={s.classifier_scale!r} asks for classifier guidance but "
                "no classifier checkpoint was given: set sample.classifier_checkpoint (a converted "
                "or trained classifier), or use classifier_scale=0 for unguided samples"
            )
        classifier_ckpt = workdir

    mesh = mesh if mesh is not None else distributed.data_mesh()
    n_dev = mesh.size
    per_batch = int(s.batch_size) * n_dev  # distinct examples per global batch
    num_batches = math.ceil(num_samples / per_batch)
    if num_samples % per_batch:
        logging.info(
            "sample.num_samples=%d is not a multiple of the global batch %d (%d per device x %d "
            "devices): the last batch is trimmed",
            num_samples,
            per_batch,
            s.batch_size,
            n_dev,
        )
    local_examples = distributed.local_batch_size(per_batch, mesh)
    first_local = jax.process_index() * local_examples
    n_scales = len(scales)

    # Labels and, for super-resolution, the low-resolution inputs of every example.
    low_res = None
    base_labels = None
    if super_res:
        low_res, base_labels = load_base_samples(s.base_samples, int(config.model.small_size))
    use_labels = class_cond or guided
    label_classes = []
    if class_cond:
        label_classes.append(int(config.model.num_classes))
    if guided:
        label_classes.append(int(config.classifier.num_classes))
    all_labels = None
    if use_labels:
        num_classes = min(label_classes)
        if base_labels is not None:
            idx = np.arange(num_samples) % base_labels.shape[0]
            all_labels = base_labels[idx].astype(np.int32)
            bad = np.unique(all_labels[(all_labels < 0) | (all_labels >= num_classes)])
            if bad.size:
                raise ValueError(
                    f"base samples {s.base_samples} have labels {bad.tolist()} outside the "
                    f"model's classes 0..{num_classes - 1}"
                )
        elif super_res and class_cond:
            raise ValueError(
                f"base samples {s.base_samples} have no labels (arr_1) but the super-resolution "
                "model is class-conditional"
            )
        else:
            all_labels = labels_lib.make_labels(s.labels, num_samples, num_classes, int(s.seed))

    out = output_dir(config, workdir)
    respacing = s.timestep_respacing or config.diffusion.timestep_respacing
    shape = (num_samples, image_size, image_size, 3)
    merged = {scale: shards.merged_path(out, scale, shape) for scale in scales}
    manifest = {
        "seed": int(s.seed),
        "num_samples": num_samples,
        "examples_per_batch": per_batch,
        "process_count": jax.process_count(),
        "labels": None if all_labels is None else str(s.labels),
        "use_ddim": bool(s.use_ddim),
        "eta": float(s.eta),
        "clip_denoised": bool(s.clip_denoised),
        "timestep_respacing": str(respacing),
        "model_checkpoint": os.path.abspath(model_ckpt),
        "classifier_checkpoint": os.path.abspath(classifier_ckpt) if guided else "",
        "ema_rate": str(s.ema_rate),
        "base_samples": os.path.abspath(s.base_samples) if super_res else "",
        "image_shape": list(shape[1:]),
    }
    shards.check_run_manifest(out, manifest, write=distributed.is_main_process())
    if all(p.exists() for p in merged.values()):
        logging.info("all %d scale(s) already merged under %s; nothing to do", n_scales, out)
        return merged

    def batch_done(b: int) -> bool:
        return all(
            shards.shard_path(out, scale, jax.process_index(), b).exists() for scale in scales
        )

    done = _all_agree(np.array([batch_done(b) for b in range(num_batches)], bool))
    todo = [b for b in range(num_batches) if not done[b]]
    sampler = None
    if todo:
        sampler, model_vars, classifier_vars = _build_sampler(
            config, factory, mesh, guided, model_ckpt, classifier_ckpt, class_cond
        )

    progress = None
    if distributed.is_main_process():
        from tqdm import tqdm

        finished = sum(min(per_batch, num_samples - b * per_batch) for b in range(num_batches))
        finished -= sum(min(per_batch, num_samples - b * per_batch) for b in todo)
        progress = tqdm(
            total=num_samples * n_scales,
            initial=finished * n_scales,
            unit="img",
            desc="sampling",
            dynamic_ncols=True,
        )
    start = time.perf_counter()
    drawn = 0
    for b in todo:
        ids = b * per_batch + first_local + np.arange(local_examples)
        keep = ids < num_samples
        rows = {
            "ids": np.tile(ids, n_scales).astype(np.int32),
            "labels": np.tile(
                all_labels[ids % num_samples] if all_labels is not None else np.zeros_like(ids),
                n_scales,
            ).astype(np.int32),
            "scales": np.repeat(np.asarray(scales, np.float32), local_examples),
        }
        if low_res is not None:
            rows["low_res"] = np.tile(low_res[ids % low_res.shape[0]], (n_scales, 1, 1, 1))
        images = sampler(model_vars, classifier_vars, sampler.make_batch(rows))
        images = sampler_lib.local_rows(images).reshape(n_scales, local_examples, *shape[1:])
        for k, scale in enumerate(scales):
            path = shards.shard_path(out, scale, jax.process_index(), b)
            if not path.exists():  # a finished shard is never rewritten
                shards.write_sample_file(
                    path,
                    images[k][keep],
                    None if all_labels is None else all_labels[ids[keep]],
                )
        drawn += min(per_batch, num_samples - b * per_batch) * n_scales
        if progress is not None:
            progress.update(min(per_batch, num_samples - b * per_batch) * n_scales)
        if on_batch_done is not None:
            on_batch_done(b)
    if progress is not None:
        progress.close()
    if drawn:
        elapsed = time.perf_counter() - start
        logging.info(
            "sampled %d images in %.1fs (%.2f images/s, %d device(s))",
            drawn,
            elapsed,
            drawn / elapsed,
            n_dev,
        )

    _barrier("gdiff_sampling_shards_written")
    if distributed.is_main_process():
        for scale in scales:
            path = shards.merge_shards(
                shards.scale_dir(out, scale),
                num_samples,
                merged[scale],
                num_batches=num_batches,
                num_processes=jax.process_count(),
            )
            grid_path = shards.scale_dir(out, scale) / "grid.png"
            if not grid_path.exists():
                images, labels = shards.read_sample_file(path)
                grid_lib.save_sample_grid(
                    grid_path, images, labels, by_class=labels_lib.is_balanced(s.labels)
                )
            logging.info("scale %s: %s", labels_lib.format_scale(scale), path)
    _barrier("gdiff_sampling_merged")
    return merged


def _build_sampler(config, factory, mesh, guided, model_ckpt, classifier_ckpt, class_cond):
    s = config.sample
    ema_rate = s.ema_rate or None
    model = factory.build_model(config)
    diffusion = factory.build_diffusion(config, timestep_respacing=s.timestep_respacing or None)
    model_vars = _as_variables(_load(model_ckpt, "model", "model", ema_rate))
    guidance, classifier_vars = None, None
    if guided:
        classifier = factory.build_classifier(config)
        classifier_vars = _as_variables(_load(classifier_ckpt, "classifier", "classifier", None))
        guidance = sampler_lib.classifier_guidance(classifier)
    options = sampler_lib.SamplerOptions(
        image_shape=(int(config.model.image_size), int(config.model.image_size), 3),
        use_ddim=bool(s.use_ddim),
        eta=float(s.eta),
        clip_denoised=bool(s.clip_denoised),
        class_cond=class_cond,
    )
    sampler = sampler_lib.Sampler(
        diffusion, model.apply, options, guidance=guidance, mesh=mesh, seed=int(s.seed)
    )
    return sampler, sampler.put_params(model_vars), sampler.put_params(classifier_vars)
