"""Input pipelines: digits, image folders, TFDS (mocked), reference preprocessing, sharding."""

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from gdiff import distributed
from gdiff.data import digits, folder_source, pipeline, preprocess, tfds_source


def _mesh():
    return distributed.data_mesh()


def test_digits_batches_are_a_pure_function_of_seed_and_step():
    config = tiny.get_config()
    config.data.image_size = 16
    mesh = _mesh()
    a = pipeline.local_batches(config, global_batch_size=16, mesh=mesh, start_step=0)
    first = [next(a) for _ in range(4)]
    b = next(pipeline.local_batches(config, global_batch_size=16, mesh=mesh, start_step=3))
    np.testing.assert_array_equal(first[3]["image"], b["image"])
    np.testing.assert_array_equal(first[3]["label"], b["label"])
    assert not np.array_equal(first[0]["id"], first[1]["id"])
    x = first[0]["image"]
    assert x.shape == (16, 16, 16, 3) and x.dtype == np.float32
    # 17 grey levels 0..16 -> [-1, 1], grey repeated to 3 channels, pixel-repeated upsampling.
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_allclose(
        np.unique(x * 8 + 8), np.arange(17)[np.isin(np.arange(17), np.unique(x * 8 + 8))]
    )
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    np.testing.assert_array_equal(x[:, ::2, ::2], x[:, 1::2, 1::2])
    # The labels are the digits' own targets.
    images, targets = digits._load()
    np.testing.assert_array_equal(
        first[0]["label"], targets[digits._split_indices("train", len(targets))[first[0]["id"]]]
    )
    np.testing.assert_allclose(
        x[0, ::2, ::2, 0],
        images[digits._split_indices("train", len(targets))[first[0]["id"][0]]] / 8 - 1,
    )


def test_digits_train_and_heldout_splits_are_disjoint():
    train = digits.DigitsSource("train", 8)
    val = digits.DigitsSource("validation", 8)
    assert len(set(train.indices) & set(val.indices)) == 0
    assert train.num_examples + val.num_examples == 1797


