"""The rules between config keys (`config.validate` applies them after each
key's own check): defaults derived from other keys (a key left None is
resolved here, so the run's config and identity hold the value), and
combinations that cannot run, each refused naming the key and the value.
Also the per-policy variants of one config that `compare` and `sweep` run.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Sequence

import ml_collections

from fedjax_tl import aggregators, policies
from fedjax_tl.cost import overcommit_size
from fedjax_tl.device_catalog import class_for_width
from fedjax_tl.errors import check_config as _check
from fedjax_tl.experiment.keys import BY_NAME, NATURAL_DATASETS, TEXT_MODELS


def _model_sizes(v: dict[str, Any]) -> None:
  """`hidden` and `embed_dim` left None: the model's own sizes (the lstm's
  are fedjax's Shakespeare model's)."""
  lstm = v["model"] == "lstm"
  if v["hidden"] is None:
    v["hidden"] = (256, 256) if lstm else (128,)
  if v["embed_dim"] is None:
    v["embed_dim"] = 8 if lstm else 256


def relations(v: dict[str, Any]) -> None:
  """The rules between keys, in place: defaults derived from other keys
  (a key left None), and combinations that cannot run."""
  _data_relations(v)
  algorithm = v["algorithm"]
  if v["server_lr"] is None:
    v["server_lr"] = 0.01 if algorithm in ("fedadam", "fedyogi") else 1.0
  if v["mu"] is None:
    v["mu"] = 0.01 if algorithm == "fedprox" else 0.0
  _check(len(v["resnet_widths"]) == 4, "resnet_widths", v["resnet_widths"],
         "must give the widths of the 4 stages")
  _check(v["max_examples"] >= v["min_examples"], "max_examples",
         v["max_examples"], f"must be >= min_examples ({v['min_examples']})")
  cohort = v["clients_per_round"]
  _check(cohort <= v["num_clients"], "clients_per_round", cohort,
         f"must be <= num_clients ({v['num_clients']})")
  _tiers(v)
  sampled = overcommit_size(cohort, v["overcommit"])
  _check(sampled <= v["num_clients"], "overcommit", v["overcommit"],
         f"samples {sampled} devices a round, more than num_clients "
         f"({v['num_clients']})")
  if v["availability"] is None:
    v["availability"] = "uniform" if v["behave_trace"] is None else "trace"
  _check(v["availability"] != "trace" or v["behave_trace"] is not None,
         "availability", v["availability"],
         "needs behave_trace (a client_behave_trace file)")
  _check(v["availability"] == "trace" or v["behave_trace"] is None,
         "availability", v["availability"],
         "must be 'trace' when behave_trace is set")
  if v["unroll_local_steps"] is None:
    v["unroll_local_steps"] = v["model"] in ("cnn", "simple_cnn")
  _model_sizes(v)
  _weights_relations(v)
  _policy_relations(v)
  _aggregator_relations(v)
  _privacy_relations(v)
  _check(not v["sweep_alpha"] or v["data"] == "digits" or
         v["partition"] != "iid", "sweep_alpha", v["sweep_alpha"],
         "needs a partition that uses alpha (partition=dirichlet or "
         "quantity, not iid)")


def _data_relations(v: dict[str, Any]) -> None:
  """Natural data's keys; `num_clients` and `pretrain` when left None."""
  _check(v["data"] != "stackoverflow", "data", v["data"],
         "is read (fedjax_tl.data.natural.read_client_texts) but its task "
         "is not built yet; natural data sets: femnist, cifar100, "
         "shakespeare")
  _check(v["model"] != "lstm" or v["data"] == "shakespeare", "model",
         v["model"], f"reads token ids, not data={v['data']!r}'s images "
         "(data=shakespeare)")
  natural = v["data"] in NATURAL_DATASETS
  if not natural:
    for name in ("data_path", "data_format", "max_client_examples",
                 "source"):
      _check(v[name] == BY_NAME[name].default, name, v[name],
             f"is for natural data ({', '.join(NATURAL_DATASETS)}), not "
             f"data={v['data']!r}")
    v["num_clients"] = 1000 if v["num_clients"] is None else v["num_clients"]
    v["pretrain"] = v["pretrain"] or "source"
    return
  _check(v["data_path"] is not None, "data", v["data"],
         "needs config.data_path (the train file or its directory)")
  if v["data"] == "shakespeare":
    _check(v["source"] == "none", "source", v["source"],
           "is an image task; shakespeare has no source task (pretrain=none, "
           "or a checkpoint path)")
    _check(v["model"] in TEXT_MODELS or ":" in v["model"], "model",
           v["model"], "cannot read text: shakespeare needs a sequence "
           f"model ({', '.join(TEXT_MODELS)}, or your own)")
    _check(v["attack"] != "label_flip", "attack", v["attack"],
           "flips class labels; a text task's targets are characters and "
           "markers (sign_flip or scale attack text models)")
  if v["num_clients"] is None:
    from fedjax_tl.data.natural import count_clients  # reads the file
    v["num_clients"] = count_clients(v["data"], v["data_path"],
                                     v["data_format"])
  if v["pretrain"] is None:
    v["pretrain"] = "none" if v["source"] == "none" else "source"
  _check(v["pretrain"] != "source" or v["source"] != "none", "pretrain",
         v["pretrain"], f"needs a source task for data={v['data']!r}: set "
         "config.source (a tfds name or .npz), or pretrain=none")
  _check(policies.make(v["policy"]).prepare is None or v["source"] != "none",
         "policy", v["policy"], "prepares on the server's source data: set "
         "config.source (a tfds name or .npz)")


