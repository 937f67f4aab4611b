"""Checkpoints on disk, by job.

* store.py: writing and reading them: `CheckpointManager` (orbax training checkpoints: config
  fingerprint check, resumable-settings notes, disk-full reports, verified restore with a
  newest-intact fallback) and `save_params` / `read_metadata` (parameter checkpoints).
* locate.py: finding and loading them: `locate` (a path, a step folder or a workdir, by
  `WORKDIR_LAYOUT`, the one declaration of the workdir's checkpoint folders), `load_params`,
  `load_pinned`, `ema_key`.
* fingerprints.py: what identifies weights and structures: `params_fingerprint`,
  `tree_signature`, `first_difference`, `check_params_match`.

torch_file.py reads `torch.save` files without PyTorch (released checkpoints, reference training
runs, the evaluator's Inception weights).
"""
