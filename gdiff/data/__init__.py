"""Input pipelines: in-memory digits, the reference's image folders, and TFDS (TensorFlow lazily).

`pipeline.local_batches(config, ...)` yields this process's numpy batches; `pipeline.to_global`
turns one into global, sharded arrays.
"""
