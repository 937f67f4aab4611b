"""The sampling plan: batch arithmetic, labels, super-resolution inputs, checkpoints, bad input.

`plan.make_plan` does no device work, so these tests build plans for topologies this machine does
not have (two processes, four devices each) and check the numbers directly.
"""

import numpy as np
import pytest

from configs import tiny as tiny_config
from gdiff.checkpoints import locate, store
from gdiff.sampling import plan as plan_lib

ONE_HOST = plan_lib.Topology(num_devices=8, local_devices=8)
# Process 1 of 2, four devices each.
SECOND_HOST = plan_lib.Topology(num_devices=8, local_devices=4, process_index=1, process_count=2)


def _params_dir(path):
    """A stand-in `save_params` checkpoint: `locate` needs only its metadata file."""
    path.mkdir(parents=True)
    (path / store.METADATA_FILE).write_text("{}")
    return path


@pytest.fixture
def workdir(tmp_path):
    _params_dir(tmp_path / "model_params")
    _params_dir(tmp_path / "cls")
    return tmp_path


def _config(workdir, **sample):
    # Plain values instead of the common config's references, so one group can differ.
    config = tiny_config.get_config().copy_and_resolve_references()
    s = config.sample
    s.num_samples = 10
    s.batch_size = 1
    s.classifier_scale = "0,2"
    s.labels = "balanced"
    s.classifier_checkpoint = str(workdir / "cls")
    for k, v in sample.items():
        s[k] = v
    return config


def test_batches_split_over_devices_and_processes(workdir):
    one = plan_lib.make_plan(_config(workdir), str(workdir), ONE_HOST)
    assert (one.per_batch, one.num_batches, one.local_examples, one.first_local) == (8, 2, 8, 0)
    assert [one.batch_examples(b) for b in range(2)] == [8, 2]  # the last batch is trimmed
    np.testing.assert_array_equal(one.local_ids(1), np.arange(8, 16))

    two = plan_lib.make_plan(_config(workdir, batch_size=3), str(workdir), SECOND_HOST)
    assert (two.per_batch, two.num_batches, two.local_examples, two.first_local) == (24, 1, 12, 12)
    np.testing.assert_array_equal(two.local_ids(0), np.arange(12, 24))
    assert two.manifest["process_count"] == 2 and two.manifest["examples_per_batch"] == 24
    assert two.topology is SECOND_HOST


def test_batch_rows_repeat_each_example_once_per_scale(workdir):
    plan = plan_lib.make_plan(_config(workdir), str(workdir), SECOND_HOST)
    assert plan.scales == (0.0, 2.0)
    rows = plan.batch_rows(1)
    ids = np.array([12, 13, 14, 15])  # batch 1, process 1: ids 10.. are past num_samples
    np.testing.assert_array_equal(rows["ids"], np.tile(ids, 2))
    np.testing.assert_array_equal(rows["labels"], np.tile(ids % 10 % 10, 2))
    np.testing.assert_array_equal(rows["scales"], [0, 0, 0, 0, 2, 2, 2, 2])
    assert {k: v.dtype for k, v in rows.items()} == {
        "ids": np.int32,
        "labels": np.int32,
        "scales": np.float32,
    }


def test_outputs_manifest_and_checkpoints(workdir):
    plan = plan_lib.make_plan(_config(workdir), str(workdir), ONE_HOST)
    assert plan.out == workdir / "samples"
    assert plan.merged == {
        0.0: workdir / "samples" / "scale_0" / "samples_10x8x8x3.npz",
        2.0: workdir / "samples" / "scale_2" / "samples_10x8x8x3.npz",
    }
    assert plan.image_shape == (8, 8, 3) and plan.by_class
    assert plan.model == locate.Location(workdir / "model_params", "params", None)
    assert plan.classifier == locate.Location(workdir / "cls", "params", None)
    m = plan.manifest
    assert m["model_checkpoint"] == str(workdir) and m["classifier_checkpoint"] == str(
        workdir / "cls"
    )
    assert (m["num_samples"], m["labels"], m["image_shape"], m["base_samples"]) == (
        10,
        "balanced",
        [8, 8, 3],
        "",
    )

    # Unguided: no classifier is located (nor recorded), even when one is named.
    plan = plan_lib.make_plan(_config(workdir, classifier_scale="0"), str(workdir), ONE_HOST)
    assert plan.classifier is None and plan.manifest["classifier_checkpoint"] == ""

    # A classifier trained in the workdir is found there; the newest finished step is restored.
    for step in ("20", "40", "60.orbax-checkpoint-tmp-3"):
        (workdir / "classifier_checkpoints" / step).mkdir(parents=True)
    plan = plan_lib.make_plan(_config(workdir, classifier_checkpoint=""), str(workdir), ONE_HOST)
    assert plan.classifier == locate.Location(workdir / "classifier_checkpoints", "training", 40)
    assert plan.manifest["classifier_checkpoint"] == str(workdir)


