"""The one input engine (gdiff/data/input_engine.py): random access, a seeded global order, each
process its part, augmentation keyed by example and epoch, and a resume that costs the same at any
step and gives the uninterrupted run's batches bit for bit.

Datasets are built here: a folder of PNGs, an ArrayRecord file of encoded images, and TFDS's
mocked ArrayRecord data source.
"""

import io
import json
import pathlib
import subprocess
import sys
import threading
import time

import grain
import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from configs import tiny
from gdiff import distributed
from gdiff.checkpoints import input_state
from gdiff.data import digits, input_engine, pipeline, preprocess, tfds_source
from gdiff.train import diffusion_trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
LATE = 100_000  # the late resume: 800,000 examples into the stream at 8 per step


def _png(seed: int, height: int, width: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """24 PNGs of three classes (file-name prefixes) and assorted sizes."""
    root = tmp_path_factory.mktemp("images")
    for i in range(24):
        (root / f"c{i % 3}_{i:02d}.png").write_bytes(_png(i, 18 + i % 7, 30 - i % 5))
    return root


def _folder_config(root):
    config = tiny.get_config()
    config.data.source = "folder"
    config.data.folder = str(root)
    config.data.image_size = 16
    config.data.random_crop = True
    config.data.random_flip = True
    return config


def _mesh():
    return distributed.data_mesh()


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def _assert_batches_equal(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert sorted(a) == sorted(b)
        for key in a:
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])


def test_resume_gives_the_uninterrupted_batches_bit_for_bit(folder):
    config = _folder_config(folder)
    kw = {"global_batch_size": 8, "mesh": _mesh()}
    stream = pipeline.local_batches(config, **kw)
    # 3 batches of 8 are one epoch of 24: steps 3.. are the second, reshuffled epoch.
    first = _take(stream, 3)
    saved = json.loads(json.dumps(stream.get_state()))  # as the checkpoint stores it
    rest = _take(stream, 4)
    assert saved["grain"] == {"next_index": 24}
    assert sorted(np.concatenate([b["id"] for b in first])) == list(range(24))
    assert not np.array_equal(first[0]["id"], rest[0]["id"])
    from_state = pipeline.local_batches(config, start_step=3, input_state=saved, **kw)
    _assert_batches_equal(_take(from_state, 4), rest)
    # An old checkpoint without a state, or one of another stream: the step says where.
    from_step = pipeline.local_batches(config, start_step=3, **kw)
    _assert_batches_equal(_take(from_step, 4), rest)
    foreign = dict(saved, stream=dict(saved["stream"], local_batch=4))
    other = pipeline.local_batches(config, start_step=3, input_state=foreign, **kw)
    _assert_batches_equal(_take(other, 4), rest)
    # The saved state is what a resume follows (a shortcut, trusted over the step).
    ahead = pipeline.local_batches(config, start_step=3, **kw)
    ahead.set_state(dict(saved, grain={"next_index": 32}))
    _assert_batches_equal(_take(ahead, 3), rest[1:])
    for s in (stream, from_state, from_step, other, ahead):
        s.close()


def _first_batch_seconds(make, *, timeout: float) -> tuple[float, dict]:
    """Seconds from building a stream to holding its first batch; fails past `timeout` (in a
    daemon thread, so a stream that reads its way to a late step cannot hold the test up)."""
    out = {}

    def run():
        start = time.perf_counter()
        stream = make()
        out["batch"] = next(stream)
        out["seconds"] = time.perf_counter() - start
        stream.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"no first batch within {timeout:.1f} s"
    return out["seconds"], out["batch"]


def _resume_times(make, timeout_floor: float = 20.0) -> tuple[float, float, dict]:
    """(best of 3 seconds to the first batch at step 0, at step LATE, the LATE batch)."""
    _first_batch_seconds(lambda: make(0), timeout=120)  # warm: imports, file lists
    early = min(_first_batch_seconds(lambda: make(0), timeout=60)[0] for _ in range(3))
    bound = 3 * early + 2
    late, batch = min(
        (_first_batch_seconds(lambda: make(LATE), timeout=max(bound, timeout_floor)))
        for _ in range(3)
    )
    print(f"first batch: step 0 {early:.3f} s, step {LATE:,} {late:.3f} s")
    assert late < bound, (early, late)
    return early, late, batch


def test_a_late_resume_costs_what_step_0_costs_on_a_folder(folder):
    config = _folder_config(folder)
    kw = {"global_batch_size": 8, "mesh": _mesh()}
    state = pipeline.local_batches(config, start_step=LATE, **kw).get_state()
    assert state["grain"] == {"next_index": 8 * LATE}

    def make(step):
        saved = state if step == LATE else None
        return pipeline.local_batches(config, start_step=step, input_state=saved, **kw)

    _, _, batch = _resume_times(make)
    # It is the uninterrupted run's batch LATE: its examples, each augmented with its own key.
    ids = pipeline.batch_indices(24, step=LATE, local_batch=8, seed=config.seed, process_index=0,
                                 process_count=1)  # fmt: skip
    np.testing.assert_array_equal(batch["id"], ids)
    source = pipeline._indexed_source(
        config.data, "train", train=True, random_crop=True, random_flip=True
    )
    epoch = (8 * LATE) // 24
    for row, i in enumerate(ids):
        image, label = source.load(int(i), input_engine.augmentation_rng(config.seed, i, epoch))
        np.testing.assert_array_equal(batch["image"][row], image)
        assert batch["label"][row] == label