def _tiers(v: dict[str, Any]) -> None:
  fractions, props = v["tier_fractions"], v["tier_proportions"]
  _check(len(props) == len(fractions), "tier_proportions", props,
         f"must have one entry per tier ({len(fractions)})")
  _check(all(p >= 0 for p in props) and abs(sum(props) - 1) < 1e-6,
         "tier_proportions", props, "must be >= 0 and sum to 1")
  if v["device_classes"] is None:
    v["device_classes"] = tuple(class_for_width(f) for f in fractions)
  classes = v["device_classes"]
  _check(len(classes) == len(fractions), "device_classes", classes,
         f"must name one device class per tier ({len(fractions)})")


def _weights_relations(v: dict[str, Any]) -> None:
  _check(not v["pretrain_reinit"] or v["pretrain"] == "source",
         "pretrain_reinit", v["pretrain_reinit"], "resets params after "
         f"pretraining on the source, but pretrain={v['pretrain']!r}")
  if v["init_weights"] is None:
    for name in ("weights_load", "weights_dont_load", "weights_map"):
      _check(v[name] == BY_NAME[name].default, name, v[name],
             "needs init_weights (the file to load from)")
  else:
    _check(v["pretrain"] in ("source", "none"), "init_weights",
           v["init_weights"], f"replaces the fresh init, which pretrain="
           f"{v['pretrain']!r} (a checkpoint) replaces whole; set only one "
           "(pretrain=none or source)")


def _policy_relations(v: dict[str, Any]) -> None:
  policy = policies.make(v["policy"])
  # The policy's defaults for keys left None, those derived from other keys
  # included (ScaleFL's distillation start from num_rounds): the resolved
  # value, not the rule, is in the config and the run's identity.
  for key, _ in policy.defaults:
    if v[key] is None:
      v[key] = policy.default(key, config=v)
  if v["masked_ce"] is None:  # off outside HeteroFL's family
    v["masked_ce"] = False
  stepped = policies.names_where(lambda p: p.step_masks is not None)
  _check(not v["fjord_distill"] or policy.step_masks is not None,
         "fjord_distill", v["fjord_distill"],
         f"needs policy={' or '.join(stepped)} (policy={v['policy']!r})")
  family = policies.names_where(lambda p: p.family == "heterofl")
  # Only HeteroFL's family redraws levels; elsewhere the key did nothing.
  _check(v["heterofl_mode"] == "fix" or policy.family == "heterofl",
         "heterofl_mode", v["heterofl_mode"],
         f"redraws HeteroFL's levels each round, which only policy="
         f"{' or '.join(family)} implement (policy={v['policy']!r})")
  _check(not (v["masked_ce"] and policy.exit_terms), "masked_ce",
         v["masked_ce"], f"is HeteroFL's; policy={v['policy']!r} trains "
         f"early exits over every label")
  for key, readers in policies.owned_keys().items():
    # A policy's own keys did nothing under another policy.
    _check(v[key] == BY_NAME[key].default or key in policy.keys, key,
           v[key], f"is read by policy={' or '.join(readers)} only "
           f"(policy={v['policy']!r})")
  if v["algorithm"] == "heterofl":
    _check(policy.family == "heterofl", "policy", v["policy"],
           f"must be one of {', '.join(family)} when algorithm=heterofl")
  if v["tier_fast_path"]:
    first_k = policies.names_where(lambda p: p.fixed_widths is not None)
    _check(policy.fixed_widths is not None, "tier_fast_path",
           v["tier_fast_path"], f"needs a first-k width policy (one of "
           f"{', '.join(first_k)}), not policy={v['policy']!r}")


