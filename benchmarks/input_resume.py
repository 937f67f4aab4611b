"""What a resume costs the input: seconds from building the input stream to holding its first batch
at step 0 and at a late step, and how many records it read to get there (gdiff issue 26).

    python benchmarks/input_resume.py [--step 100000] [--images 256] [--size 64] [--batch 64]
                                      [--repeats 3] [--out benchmarks/logs/input_resume.json]

Two local datasets are built in a temporary folder: an image folder (PNG files, the reference's
layout) and one ArrayRecord file of the same encoded images (the format TFDS writes with
`file_format="array_record"`). Each is read through the production input engine
(gdiff/data/input_engine.py: seeded index order, this process's part of each global batch, PIL
decode, crop and flip keyed by example and epoch) at `--batch` examples per step, resumed at step 0
and at `--step` both ways a training run resumes: from the iterator state saved with the
checkpoint (`set_state`) and, for a checkpoint without one, by arithmetic from the step (`seek`).
Times are the best of `--repeats` after one warm-up; the old TFDS input skipped `step * batch`
records instead (6.4 million at the defaults).
"""

from __future__ import annotations

import argparse
import io
import pathlib
import tempfile
import time

import common
import grain
import numpy as np
from array_record.python import array_record_module
from PIL import Image

from gdiff.data import folder_source, input_engine, tfds_source


class _Counted:
    """An IndexedSource that counts the records it loads."""

    def __init__(self, source):
        self.source = source
        self.num_examples = source.num_examples
        self.loads = 0

    def load(self, i, rng):
        self.loads += 1
        return self.source.load(i, rng)


class _Records:
    """An ArrayRecord file of (int32 label, encoded image) records as TFDS data source dicts."""

    def __init__(self, path: pathlib.Path):
        self._file = grain.sources.ArrayRecordDataSource([str(path)])

    def __len__(self):
        return len(self._file)

    def __getitem__(self, i):
        raw = self._file[i]
        return {"label": int.from_bytes(raw[:4], "little"), "image": raw[4:]}


def build_datasets(root: pathlib.Path, images: int, size: int) -> dict[str, object]:
    """Writes `images` random PNGs (about 1.25 x `size` on a side, 10 classes) as a folder and as
    one ArrayRecord file; returns the two sources at `size`, cropped and flipped at random."""
    folder = root / "images"
    folder.mkdir()
    path = root / "images.array_record"
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    rng = np.random.default_rng(0)
    side = size + size // 4
    for i in range(images):
        pixels = rng.integers(0, 256, (side, side + i % 7, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        (folder / f"c{i % 10}_{i:05d}.png").write_bytes(buf.getvalue())
        writer.write((i % 10).to_bytes(4, "little") + buf.getvalue())
    writer.close()
    aug = {"random_crop": True, "random_flip": True}
    return {
        "folder": folder_source.FolderSource(str(folder), size, class_cond=True, **aug),
        "array_record": tfds_source.RecordSource(_Records(path), size, **aug),
    }


def first_batch(source, *, batch: int, step: int, how: str) -> tuple[float, int]:
    """(seconds from building the stream to its first batch at `step`, records read)."""
    counted = _Counted(source)
    start = time.perf_counter()
    stream = input_engine.batches(
        counted, local_batch=batch, seed=0, process_index=0, process_count=1, prefetch=0
    )
    if how == "state":
        # What the checkpoint of `step` holds: the state after `step` batches.
        stream.set_state(dict(stream.get_state(), grain={"next_index": step * batch}))
    else:
        stream.seek(step)
    next(stream)
    seconds = time.perf_counter() - start
    stream.close()
    return seconds, counted.loads


def main(argv=None) -> list[dict]:
    """Builds the datasets, prints each row and returns them (JSON to --out when given)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = build_datasets(pathlib.Path(tmp), args.images, args.size)
        for name, source in sources.items():
            first_batch(source, batch=args.batch, step=0, how="step")  # warm: imports, caches
            for how in ("state", "step"):
                for step in (0, args.step):
                    runs = [
                        first_batch(source, batch=args.batch, step=step, how=how)
                        for _ in range(args.repeats)
                    ]
                    seconds = min(s for s, _ in runs)
                    row = {"source": name, "resume_from": how, "step": step, "seconds": seconds}
                    rows.append({**row, "records_read": runs[0][1], "batch": args.batch})
                    print(
                        f"{name:>12} resume from {how:>5} at step {step:>9,}: first batch "
                        f"{seconds:.3f} s, {runs[0][1]} records read"
                    )
    if args.out:
        common.emit({"rows": rows, "environment": common.environment()}, args.out)
    return rows


if __name__ == "__main__":
    main()
