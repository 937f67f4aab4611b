"""What a sampling run draws, decided before any device work: `make_plan`.

The plan fixes every example's id, label and (super-resolution) low-resolution input, how the
examples split into global batches and which slice of each batch this process draws, where the
shards and merged files go, the manifest a resumed run must match, and which checkpoints are loaded.
Everything here is a function of the config, the workdir and the device topology, so a resumed run,
another device count or another batch size draws every example the same way; gdiff/jobs/sample.py
carries it out through the run engine (gdiff/engine/runs.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pathlib

import jax
import numpy as np
from absl import logging

from gdiff import distributed, errors, factory
from gdiff.checkpoints import locate
from gdiff.diffusion import guidance as guidance_lib
from gdiff.sampling import guidance_rows, sample_files
from gdiff.sampling import labels as labels_lib
from gdiff.sampling import sampler as sampler_lib


@dataclasses.dataclass(frozen=True)
class Topology:
    """The facts of the device mesh a plan depends on."""

    num_devices: int  # devices of the mesh, all processes
    local_devices: int  # devices of the mesh on this process
    process_index: int = 0
    process_count: int = 1

    @classmethod
    def of(cls, mesh: jax.sharding.Mesh) -> Topology:
        """The plan's view of `mesh` from this process."""
        return cls(
            num_devices=mesh.size,
            # This process's share of a one-example-per-device batch: its devices in the mesh.
            local_devices=distributed.local_batch_size(mesh.size, mesh),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class SamplingPlan:
    """One sampling run: example ids 0..num_samples-1, drawn in num_batches global batches.

    Global batch b holds examples b * per_batch .. (b + 1) * per_batch - 1; this process draws
    `local_examples` of them from offset `first_local`. The last batch is trimmed: ids past
    num_samples are drawn (every device runs the same program) but never written.
    """

    rows: tuple[guidance_rows.GuidanceRow, ...]  # all drawn in one program over the same noise
    num_samples: int
    per_batch: int  # distinct examples per global batch (before the rows multiply it)
    num_batches: int
    local_examples: int
    first_local: int
    image_shape: tuple[int, int, int]  # [H, W, 3] of one sample
    labels: np.ndarray | None  # int32 [num_samples], None for an unconditional, unguided run
    low_res: np.ndarray | None  # float32 [M, h, w, 3] in [-1, 1]; example i sees row i % M
    out: pathlib.Path  # output directory (shards and merged files per row)
    merged: dict[guidance_rows.GuidanceRow, pathlib.Path]  # row -> samples_<N>x<H>x<W>x3.npz
    by_class: bool  # grids with one row per class (balanced labels)
    manifest: dict  # the settings a resumed run must share (engine/manifest.py)
    model: locate.Location
    classifier: locate.Location | None  # None when every scale is 0
    topology: Topology
    guide: locate.Location | None = None  # the guide network (two_network / autoguidance rows)

    @property
    def scales(self) -> tuple[float, ...]:
        """Each row's headline scale (`GuidanceRow.scale`: the classifier scale of a classifier
        row, the weight w of output guidance)."""
        return tuple(r.scale for r in self.rows)

    def batch_examples(self, batch: int) -> int:
        """How many examples of global batch `batch` are kept (all but in the trimmed last one)."""
        return min(self.per_batch, self.num_samples - batch * self.per_batch)

    def local_ids(self, batch: int) -> np.ndarray:
        """int [local_examples]: this process's example ids in `batch` (some >= num_samples in
        the trimmed last batch)."""
        return batch * self.per_batch + self.first_local + np.arange(self.local_examples)

    def batch_rows(self, batch: int) -> dict[str, np.ndarray]:
        """This process's rows of `batch`: every local example once per guidance row, row-major
        (the per-row arrays of `guidance_rows.row_arrays`)."""
        ids = self.local_ids(batch)
        n_rows = len(self.rows)
        labels = (
            self.labels[ids % self.num_samples] if self.labels is not None else np.zeros_like(ids)
        )
        rows = {
            "ids": np.tile(ids, n_rows).astype(np.int32),
            "labels": np.tile(labels, n_rows).astype(np.int32),
            **guidance_rows.row_arrays(self.rows, self.local_examples),
        }
        if self.low_res is not None:
            rows["low_res"] = np.tile(self.low_res[ids % self.low_res.shape[0]], (n_rows, 1, 1, 1))
        return rows


def is_super_res(config) -> bool:
    """Whether the model upsamples (reads `sample.base_samples` as its low-resolution input)."""
    return int(config.model.small_size) > 0


def output_dir(config, workdir: str) -> pathlib.Path:
    return pathlib.Path(config.sample.output_dir or os.path.join(workdir, "samples"))


def scale_dir(out_dir: str | os.PathLike, scale: float) -> pathlib.Path:
    """The folder of the classifier row at `scale` (every step): scale_<s>."""
    return row_dir(out_dir, guidance_rows.classifier_row(scale))


def row_dir(out_dir: str | os.PathLike, row: guidance_rows.GuidanceRow) -> pathlib.Path:
    """Where one guidance row's shards, merged samples and grid go (`GuidanceRow.folder`)."""
    return pathlib.Path(out_dir) / row.folder()


def merged_path(out_dir, row, shape: tuple[int, int, int, int]) -> pathlib.Path:
    """The merged samples of one row: samples_<N>x<H>x<W>x3.npz (the reference's name)."""
    return row_dir(out_dir, row) / sample_files.merged_name(*shape)


def load_base_samples(path: str, small_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The low-resolution inputs of a super-resolution run.

    Args:
      path: .npz with arr_0 uint8 [N, h, w, 3] (and arr_1 int labels [N] when class-conditional).
      small_size: the model's low-resolution size (config.model.small_size); h and w must equal it.

    Returns:
      (low_res float32 [N, h, w, 3] in [-1, 1], labels [N] or None)
    """
    if not path:
        raise errors.ConfigError(
            f"model.small_size={small_size} makes a super-resolution model, but "
            "sample.base_samples is empty: give the .npz of low-resolution samples to upsample "
            "(arr_0 uint8 [N, h, w, 3], arr_1 labels)"
        )
    if not os.path.exists(path):
        raise errors.MissingInputError(
            f"sample.base_samples={path} does not exist; give the .npz of low-resolution samples "
            "to upsample"
        )
    images, labels = sample_files.read_sample_file(path)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise errors.InputError(
            f"base samples {path}: arr_0 must be [N, h, w, 3]; got {images.shape}"
        )
    if images.shape[1:3] != (small_size, small_size):
        raise errors.InputError(
            f"base samples {path} are {images.shape[1]}x{images.shape[2]}, but the model upsamples "
            f"from model.small_size={small_size}x{small_size}"
        )
    if images.shape[0] == 0:
        raise errors.InputError(f"base samples {path} hold no images")
    low_res = images.astype(np.float32) / 127.5 - 1.0
    return low_res, (None if labels is None else np.asarray(labels, np.int64))


def plan_labels(
    config, num_samples: int, guided: bool, base_labels: np.ndarray | None
) -> np.ndarray | None:
    """int32 [num_samples] labels, or None when neither the model nor a classifier reads them.

    Classes are those both the model and the classifier know (the smaller count). A
    super-resolution run follows its base samples' labels, cycled like its low-resolution inputs
    (the reference's super_res_sample.py); otherwise `sample.labels` decides (labels.make_labels).
    """
    s = config.sample
    class_cond = bool(config.model.class_cond)
    if not (class_cond or guided):
        if str(s.labels).strip().lower() != "random":  # not the default: the user asked
            logging.warning(
                "sample.labels=%r is ignored: the model is unconditional (model.class_cond=False) "
                "and no classifier guides it (every sample.classifier_scale is 0)",
                s.labels,
            )
        return None
    label_classes = []
    if class_cond:
        label_classes.append(int(config.model.num_classes))
    if guided:
        label_classes.append(int(config.classifier.num_classes))
    num_classes = min(label_classes)
    if base_labels is not None:
        labels = base_labels[np.arange(num_samples) % base_labels.shape[0]].astype(np.int32)
        bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
        if bad.size:
            raise errors.InputError(
                f"base samples {s.base_samples} have labels {bad.tolist()} outside the "
                f"model's classes 0..{num_classes - 1}"
            )
        return labels
    if is_super_res(config) and class_cond:
        raise errors.InputError(
            f"base samples {s.base_samples} have no labels (arr_1) but the super-resolution "
            "model is class-conditional"
        )
    return labels_lib.make_labels(s.labels, num_samples, num_classes, int(s.seed))


def _classifier_checkpoint(config, workdir: str, guided: bool) -> str:
    """The classifier path to load ("" when unguided): sample.classifier_checkpoint, else the
    workdir when it holds a classifier trained there."""
    s = config.sample
    given = s.classifier_checkpoint
    if not guided:
        return ""
    if given:
        return given
    try:
        locate.locate(workdir, "classifier")
    except FileNotFoundError as e:
        raise errors.ConfigError(
            f"sample.classifier_scale={s.classifier_scale!r} asks for classifier guidance but "
            "no classifier checkpoint was given: set sample.classifier_checkpoint (a converted "
            f"or trained classifier), or use classifier_scale=0 for unguided samples ({e})"
        ) from e
    return workdir


def _locate(path: str, what: str, kind: str) -> locate.Location:
    try:
        return locate.locate(path, kind)
    except FileNotFoundError as e:
        raise errors.MissingInputError(f"cannot load the {what} from {path}: {e}") from e


def _manifest(
    config, topology: Topology, rows, *, model_ckpt: str, classifier_ckpt: str, labelled: bool
) -> dict:
    """What a resumed run must share with the shards on disk: the sampling settings and the
    model, diffusion (and, guided, classifier) groups. `jobs/sample.py` adds the pins of the
    weights actually loaded (step, EMA copy, content fingerprint). The checkpoint paths as given
    are recorded for the record only (INFO_KEYS of gdiff/engine/manifest.py): the pins decide
    whether the weights are the same."""
    s, size = config.sample, int(config.model.image_size)
    return {
        "seed": int(s.seed),
        "num_samples": int(s.num_samples),
        "examples_per_batch": int(s.batch_size) * topology.num_devices,
        "process_count": topology.process_count,
        "labels": str(s.labels) if labelled else None,
        # The sampler and its settings (a DPM-Solver run pins every dpm_solver_* key).
        **sampler_lib.sampler_settings(s, config.diffusion),
        "model_checkpoint": os.path.abspath(model_ckpt),
        "classifier_checkpoint": os.path.abspath(classifier_ckpt) if classifier_ckpt else "",
        "ema_rate": str(s.ema_rate),
        "base_samples": os.path.abspath(s.base_samples) if is_super_res(config) else "",
        "image_shape": [size, size, 3],
        # Without class_dropout when 0: runs begun before the key existed still resume.
        "model": factory.recorded_model_group(config.model),
        "diffusion": config.diffusion.to_dict(),
        "classifier": config.classifier.to_dict() if classifier_ckpt else None,
        # Each row draws into its own folder, whose name states its kind, weights and interval:
        # the rows are recorded, not compared (a run may gain rows, as it may gain scales).
        "guidance_rows": [r.settings() for r in rows],
    }


def _guide_manifest(config, guide_ckpt: str) -> dict:
    """The guide network's part of the manifest (only when a row uses one, so runs without one
    keep the manifests of earlier versions): where it was given (recorded) and which EMA copy;
    jobs/sample.py adds its weights' pin and its network group."""
    if not guide_ckpt:
        return {}
    return {
        "guide_checkpoint": os.path.abspath(guide_ckpt),
        "guide_ema_rate": str(config.sample.guide_ema_rate),
    }


def _guide_checkpoint(config, rows) -> str:
    """The guide network's path ("" when no row uses one)."""
    if not guidance_rows.uses(rows, guidance_lib.GUIDE_NETWORK):
        return ""
    if not config.sample.guide_checkpoint:
        raise errors.ConfigError(
            f"sample.guidance={config.sample.guidance!r} guides with a second network: set "
            "sample.guide_checkpoint (an unconditional model for two_network, a weaker or "
            "earlier one of the same model for autoguidance)"
        )
    return str(config.sample.guide_checkpoint)


def check_respacing(config) -> str:
    """The run's timestep respacing (`sampler.respacing`), checked against the diffusion's
    `diffusion.steps` before anything is written: a respacing that cannot be built would
    otherwise fail after run.json pinned it, and the corrected rerun would be refused.

    Raises:
      errors.ConfigError: naming the key that set it and why it cannot be used.

    The DPM-Solver reads neither respacing (it solves the full chain): a run that sets one is told.
    """
    respacing = sampler_lib.respacing(config.sample, config.diffusion)
    key = "sample" if config.sample.timestep_respacing else "diffusion"
    factory.check_respacing(int(config.diffusion.steps), respacing, f"{key}.timestep_respacing")
    if sampler_lib.sampler_kind(config.sample, config.diffusion) == "dpm_solver":
        ignored = [
            f"{group}.timestep_respacing={config[group].timestep_respacing!r}"
            for group in ("sample", "diffusion")
            if config[group].timestep_respacing
        ]
        if ignored:
            logging.info(
                "%s ignored: sample.sampler=dpm_solver solves on the full %d-step training chain "
                "in sample.dpm_solver_steps=%d steps",
                " and ".join(ignored),
                int(config.diffusion.steps),
                int(config.sample.dpm_solver_steps),
            )
    return respacing


def make_plan(config, workdir: str, topology: Topology) -> SamplingPlan:
    """The whole run, validated: bad settings raise here, before anything is written.

    Args:
      config: a full gdiff config (configs/common.py); reads `model`, `diffusion`, `classifier`,
        `sample`.
      workdir: default place of the checkpoints and of the output (`<workdir>/samples`).
      topology: the device mesh's facts (jobs/sample.py reads them off the mesh).
    """
    s = config.sample
    if str(s.checkpoint_steps).strip():
        raise errors.ConfigError(
            f"sample.checkpoint_steps={s.checkpoint_steps!r} lists steps of a training run for "
            "--mode=sweep (a row per step); one sampling run draws from one checkpoint: set "
            "sample.model_checkpoint to the step's folder (<workdir>/checkpoints/<step>)"
        )
    rows = guidance_rows.parse_rows(s)
    guided = guidance_rows.uses_classifier(rows)
    guide_ckpt = _guide_checkpoint(config, rows)
    sampler_lib.null_label(sampler_lib.config_groups(config))  # cfg rows need a null class
    num_samples = int(s.num_samples)
    if num_samples <= 0:
        raise errors.ConfigError(
            f"sample.num_samples must be positive; got {num_samples}: set how many samples to "
            "draw per guidance row"
        )
    if int(s.batch_size) <= 0:
        raise errors.ConfigError(
            f"sample.batch_size (per device) must be positive; got {s.batch_size}: set how many "
            "samples each device draws at once"
        )
    check_respacing(config)
    model_ckpt = s.model_checkpoint or workdir
    classifier_ckpt = _classifier_checkpoint(config, workdir, guided)
    per_batch = int(s.batch_size) * topology.num_devices
    local_examples = per_batch // topology.num_devices * topology.local_devices
    low_res, base_labels = None, None
    if is_super_res(config):
        low_res, base_labels = load_base_samples(s.base_samples, int(config.model.small_size))
    labels = plan_labels(config, num_samples, guided, base_labels)
    image_size = int(config.model.image_size)
    image_shape = (image_size, image_size, 3)
    out = output_dir(config, workdir)
    return SamplingPlan(
        rows=rows,
        num_samples=num_samples,
        per_batch=per_batch,
        num_batches=math.ceil(num_samples / per_batch),
        local_examples=local_examples,
        first_local=topology.process_index * local_examples,
        image_shape=image_shape,
        labels=labels,
        low_res=low_res,
        out=out,
        merged={r: merged_path(out, r, (num_samples, *image_shape)) for r in rows},
        by_class=labels is not None and labels_lib.is_balanced(s.labels),
        manifest={
            **_manifest(
                config,
                topology,
                rows,
                model_ckpt=model_ckpt,
                classifier_ckpt=classifier_ckpt,
                labelled=labels is not None,
            ),
            **_guide_manifest(config, guide_ckpt),
            # The low-resolution inputs by content: a base file regenerated at the same path
            # is another run.
            "base_samples_sha256": (
                hashlib.sha256(np.ascontiguousarray(low_res).tobytes()).hexdigest()
                if low_res is not None
                else ""
            ),
        },
        model=_locate(model_ckpt, "model", "model"),
        classifier=_locate(classifier_ckpt, "classifier", "classifier") if guided else None,
        topology=topology,
        guide=_locate(guide_ckpt, "guide network", "model") if guide_ckpt else None,
    )
