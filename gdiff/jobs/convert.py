"""`--mode=convert`: a released PyTorch checkpoint -> a gdiff parameter checkpoint.

    python main.py --mode=convert --config configs/released/imagenet64.py \
        --workdir workdir/imagenet64 --config.torch_checkpoint=models/64x64_diffusion.pt

reads `config.torch_checkpoint` (no PyTorch needed), builds the network `config.convert_target`
names ("model" or "classifier") from the config, checks every name and shape, and writes
`<workdir>/<target>_params` (`gdiff.checkpoints.locate.params_dir`) with
`gdiff.checkpoints.store.save_params`, where `--mode=sample` finds it.
"""

import os
import pathlib

from absl import logging

from gdiff import errors, factory
from gdiff.checkpoints import locate, store, torch_file
from gdiff.compat import convert


def run(config, workdir: str | os.PathLike, *, overwrite: bool | None = None) -> pathlib.Path:
    """Converts `config.torch_checkpoint` and saves it under `workdir`.

    Returns:
      The written parameter checkpoint directory (`<workdir>/model_params` or
      `<workdir>/classifier_params`).

    Raises:
      errors.ConfigError (a ValueError): no checkpoint path, or an unknown target.
      errors.MissingInputError (a FileNotFoundError): the checkpoint path does not exist or is a
        directory (checked before the network is built).
      errors.InputError (a ValueError): the file is not a torch checkpoint (or is truncated).
      ValueError: a checkpoint that does not match the config's architecture (the message lists
        every offending layer with both shapes).
      FileExistsError: the output exists and neither `overwrite` nor `config.convert_overwrite`
        allows replacing it (checked before the file is read).
    """
    path = str(config.torch_checkpoint)
    if not path:
        raise errors.ConfigError(
            "--mode=convert needs --config.torch_checkpoint=<released .pt file>"
        )
    if not os.path.exists(path):
        raise errors.MissingInputError(
            f"config.torch_checkpoint {path} does not exist: give the path of the released .pt "
            "file (--config.torch_checkpoint=PATH)"
        )
    if os.path.isdir(path):
        raise errors.MissingInputError(
            f"config.torch_checkpoint {path} is a directory: give the path of the released .pt "
            "file itself (--config.torch_checkpoint=PATH)"
        )
    target = str(config.convert_target)
    if target == "model":
        module = factory.build_model(config)
    elif target == "classifier":
        module = factory.build_classifier(config)
    else:
        raise errors.ConfigError(
            f"config.convert_target must be 'model' or 'classifier', got {target!r}"
        )

    out = pathlib.Path(workdir) / locate.params_dir(target)
    overwrite = bool(config.convert_overwrite) if overwrite is None else overwrite
    if out.exists() and not overwrite:
        # Checked before the (large) file is read; the finished checkpoint stays as it is.
        raise errors.OutputExistsError(
            f"{out} already holds a converted checkpoint; refusing to replace it. Rerun with "
            "--config.convert_overwrite=true to replace it, or use another --workdir"
        )
    logging.info("reading %s", path)
    state_dict = torch_file.load_torch_state_dict(path)
    variables = convert.convert_state_dict(
        module, state_dict, image_size=int(config.model.image_size)
    )
    metadata = {
        "source": os.path.abspath(path),
        "convert_target": target,
        "module": type(module).__name__,
        "num_params": factory.param_count(module, image_size=int(config.model.image_size)),
        "model": config.model.to_dict() if target == "model" else None,
        "classifier": config.classifier.to_dict() if target == "classifier" else None,
    }
    written = store.save_params(out, variables["params"], metadata=metadata, overwrite=overwrite)
    logging.info("wrote %s (%d parameters)", written, metadata["num_params"])
    return written
