r"""Which kind of parameter each tensor is, read from the module tree.

Muon's recipe (Jordan et al. 2024, the KellerJordan/Muon README; ``torch.optim.Muon``'s
documentation; modded-nanogpt) and the SignMuon code keep embeddings, the output head,
norms and biases out of the matrix (LMO) group; Scion (Pethick et al. 2025) gives them
LMOs of their own.  Both need to know what a tensor *is*, which its number of
dimensions does not say: a token embedding is as 2-D as an attention weight.
:func:`parameter_roles` assigns every parameter one role:

=============  ===============================================================
role           what
=============  ===============================================================
``embedding``  the weight of an ``nn.Embedding`` / ``nn.EmbeddingBag`` (a head tied
               to it is the same tensor, so it is an embedding too)
``head``       the output projection: the last ``nn.Linear`` registered in the
               module tree (``lm_head``, a classifier's last layer), unless it is tied
``norm``       parameters of normalisation layers (LayerNorm, RMSNorm, GroupNorm,
               BatchNorm, InstanceNorm, or any module whose class name ends in ``Norm``)
``bias``       other parameters named ``*bias`` with fewer than 2 dimensions
``vector``     other parameters with fewer than 2 dimensions (gates, scalars)
``hidden``     everything else: the matrices (and conv kernels) of the body
=============  ===============================================================

Without a module (a list of tensors or of ``(name, tensor)`` pairs) roles fall
back to the number of dimensions: ``hidden`` for 2-D and more, ``vector`` (or
``bias`` by name) below.  A module can override any role with a
``commlmo_roles`` attribute mapping parameter names to roles.

:func:`parameter_views` reads, the same way, how a matrix LMO should see each
tensor (used by groups whose ``view`` is ``auto``, the default):

* ``nn.MultiheadAttention.in_proj_weight`` is a fused ``[3E, E]`` QKV weight: 3 blocks;
* a tensor of 3 or more dimensions outside a convolution (an MoE expert stack
  ``[E, m, n]``) is a stack of independent matrices;
* a model's ``commlmo_blocks`` attribute, ``{name glob: B}``, declares fused weights
  of its own (the GPT task's ``c_attn``: 3; a merged qkvo weight: 4);
* everything else (conv kernels included, viewed ``out x in*kh*kw``) is one matrix.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

__all__ = ["Role", "ROLES", "parameter_roles", "parameter_views", "role_by_shape"]

Role = Literal["hidden", "embedding", "head", "norm", "bias", "vector"]
ROLES: tuple[str, ...] = ("hidden", "embedding", "head", "norm", "bias", "vector")

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
if hasattr(nn, "RMSNorm"):
    _NORMS = (*_NORMS, nn.RMSNorm)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or type(module).__name__.endswith("Norm")


def role_by_shape(name: str, tensor: Tensor) -> str:
    """The role of a tensor known only by its name and shape."""
    if tensor.ndim >= 2:
        return "hidden"
    return "bias" if name.rsplit(".", 1)[-1].endswith("bias") else "vector"


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """``{qualified parameter name: role}`` for every parameter ``model.named_parameters()`` yields."""
    by_id: dict[int, str] = {}
    embeddings: set[int] = set()
    linears: list[nn.Linear] = []
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            embeddings.add(id(module.weight))
        elif isinstance(module, nn.Linear):
            linears.append(module)
        if _is_norm(module):
            for p in module.parameters(recurse=False):
                by_id.setdefault(id(p), "norm")
    for e in embeddings:
        by_id[e] = "embedding"
    if linears and id(linears[-1].weight) not in embeddings:
        by_id.setdefault(id(linears[-1].weight), "head")
    overrides = getattr(model, "commlmo_roles", {}) or {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters():
        role = overrides.get(name) or by_id.get(id(p)) or role_by_shape(name, p)
        if role not in ROLES:
            raise ValueError(f"commlmo_roles[{name!r}] = {role!r}: roles are {', '.join(ROLES)}")
        out[name] = role
    return out


_CONVS = (nn.modules.conv._ConvNd,)


def parameter_views(model: nn.Module) -> dict[str, dict]:
    """``{name: {"kind": "blocks", "blocks": B} | {"kind": "stack"}}`` for the tensors that are not one matrix."""
    import fnmatch

    conv_params: set[int] = set()
    by_id: dict[int, dict] = {}
    for module in model.modules():
        if isinstance(module, _CONVS):
            conv_params.update(id(p) for p in module.parameters(recurse=False))
        if isinstance(module, nn.MultiheadAttention) and getattr(module, "in_proj_weight", None) is not None:
            by_id[id(module.in_proj_weight)] = {"kind": "blocks", "blocks": 3}
    declared = getattr(model, "commlmo_blocks", {}) or {}
    out: dict[str, dict] = {}
    for name, p in model.named_parameters():
        view = next(({"kind": "blocks", "blocks": int(b)} for pat, b in declared.items()
                     if fnmatch.fnmatchcase(name, pat)), None) or by_id.get(id(p))
        if view is None and p.ndim >= 3 and id(p) not in conv_params:
            view = {"kind": "stack"}
        if view is not None:
            out[name] = view
    return out