def test_process_shards_are_disjoint_and_cover_an_epoch():
    n, b = 40, 5
    seen = []
    for p in range(2):
        ids = np.concatenate(
            [
                pipeline.batch_indices(
                    n, step=s, local_batch=b, seed=1, process_index=p, process_count=2
                )
                for s in range(4)
            ]
        )
        assert len(set(ids)) == 20  # its half of one epoch, no repeats
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(n))  # together: the whole epoch
    # Process p reads rows p * b .. of every global batch: the one-process global batch.
    for s in range(4):
        parts = [
            pipeline.batch_indices(
                n, step=s, local_batch=b, seed=1, process_index=p, process_count=2
            )
            for p in range(2)
        ]
        whole = pipeline.batch_indices(
            n, step=s, local_batch=2 * b, seed=1, process_index=0, process_count=1
        )
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_reference_preprocessing_box_then_bicubic_then_center_crop():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(60, 100, 3), dtype=np.uint8)  # H=60, W=100
    got = preprocess.center_crop_arr(Image.fromarray(arr), 16)
    # By hand: 60 >= 32 -> BOX-halve to 50x30; 30 < 32 stop; BICUBIC to short side 16 (27x16).
    img = Image.fromarray(arr).resize((50, 30), resample=Image.BOX)
    img = img.resize((round(50 * 16 / 30), 16), resample=Image.BICUBIC)
    want = np.asarray(img)[:, (27 - 16) // 2 : (27 - 16) // 2 + 16]
    np.testing.assert_array_equal(got, want)
    out = preprocess.preprocess_image(arr, 16, rng=np.random.default_rng(0), random_flip=False)
    np.testing.assert_allclose(out, want.astype(np.float32) / 127.5 - 1)


def test_random_crop_and_flip_are_seeded():
    arr = np.random.default_rng(1).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    kw = {"random_crop": True, "random_flip": True}
    a = preprocess.preprocess_image(arr, 16, rng=np.random.default_rng(5), **kw)
    b = preprocess.preprocess_image(arr, 16, rng=np.random.default_rng(5), **kw)
    np.testing.assert_array_equal(a, b)
    outs = {
        preprocess.preprocess_image(arr, 16, rng=np.random.default_rng(s), **kw).tobytes()
        for s in range(8)
    }
    assert len(outs) > 1
    grey = preprocess.preprocess_image(arr[..., 0], 16, rng=np.random.default_rng(0))
    assert grey.shape == (16, 16, 3)


def test_folder_source_reads_reference_layout(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    names = ["dog_1.png", "cat_2.png", "sub/cat_3.jpg", "sub/emu_x_4.png", "notes.txt"]
    for name in names[:-1]:
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    src = folder_source.FolderSource(
        str(tmp_path), 8, class_cond=True, num_classes=10, random_flip=False
    )
    assert src.classes == ["cat", "dog", "emu"]
    assert src.num_examples == 4
    labels = {pathlib_name(f): int(y) for f, y in zip(src.files, src.labels, strict=True)}
    assert labels == {"cat_2.png": 0, "dog_1.png": 1, "cat_3.jpg": 0, "emu_x_4.png": 2}
    x, y = src.load(0, np.random.default_rng(0))
    assert x.shape == (8, 8, 3) and -1 <= x.min() and x.max() <= 1
    config = tiny.get_config()
    config.data.source = "folder"
    config.data.folder = str(tmp_path)
    batch = next(pipeline.local_batches(config, global_batch_size=8, mesh=_mesh()))
    assert batch["image"].shape == (8, 8, 8, 3)
    assert set(batch["label"]) <= {0, 1, 2}
    with pytest.raises(ValueError, match="more than data.num_classes=2"):
        folder_source.FolderSource(str(tmp_path), 8, class_cond=True, num_classes=2)


def pathlib_name(path):
    import os

    return os.path.basename(path)


def test_unknown_dataset_and_source_raise_clear_errors():
    config = tiny.get_config()
    config.data.source = "tfds"
    config.data.name = "imagenet_typo"
    with pytest.raises(ValueError, match="imagenet_typo.*imagenet2012.*cifar10.*mnist"):
        pipeline.check_data_config(config)
    config.data.source = "webdataset"
    with pytest.raises(ValueError, match="unknown data.source='webdataset'.*digits, tfds, folder"):
        pipeline.check_data_config(config)
    with pytest.raises(ValueError, match="power of two"):
        digits.DigitsSource("train", 12)
    with pytest.raises(ValueError, match="lsun/church_outdoor has no class labels"):
        tfds_source.open_source("lsun/church_outdoor", split="train", image_size=8, class_cond=True)
    for name in (
        "imagenet2012",
        "imagenet_resized/64x64",
        "lsun/bedroom",
        "cifar10",
        "mnist:3.0.1",
    ):
        assert tfds_source.check_name(name) == name


def test_tfds_pipeline_on_mock_data_shards_per_process():
    import tensorflow_datasets as tfds  # a requirement: a missing install fails, not skips

    config = tiny.get_config()
    config.data.source = "tfds"
    config.data.name = "mnist"
    config.data.shuffle_buffer = 16
    with tfds.testing.mock_data(num_examples=64):
        it = pipeline.local_batches(config, global_batch_size=8, mesh=_mesh())
        batches = [next(it) for _ in range(3)]
        # Resume: starting at step 2 gives the batch an uninterrupted stream gives at step 2.
        resumed = next(
            pipeline.local_batches(config, global_batch_size=8, mesh=_mesh(), start_step=2)
        )
    x = batches[0]["image"]
    assert x.shape == (8, 8, 8, 3) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(x[..., 0], x[..., 1])  # grey repeated to RGB
    assert batches[0]["label"].dtype == np.int32 and batches[0]["label"].max() < 10
    np.testing.assert_array_equal(resumed["image"], batches[2]["image"])
    # Each process reads its own part of the split.
    split = [
        tfds.split_for_jax_process("train", process_index=p, process_count=2) for p in range(2)
    ]
    assert split[0] != split[1]
