"""Migration policies as values, and the registry of the named ones.

`make(name, options)` (or `get(name, **options)`) returns the `Policy`
(base.py) the round runs. Adding a policy is one recipe file, one line in
`REGISTRY` and one row in the policy tests; nothing else in the package
tests a policy's name.
"""

from __future__ import annotations

from fedjax_tl.policies.base import Options, Policy, ServerPrep, Slot, Upload
from fedjax_tl.policies.depthfl import depthfl
from fedjax_tl.policies.distill import distill
from fedjax_tl.policies.fed_dropout import fed_dropout
from fedjax_tl.policies.fedecover import fedecover
from fedjax_tl.policies.fedrolex import fedrolex
from fedjax_tl.policies.fiarse import SCOPES as FIARSE_SCOPES
from fedjax_tl.policies.fiarse import fiarse
from fedjax_tl.policies.fjord import fjord
from fedjax_tl.policies.flexlora import flexlora
from fedjax_tl.policies.heterofl import MODES as HETEROFL_MODES
from fedjax_tl.policies.heterofl import heterofl
from fedjax_tl.policies.hetlora import AGGREGATIONS as LORA_AGGREGATIONS
from fedjax_tl.policies.hetlora import WEIGHTINGS as LORA_WEIGHTINGS
from fedjax_tl.policies.hetlora import hetlora
from fedjax_tl.policies.importance import importance
from fedjax_tl.policies.partial_finetune import partial_finetune
from fedjax_tl.policies.scalefl import scalefl
from fedjax_tl.policies.uniform import full, uniform_full_only, uniform_smallest
from fedjax_tl.registry import Registry

REGISTRY: Registry[Policy] = Registry(Options, {
    "heterofl": heterofl,
    "fedrolex": fedrolex,
    "fedecover": fedecover,
    "fed_dropout": fed_dropout,
    "fjord": fjord,
    "fiarse": fiarse,
    "importance": importance,
    "distill": distill,
    "uniform_smallest": uniform_smallest,
    "uniform_full_only": uniform_full_only,
    "full": full,
    "partial_finetune": partial_finetune,
    "hetlora": hetlora,
    "depthfl": depthfl,
    "scalefl": scalefl,
    "flexlora": flexlora,
})
names, make, get = REGISTRY.names, REGISTRY.make, REGISTRY.build
names_where = REGISTRY.names_where


def owned_keys() -> dict[str, tuple[str, ...]]:
  """Each policy-specific config key (`Policy.keys`) with the policies
  that read it."""
  owners: dict[str, tuple[str, ...]] = {}
  for name in names():
    for key in make(name).keys:
      owners[key] = owners.get(key, ()) + (name,)
  return owners

__all__ = ["FIARSE_SCOPES", "HETEROFL_MODES", "LORA_AGGREGATIONS", "LORA_WEIGHTINGS",
           "REGISTRY", "Options",
           "Policy", "ServerPrep", "Slot", "Upload", "get", "make", "names",
           "names_where", "owned_keys"]