def policy_variant(config: ml_collections.ConfigDict, name: str
                   ) -> ml_collections.ConfigDict:
  """`config` for policy `name` (compare, sweep): the other policies' own
  keys (`Policy.keys`), which `name` does not read, back at their
  defaults."""
  variant = ml_collections.ConfigDict(config)
  variant.policy = name
  own = policies.make(name).keys if name in policies.names() else ()
  for key in policies.owned_keys():
    if key not in own and key in variant:
      variant[key] = BY_NAME[key].default
  return variant


def unread_keys(config: ml_collections.ConfigDict,
                names: Sequence[str]) -> None:
  """Refuses a policy's own key set in `config` when none of the policies
  `names` (a compare's or sweep's) reads it."""
  for key, readers in policies.owned_keys().items():
    value = config[key] if key in config else None
    if isinstance(value, list):
      value = tuple(value)
    if value is not None and value != BY_NAME[key].default:
      _check(any(name in readers for name in names), key, config[key],
             f"is read by policy={' or '.join(readers)}, which "
             f"{', '.join(names)} do not include")


def _aggregator_relations(v: dict[str, Any]) -> None:
  cohort = v["clients_per_round"]
  _check(not (v["tier_fast_path"] and
              aggregators.make(v["aggregator"]).stacked),
         "tier_fast_path", v["tier_fast_path"],
         f"must not be True with aggregator={v['aggregator']!r}: it stacks "
         "the cohort's deltas on the masked path (leave tier_fast_path "
         "unset)")
  if v["krum_f"] is None:
    v["krum_f"] = (int(round(v["attack_fraction"] * cohort))
                   if v["attack"] != "none" else 0)
  least = aggregators.get(v["aggregator"], krum_f=v["krum_f"]).min_cohort
  _check(cohort >= least, "krum_f", v["krum_f"],
         f"aggregator={v['aggregator']!r} needs clients_per_round ({cohort}) "
         f">= {least} (Krum: 2 x krum_f + 3)")
  if v["krum_m"] is None:
    v["krum_m"] = max(cohort - v["krum_f"], 1)
  _check(v["krum_m"] <= cohort, "krum_m", v["krum_m"],
         f"must be <= clients_per_round ({cohort})")


def _privacy_relations(v: dict[str, Any]) -> None:
  if v["dp_count_noise"] is None:  # Andrew et al.'s m / 20, and > z / 2
    v["dp_count_noise"] = max(v["clients_per_round"] / 20.0,
                              v["dp_noise_multiplier"])
  if v["dp_delta"] is None:
    v["dp_delta"] = min(1e-5, 1.0 / v["num_clients"])
  if not v["dp"]:
    return
  # The accountant is an extra (the light install leaves it out): said here,
  # before any data is built, not at the first evaluation.
  _check(importlib.util.find_spec("dp_accounting") is not None, "dp",
         v["dp"], "needs dp-accounting for the privacy accounting: "
         'pip install "fedjax-tl[dp]"')
  z = v["dp_noise_multiplier"]
  _check(not v["dp_adaptive_clip"] or z == 0 or v["dp_count_noise"] > z / 2,
         "dp_count_noise", v["dp_count_noise"],
         f"must be > dp_noise_multiplier / 2 ({z / 2:g}) with "
         "dp_adaptive_clip: the count's noise takes part of the budget")
  _check(aggregators.make(v["aggregator"]).is_mean, "aggregator",
         v["aggregator"],
         "must be 'mean' with dp=True (DP clips and noises the mean)")
  _check(not policies.make(v["policy"]).weighted_upload, "policy",
         v["policy"],
         "cannot run with dp=True: an adapter policy's merge weighs its "
         "uploads by its own rule (HetLoRA's update norms, FlexLoRA's "
         "products in the kernel's slot), which DP's equal weights and "
         "expected holders exclude")
  _check(v["overcommit"] == 1.0, "overcommit", v["overcommit"],
         "must be 1 with dp=True (devices are Poisson-sampled)")
