"""Deterministic, name-keyed weights and inputs shared by fra and the reference harness.

The golden parity fixture (``golden_fra_r18_f64.json``) is recorded by running the reference
implementation with the weights produced here, and ``tests/test_parity.py`` applies the same
function to fra's model. Every state_dict entry is drawn from a generator seeded with the CRC-32
of its *name*, so two models agree value-for-value as long as their state_dict names (and the
number of elements per tensor) agree; no weights need to be stored in the repository.

This module must import only torch, zlib and math: it is imported by the recording harness,
which runs outside this repository.
"""

import math
import zlib

import torch

#: Gain of the fan-in scaled normal init of every weight with more than one dimension
#: (about the ReLU gain, so activations neither vanish nor explode through the backbone).
GAIN = math.sqrt(2.0)

_SKIPPED_SUFFIXES = ("num_batches_tracked",)
_ALIAS_PREFIXES = ("encoder_q.",)


def _strip_module(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


def seed_key(name: str, is_parameter: bool) -> str:
    """Returns the string whose CRC-32 seeds the values of state_dict entry ``name``.

    Target-network parameters share the key of their online twin (the reference copies the
    online parameters into the target at construction); buffers keep their own name, so the
    online and target BN statistics and ``proto`` differ, as in the reference.
    """
    key = _strip_module(name)
    if is_parameter and key.startswith("target_net."):
        key = "online_net." + key[len("target_net."):]
    return key


def _generator(key: str, offset: int = 0) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(zlib.crc32(key.encode("utf-8")) + offset)
    return gen


def init_values(name: str, shape: torch.Size, is_parameter: bool) -> torch.Tensor:
    """Float64 values of state_dict entry ``name`` (without the ``module.`` prefix rules applied).

    Args:
        name: state_dict key, e.g. ``online_net.neck.proj.mlp.0.weight``.
        shape: shape of the entry; only its number of elements and fan-in matter, so a
            ``Conv1d`` weight ``[out, in, 1]`` and a ``Linear`` weight ``[out, in]`` get the
            same values.
        is_parameter: whether the entry is a parameter (as opposed to a buffer).

    Returns:
        A float64 tensor of ``shape``.
    """
    key = seed_key(name, is_parameter)
    gen = _generator(key)
    leaf = key.rsplit(".", 1)[-1]

    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    if leaf == "running_mean":
        return 0.1 * randn()
    if leaf == "running_var":
        return 1.0 + 0.2 * torch.rand(shape, generator=gen, dtype=torch.float64)
    if leaf == "center":
        return torch.zeros(shape, dtype=torch.float64)
    if leaf == "proto" or key.endswith("query_embed.weight"):
        return randn()
    if len(shape) > 1:
        fan_in = math.prod(shape[1:])
        return randn() * math.sqrt(1.0 / fan_in) * GAIN
    if "bias" in leaf:
        return 0.05 * randn()
    # 1-D weights are the affine scales of BatchNorm / LayerNorm.
    return 1.0 + 0.1 * randn()


@torch.no_grad()
def deterministic_init_(model: torch.nn.Module) -> None:
    """Overwrites every state_dict entry of ``model`` in place with name-derived values.

    ``num_batches_tracked`` counters and the ``encoder_q.`` alias of the online backbone (which
    shares storage with ``online_net.backbone.``) are left alone.

    Args:
        model: the FRA model (reference or fra); may be wrapped (``module.`` prefixes).
    """
    param_names = {_strip_module(n) for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = _strip_module(name)
        if key.endswith(_SKIPPED_SUFFIXES) or key.startswith(_ALIAS_PREFIXES):
            continue
        values = init_values(key, tensor.shape, key in param_names)
        tensor.data.copy_(values.to(tensor.dtype))


def probe(name: str, shape: torch.Size) -> torch.Tensor:
    """Fixed pseudo-random float64 tensor used to fingerprint the tensor called ``name``."""
    return torch.randn(shape, generator=_generator(_strip_module(name), 1), dtype=torch.float64)


def fingerprint(name: str, tensor: torch.Tensor) -> dict:
    """Norm, sum and probe dot product of ``tensor`` (float64), as Python floats."""
    t = tensor.detach().to(torch.float64).reshape(-1)
    p = probe(name, tensor.shape).reshape(-1)
    return {
        "norm": t.norm().item(),
        "sum": t.sum().item(),
        "dot": torch.dot(t, p).item(),
    }


def make_inputs(batch: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 standard-normal image batches ``(B, 3, size, size)`` (view 1, view 2)."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    v1 = torch.randn(batch, 3, size, size, generator=gen, dtype=torch.float64)
    v2 = torch.randn(batch, 3, size, size, generator=gen, dtype=torch.float64)
    return v1, v2