def test_labels_for_conditional_guided_and_unconditional_runs(workdir):
    def labels(**kw):
        config = _config(workdir, **{k: v for k, v in kw.items() if k != "model"})
        for k, v in kw.get("model", {}).items():
            config.model[k] = v
        return plan_lib.make_plan(config, str(workdir), ONE_HOST).labels

    np.testing.assert_array_equal(labels(), np.arange(10) % 10)
    assert labels().dtype == np.int32
    np.testing.assert_array_equal(labels(labels="3,7"), [3, 7] * 5)
    # Unconditional and unguided: no labels at all.
    assert labels(model={"class_cond": False}, classifier_scale="0") is None
    # Unconditional but guided: the classifier's classes.
    np.testing.assert_array_equal(
        labels(model={"class_cond": False, "num_classes": 1000}), np.arange(10) % 10
    )
    # Both read them: only classes both know.
    np.testing.assert_array_equal(labels(model={"num_classes": 4}), np.arange(10) % 4)
    # Random labels depend on the seed and the count only, not on the devices.
    config = _config(workdir, labels="random", seed=5)
    a = plan_lib.make_plan(config, str(workdir), ONE_HOST).labels
    b = plan_lib.make_plan(config, str(workdir), SECOND_HOST).labels
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, labels(labels="random", seed=6))


def _super_res(workdir, base_labels, **model):
    config = _config(workdir, classifier_scale="0", num_samples=7)
    config.model.small_size = 4
    for k, v in model.items():
        config.model[k] = v
    images = np.arange(3 * 4 * 4 * 3, dtype=np.uint8).reshape(3, 4, 4, 3)
    arrays = {"arr_0": images} if base_labels is None else {"arr_0": images, "arr_1": base_labels}
    np.savez(workdir / "base.npz", **arrays)
    config.sample.base_samples = str(workdir / "base.npz")
    return config, images


def test_super_resolution_follows_its_base_samples(workdir):
    config, images = _super_res(workdir, np.array([4, 0, 7]))
    plan = plan_lib.make_plan(config, str(workdir), ONE_HOST)
    np.testing.assert_array_equal(plan.labels, np.array([4, 0, 7])[np.arange(7) % 3])
    assert plan.manifest["base_samples"] == str(workdir / "base.npz")
    # Eight rows; the eighth (id 7) is past num_samples, drawn but never written: it takes base
    # image 7 % 3 and the label of example 7 % 7.
    rows = plan.batch_rows(0)
    np.testing.assert_array_equal(
        rows["low_res"], images[np.arange(8) % 3].astype(np.float32) / 127.5 - 1.0
    )
    np.testing.assert_array_equal(rows["labels"], [4, 0, 7, 4, 0, 7, 4, 4])

    # An unconditional upsampler ignores the base labels.
    config, _ = _super_res(workdir, np.array([4, 0, 7]), class_cond=False)
    assert plan_lib.make_plan(config, str(workdir), ONE_HOST).labels is None
    config, _ = _super_res(workdir, np.array([4, 10, 7]))
    with pytest.raises(ValueError, match=r"labels \[10\] outside the model's classes 0\.\.9"):
        plan_lib.make_plan(config, str(workdir), ONE_HOST)
    config, _ = _super_res(workdir, None)
    with pytest.raises(ValueError, match="no labels"):
        plan_lib.make_plan(config, str(workdir), ONE_HOST)


def test_bad_input_is_refused_before_anything_is_written(workdir, tmp_path):
    def refused(error, match, **sample):
        with pytest.raises(error, match=match):
            plan_lib.make_plan(_config(workdir, **sample), str(workdir), ONE_HOST)

    refused(ValueError, "num_samples must be positive; got 0", num_samples=0)
    refused(ValueError, r"batch_size \(per device\) must be positive", batch_size=0)
    refused(ValueError, "repeats", classifier_scale="1,1")
    refused(ValueError, r"label\(s\) \[12\] outside", labels="3,12")
    refused(ValueError, "set sample.classifier_checkpoint", classifier_checkpoint="")
    refused(
        FileNotFoundError,
        "cannot load the model from .*nowhere.*does not exist",
        model_checkpoint=str(tmp_path / "nowhere"),
    )
    refused(
        FileNotFoundError,
        "cannot load the classifier from .*: no classifier checkpoint",
        classifier_checkpoint=str(tmp_path),
    )
    assert not (workdir / "samples").exists()
