"""What a checkpoint says about itself: the settings it was trained with, checked before use.

A training checkpoint directory holds `gdiff_config.json`, the trainer's fingerprint
(gdiff/train/task.py `fingerprint`): the `diffusion` group, the image size and the network's
group (`model` or `classifier`). Weight shapes alone do not tell a model trained on a cosine
schedule of 100 steps from one configured for a linear schedule of 1000, nor 8x8 from 16x16 (a
UNet's parameters do not depend on the image size), so every mode that loads weights compares
these settings with its config and refuses, naming each differing key, instead of sampling or
scoring silently wrong. The config is never changed behind the user's back: to use a checkpoint,
set the keys it names to the trained values.

Parameter checkpoints (`store.save_params`: converted released weights, the digits job's
evaluation network) record no training config; there is nothing to compare.
"""

from __future__ import annotations

import json
from typing import Any

from gdiff import errors, treediff
from gdiff.checkpoints import locate, store

# Diffusion keys that do not change what a trained network means at sampling or bits/dim time:
# the respacing is the sampler's own choice, and the other two only shape the training loss.
LOSS_ONLY_DIFFUSION_KEYS = ("timestep_respacing", "use_kl", "rescale_learned_sigmas")
# Network keys that describe how the network computes or trains, not what it computes.
# (`class_dropout` is compared: > 0 trains a null class, one more label_emb row. A recorded group
# lacks it when it was 0, or written before it existed; only recorded keys are compared.)
RUNTIME_NETWORK_KEYS = ("dtype", "attention_impl", "remat", "use_checkpoint", "dropout")


def recorded(location: locate.Location) -> dict[str, Any] | None:
    """The trainer's fingerprint of a training checkpoint (None for other formats)."""
    if location.format != "training":
        return None
    path = location.path / store.CONFIG_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _plain(tree: Any) -> Any:
    return json.loads(json.dumps(tree, sort_keys=True, default=str))


def differences(
    trained: dict[str, Any], *, network: str, config_network: dict, diffusion: dict, image_size: int
) -> list[str]:
    """`group.key: trained ..., configured ...` for every setting the config states otherwise.

    Args:
      trained: `recorded(...)`, the trainer's fingerprint.
      network: the network's group name in both ("model" or "classifier").
      config_network, diffusion: the config's groups (dicts).
      image_size: the image size the config samples or scores at.
    """

    def comparable(stored: dict, configured: dict, ignore: tuple[str, ...]):
        keys = [k for k in stored if k not in ignore]
        configured = _plain(configured)
        return {k: stored[k] for k in keys}, {k: configured.get(k, treediff.MISSING) for k in keys}

    old_diff, new_diff = comparable(
        trained.get("diffusion") or {}, diffusion, LOSS_ONLY_DIFFUSION_KEYS
    )
    old_net, new_net = comparable(trained.get(network) or {}, config_network, RUNTIME_NETWORK_KEYS)
    old = {"diffusion": old_diff, network: old_net}
    new = {"diffusion": new_diff, network: new_net}
    if "image_size" in trained:
        old["data"], new["data"] = {"image_size": trained["image_size"]}, {"image_size": image_size}
    return [
        f"{key}: trained {a!r}, configured {b!r}" for key, a, b in treediff.changed_keys(old, new)
    ]


def check_trained_settings(
    location: locate.Location, network: str, config_network, diffusion, image_size: int
) -> None:
    """Refuses weights trained with other diffusion, image or network settings than the config's.

    Args:
      location: the checkpoint found (`locate.locate`); only training checkpoints record settings.
      network: "model" or "classifier": the group recorded and the one given.
      config_network, diffusion: the config's groups (ConfigDicts or dicts).
      image_size: the image size the config samples or scores at.

    Raises:
      errors.ConfigMismatchError: naming every differing key with both values and what to set.
    """
    trained = recorded(location)
    if trained is None:
        return
    diff = differences(
        trained,
        network=network,
        config_network=dict(config_network),
        diffusion=dict(diffusion),
        image_size=int(image_size),
    )
    if diff:
        first = diff[0].split(":")[0]
        raise errors.ConfigMismatchError(
            f"the {network} in {location.path} was trained with other settings than this config "
            f"states ({'; '.join(diff)}); refusing to use it with them. Set the config to the "
            f"trained values (e.g. --config.{first}=<trained value>), or give another checkpoint"
        )
