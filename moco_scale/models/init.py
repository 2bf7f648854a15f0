"""Initial values as a function of (seed, tensor name): a model built on the meta device is materialised one
module at a time, shard by shard, with exactly the values a whole build on the CPU gets.

Each tensor draws from its own generator, seeded from the run's seed and the tensor's name inside its encoder
(the momentum encoder's twin gets the same name, hence the same value: it starts as a copy of the base). The
distributions are the reference's (MOCO_V3_SPEC.md): xavier ViT Linears (qkv per D x D block), zero biases,
cls token N(0, 1e-6), fixed 2-D sin-cos position embedding, xavier patch projection on its flattened view;
torch's default Linear/Conv init in the MLP heads and the conv stem; torchvision's ResNet init
(kaiming-normal convs, zero-init residual BN); MAE's classifier head (trunc-normal std 2e-5, bias 0).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.resnet import BasicBlock, Bottleneck

from moco_scale.models.vit import sincos_pos_embed

#: fills the tensors of one module (its direct parameters and buffers, by name) in place; called with the
#: module's key (its name inside its encoder), the module, the tensors and a generator per tensor name
Rule = Callable[[str, nn.Module, dict[str, torch.Tensor], Callable[[str], torch.Generator]], None]


def tensor_seed(seed: int, key: str) -> int:
    """A 63-bit seed for the tensor named `key` (stable across processes and machines, unlike hash())."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# -- rules: one module's tensors ------------------------------------------------------------------------
def _torch_default(t: dict[str, torch.Tensor], gen) -> None:
    """nn.Linear / nn.Conv2d reset_parameters: kaiming-uniform(a=sqrt 5), bias U(+-1/sqrt(fan_in))."""
    w = t["weight"]
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen("weight"))
    if t.get("bias") is not None:
        bound = 1 / math.sqrt(w[0].numel()) if w[0].numel() else 0.0
        nn.init.uniform_(t["bias"], -bound, bound, generator=gen("bias"))


def _batchnorm(module: nn.Module, t: dict[str, torch.Tensor], zero_weight: bool = False) -> None:
    if t.get("weight") is not None:
        (nn.init.zeros_ if zero_weight else nn.init.ones_)(t["weight"])
    for name, fill in (("bias", 0), ("running_mean", 0), ("running_var", 1), ("num_batches_tracked", 0)):
        if t.get(name) is not None:
            t[name].fill_(fill)


def _norm_or_default(module: nn.Module, t: dict[str, torch.Tensor], gen) -> bool:
    """LayerNorm / BatchNorm (ones, zeros, fresh statistics); False for any other module."""
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(t["weight"])
        nn.init.zeros_(t["bias"])
        return True
    if isinstance(module, _BatchNorm):
        _batchnorm(module, t)
        return True
    return False


def mlp_rule(name: str, module: nn.Module, t: dict[str, torch.Tensor], gen) -> None:
    """Projector and predictor: torch's defaults (the reference builds them and never re-initialises)."""
    if not _norm_or_default(module, t, gen) and isinstance(module, nn.Linear):
        _torch_default(t, gen)


def classifier_head_rule(name: str, module: nn.Module, t: dict[str, torch.Tensor], gen) -> None:
    """A fresh classifier head, as MAE initialises it: trunc-normal std 2e-5, bias 0."""
    if not _norm_or_default(module, t, gen) and isinstance(module, nn.Linear):
        nn.init.trunc_normal_(t["weight"], std=2e-5, generator=gen("weight"))
        if t.get("bias") is not None:
            nn.init.zeros_(t["bias"])


def vit_rule(name: str, module: nn.Module, t: dict[str, torch.Tensor], gen) -> None:
    """MoCo v3's ViT init (the conv stem keeps torch's defaults, as the reference leaves it)."""
    if isinstance(module, VisionTransformer):
        if t.get("cls_token") is not None:
            nn.init.normal_(t["cls_token"], std=1e-6, generator=gen("cls_token"))
        if t.get("pos_embed") is not None:
            gh, gw = module.patch_embed.grid_size
            t["pos_embed"].copy_(sincos_pos_embed(gh, gw, t["pos_embed"].shape[-1]))
    elif isinstance(module, nn.Linear):
        if name.endswith("qkv"):
            bound = math.sqrt(6.0 / (t["weight"].shape[0] / 3 + t["weight"].shape[1]))
            nn.init.uniform_(t["weight"], -bound, bound, generator=gen("weight"))
        else:
            nn.init.xavier_uniform_(t["weight"], generator=gen("weight"))
        if t.get("bias") is not None:
            nn.init.zeros_(t["bias"])
    elif isinstance(module, nn.Conv2d) and name.endswith("patch_embed.proj"):
        w = t["weight"]
        bound = math.sqrt(6.0 / (w[0].numel() + w.shape[0]))  # xavier on the (D, C*p*p) view
        nn.init.uniform_(w, -bound, bound, generator=gen("weight"))
        nn.init.zeros_(t["bias"])
    elif isinstance(module, nn.Conv2d):
        _torch_default(t, gen)
    else:
        _norm_or_default(module, t, gen)


