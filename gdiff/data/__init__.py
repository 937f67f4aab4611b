"""Input: in-memory digits, the reference's image folders and TFDS ArrayRecord files (TensorFlow
lazily), all read by example index through one grain engine (`input_engine`).

`pipeline.local_batches(config, ...)` returns this process's numpy batches (an iterator with a
saved state); `pipeline.to_global` turns one into global, sharded arrays.
"""