def test_a_late_resume_costs_what_step_0_costs_on_tfds():
    """The TFDS path (the one that used to skip start_step * batch records)."""
    import tensorflow_datasets as tfds

    config = tiny.get_config()
    config.data.source = "tfds"
    config.data.name = "mnist"
    kw = {"global_batch_size": 8, "mesh": _mesh()}
    with tfds.testing.mock_data(num_examples=64):
        _resume_times(lambda step: pipeline.local_batches(config, start_step=step, **kw))


class _Records:
    """An ArrayRecord file of (int32 label, encoded image) records as the dicts TFDS's data
    source returns: random access by index."""

    def __init__(self, path):
        self._file = grain.sources.ArrayRecordDataSource([str(path)])

    def __len__(self):
        return len(self._file)

    def __getitem__(self, i):
        raw = self._file[i]
        return {"label": int.from_bytes(raw[:4], "little"), "image": raw[4:]}


@pytest.fixture(scope="module")
def array_record(tmp_path_factory):
    path = tmp_path_factory.mktemp("records") / "images.array_record"
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for i in range(20):
        writer.write((i % 5).to_bytes(4, "little") + _png(100 + i, 20 + i % 3, 24))
    writer.close()
    return path


def test_array_record_source_gives_the_references_pixels_and_host_parts(array_record):
    source = tfds_source.RecordSource(_Records(array_record), 16, random_flip=True)
    assert source.num_examples == 20
    seed = 5

    def stream(process_index=0, process_count=1, local_batch=8):
        return input_engine.batches(
            source,
            local_batch=local_batch,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )

    whole = _take(stream(), 5)  # two epochs of 20, and then some
    flips = []
    for batch, step in zip(whole, range(5), strict=True):
        for row, i in enumerate(batch["id"]):
            epoch = (step * 8 + row) // 20
            raw = _Records(array_record)[int(i)]
            with Image.open(io.BytesIO(raw["image"])) as image:  # the reference's decoding
                want = preprocess.center_crop_arr(image.convert("RGB"), 16)
            flip = input_engine.augmentation_rng(seed, i, epoch).random() < 0.5
            flips.append(flip)
            want = want[:, ::-1] if flip else want
            np.testing.assert_array_equal(batch["image"][row], preprocess.to_unit_range(want))
            assert batch["label"][row] == int(i) % 5
    assert any(flips) and not all(flips)
    # Two processes read rows 0..3 and 4..7 of every global batch of 8: the same global batches.
    parts = [_take(stream(p, 2, 4), 5) for p in range(2)]
    for s in range(5):
        for key in ("image", "label", "id"):
            joined = np.concatenate([parts[0][s][key], parts[1][s][key]])
            np.testing.assert_array_equal(joined, whole[s][key])
    late = stream()
    late.seek(LATE)
    assert late.get_state()["grain"] == {"next_index": 8 * LATE}
    resumed = next(late)
    ids = pipeline.batch_indices(20, step=LATE, local_batch=8, seed=seed, process_index=0,
                                 process_count=1)  # fmt: skip
    np.testing.assert_array_equal(resumed["id"], ids)


def test_training_saves_the_input_state_and_resumes_from_it(tmp_path, monkeypatch):
    config = tiny.get_config()
    config.train.num_steps = 3
    config.train.save_every = 2
    config.train.log_every = 1
    config.train.progress = False
    diffusion_trainer.train(config, str(tmp_path), stop_at_step=2)
    checkpoints = tmp_path / "checkpoints"
    saved = input_state.load(checkpoints, 2)
    batch = distributed.local_batch_size(config.train.batch_size)
    assert saved["grain"] == {"next_index": 2 * batch} and saved["stream"]["local_batch"] == batch
    # The resumed run follows the saved state: moved one batch on, it reads step 3's examples.
    moved = dict(saved, grain={"next_index": 3 * batch})
    input_state.save(checkpoints, 2, moved, oldest_kept=2)
    seen = []
    original = pipeline.to_global

    def to_global(local, mesh):
        seen.append(local["id"])
        return original(local, mesh)

    monkeypatch.setattr(pipeline, "to_global", to_global)
    diffusion_trainer.train(config, str(tmp_path))
    n = digits.DigitsSource("train", 8).num_examples
    ids = pipeline.batch_indices(n, step=3, local_batch=batch, seed=config.seed,
                                 process_index=0, process_count=1)  # fmt: skip
    np.testing.assert_array_equal(seen[0], ids)
    assert input_state.load(checkpoints, 3)["grain"] == {"next_index": 4 * batch}


def test_the_benchmark_reports_one_batch_read_at_any_step(tmp_path):
    out = tmp_path / "input_resume.json"
    args = ["--step", str(LATE), "--images", "16", "--size", "16", "--batch", "8", "--repeats", "1"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "input_resume.py"), *args, "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["source"], r["resume_from"], r["step"]) for r in rows} == {
        (s, h, step)
        for s in ("folder", "array_record")
        for h in ("state", "step")
        for step in (0, LATE)
    }
    assert all(r["records_read"] == 8 for r in rows)