def resnet_rule(root: nn.Module) -> Rule:
    """torchvision's ResNet init with zero_init_residual: the last BN of each residual branch starts at 0."""
    def rule(name: str, module: nn.Module, t: dict[str, torch.Tensor], gen) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(t["weight"], mode="fan_out", nonlinearity="relu", generator=gen("weight"))
        elif isinstance(module, _BatchNorm):
            parent, _, leaf = name.rpartition(".")
            block = root.get_submodule(parent) if parent else root
            last = (isinstance(block, Bottleneck) and leaf == "bn3") or (isinstance(block, BasicBlock)
                                                                         and leaf == "bn2")
            _batchnorm(module, t, zero_weight=last)
        elif isinstance(module, nn.Linear):
            _torch_default(t, gen)
    return rule


# -- applying rules ------------------------------------------------------------------------------------
class Initialisable(Protocol):
    """A model that says, for each of its modules, which rule fills it and under which key its tensors draw."""

    init_seed: int

    def init_rule(self, name: str) -> tuple[Rule, str]:
        """The rule for module `name` and its key: the name it has inside its encoder (twins share it)."""


def direct_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's own parameters and buffers (not its children's), by name."""
    return {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}


def owners(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every module that holds tensors of its own, in the model's order."""
    for name, module in model.named_modules():
        if direct_tensors(module):
            yield name, module


def fill_module(model: Initialisable, name: str, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Fill `tensors` (shaped as `module`'s own, on the CPU) with the values module `name` of `model` starts at."""
    rule, key = model.init_rule(name)

    def gen(tensor: str) -> torch.Generator:
        return torch.Generator().manual_seed(tensor_seed(model.init_seed, f"{key}.{tensor}" if key else tensor))

    with torch.no_grad():
        rule(key, module, tensors, gen)


def initial_values(model: Initialisable, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """New CPU tensors holding module `name`'s initial values (`module` may live on the meta device)."""
    tensors = {k: torch.empty(t.shape, dtype=t.dtype) for k, t in direct_tensors(module).items()}
    fill_module(model, name, module, tensors)
    return tensors


def init_weights(model: nn.Module) -> None:
    """Initialise a model that lives on the CPU in place, module by module (`model` is Initialisable)."""
    for name, module in owners(model):
        fill_module(model, name, module, {k: t.data for k, t in direct_tensors(module).items()})


def draw_seed() -> int:
    """A model seed from torch's generator: `torch.manual_seed(s)` before building fixes the model."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


class InitialState:
    """Where a model's starting values come from, one module at a time: its seed (a fresh run), or a state dict
    (a reference-format file, a pretrained backbone) with the seed for the tensors the state lacks (a new
    classifier head). Full-size CPU tensors, one module's at a time: a sharding engine keeps its slice of each.
    Shapes are taken when it is made, so it still answers once the model is sharded."""

    def __init__(self, model: Initialisable, state: dict[str, torch.Tensor] | None = None) -> None:
        self.model, self.state = model, state or {}
        self.specs = {name: {k: (t.shape, t.dtype) for k, t in direct_tensors(m).items()}
                      for name, m in owners(model)}  # type: ignore[arg-type]

    def values(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        prefix, spec = f"{name}." if name else "", self.specs[name]
        given = {k: self.state[prefix + k] for k in spec if prefix + k in self.state}
        if len(given) == len(spec):
            return given
        tensors = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in spec.items()}
        fill_module(self.model, name, module, tensors)
        return {**tensors, **given}

    def tensor(self, name: str) -> torch.Tensor:
        """The starting value of the one tensor `name` (a parameter or buffer of the model)."""
        if name in self.state:
            return self.state[name]
        owner, _, leaf = name.rpartition(".")
        return self.values(owner, self.model.get_submodule(owner))[leaf]  # type: ignore[attr-defined]
