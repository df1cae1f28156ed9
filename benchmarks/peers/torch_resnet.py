"""HeteroFL's ResNet-18 in PyTorch, one client after another: the per-client
loop peer of `round_throughput.py --model preresnet18`.

The model mirrors ours (`fedjax_tl.models.resnet.PreResNet`, layer for
layer and under the same names): a bias-free 3x3 stem, pre-activation basic
blocks `(1, 1, 1, 2)` of widths `--widths` with strides 1-2-2-2 and a 1x1
projection of the first activation where a stage begins, a final norm and
ReLU, global average pooling and a linear head; static batch norm
(`track_running_stats=False`: batch statistics, no running ones) and, with
`--scaler`, HeteroFL's scaler before every norm in training. A round runs
its cohort as HeteroFL's own code does, client by client: the client's
sub-model at its level's real width (the first ceil(p C) channels of every
hidden layer; one module per level, built once), the global weights'
first-k slices copied in, `--local-steps` SGD steps of `--batch-size`
examples in training mode with the softmax over the labels the client holds,
then every parameter entry averaged over the clients holding it. Each client
holds `--examples` synthetic examples (`peers_common.client_data`).

  python benchmarks/peers/torch_resnet.py --input-shape 8,8,1
  python benchmarks/peers/torch_resnet.py --widths 16,32,64,128 \\
      --capacity-mix a-b-c-d-e --clients-per-round 10 --threads 1

`round_throughput.py --torch-peer` runs it beside ours with our shapes and
our cohorts' widths (`--cohorts`), and first compares the losses of one
batch before and after one SGD step at every level (`--check FILE.npz`).
Prints one JSON line, client local steps per second as the other peers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import peers_common as common  # noqa: E402

LEVELS = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}
BLOCKS = (1, 1, 1, 2)
# HeteroFL's table, levels a-e, at 32x32x3 and 10 classes (ours: the same).
PARAMS = (9_622_090, 2_408_746, 603_802, 151_762, 38_350)


class PreResNet18(nn.Module):
  """HeteroFL's pre-activation ResNet-18 at width `rate` of `widths`."""

  def __init__(self, channels: int, num_classes: int, widths, rate: float,
               scaler: bool):
    super().__init__()
    widths = [math.ceil(rate * w) for w in widths]
    self.rate = rate if scaler else 1.0
    self.stem = nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)
    self.plan, cin = [], widths[0]
    for s, (planes, count) in enumerate(zip(widths, BLOCKS)):
      for b in range(count):
        name, stride = f"s{s}b{b}", 1 if s == 0 or b > 0 else 2
        project = stride != 1 or cin != planes
        self.add_module(f"{name}_n1", _norm(cin))
        self.add_module(f"{name}_conv1",
                        nn.Conv2d(cin, planes, 3, stride, 1, bias=False))
        self.add_module(f"{name}_n2", _norm(planes))
        self.add_module(f"{name}_conv2",
                        nn.Conv2d(planes, planes, 3, 1, 1, bias=False))
        if project:
          self.add_module(f"{name}_project",
                          nn.Conv2d(cin, planes, 1, stride, bias=False))
        self.plan.append((name, project))
        cin = planes
    self.final_norm = _norm(cin)
    self.head = nn.Linear(cin, num_classes)

  def _relu_norm(self, name, x):
    scaled = x / self.rate if self.training and self.rate != 1 else x
    return F.relu(getattr(self, name)(scaled))

  def forward(self, x):
    x = self.stem(x)
    for name, project in self.plan:
      h = self._relu_norm(f"{name}_n1", x)
      shortcut = getattr(self, f"{name}_project")(h) if project else x
      h = self._relu_norm(f"{name}_n2", getattr(self, f"{name}_conv1")(h))
      x = getattr(self, f"{name}_conv2")(h) + shortcut
    return self.head(self._relu_norm("final_norm", x).mean(dim=(2, 3)))


def _norm(channels: int) -> nn.BatchNorm2d:
  """HeteroFL's static batch norm (sBN): batch statistics only."""
  return nn.BatchNorm2d(channels, momentum=None, track_running_stats=False)


def num_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def load_slices(sub: nn.Module, full: dict[str, torch.Tensor]) -> None:
  """Copies each global tensor's first-k slice into the sub-model."""
  with torch.no_grad():
    for name, p in sub.named_parameters():
      p.copy_(full[name][tuple(slice(0, n) for n in p.shape)])


def masked_loss(logits, y, held=None):
  """Cross-entropy, the softmax over the `held` labels only (if given)."""
  if held is not None:
    logits = logits.masked_fill(~held, -1e9)
  return F.cross_entropy(logits, y)


def train_client(sub, x, y, steps: int, batch: int, lr: float,
                 generator) -> None:
  """`steps` SGD steps on batches of a shuffled order of the examples,
  wrapping around (as our clients visit theirs)."""
  held = torch.zeros(sub.head.out_features, dtype=torch.bool)
  held[y] = True
  order = torch.randperm(len(x), generator=generator)
  indices = order[torch.arange(steps * batch) % len(x)].view(steps, batch)
  sub.train()
  opt = torch.optim.SGD(sub.parameters(), lr=lr)
  for idx in indices:
    opt.zero_grad(set_to_none=True)
    masked_loss(sub(x[idx]), y[idx], held).backward()
    opt.step()


def accumulate(total, count, sub: nn.Module) -> None:
  """Adds a trained client's params into the sums of the entries it holds."""
  with torch.no_grad():
    for name, p in sub.named_parameters():
      index = tuple(slice(0, n) for n in p.shape)
      total[name][index] += p
      count[name][index] += 1


def combine(full, total, count) -> None:
  """HeteroFL's combination: every global entry becomes the mean of the
  clients holding it (entries no client holds keep their value)."""
  with torch.no_grad():
    for name, value in full.items():
      mean = total[name] / count[name].clamp(min=1)
      value.copy_(torch.where(count[name] > 0, mean, value))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ints = lambda s: tuple(int(v) for v in s.split(",") if v)
  p.add_argument("--input-shape", type=ints, default=(32, 32, 3),
                 help="one example, height,width,channels")
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--widths", type=ints, default=(64, 128, 256, 512),
                 help="the stage widths at level a")
  p.add_argument("--clients-per-round", type=int, default=10)
  p.add_argument("--capacity-mix", default="a-b-c-d-e",
                 help="levels a-e (widths 1 to 1/16), taken in turn by a "
                 "round's clients")
  p.add_argument("--cohorts", type=json.loads, default=None,
                 help="JSON list, per round, of its clients' widths "
                 "(overrides --clients-per-round and --capacity-mix); the "
                 "timed rounds run them in turn")
  p.add_argument("--local-steps", type=int, default=5)
  p.add_argument("--batch-size", type=int, default=10)
  p.add_argument("--examples", type=int, default=50,
                 help="synthetic examples per client")
  p.add_argument("--lr", type=float, default=0.1, help="client SGD lr")
  p.add_argument("--scaler", action="store_true",
                 help="HeteroFL's scaler (our config's `scaler`)")
  p.add_argument("--rounds", type=int, default=3,
                 help="timed rounds per repeat (default: one per cohort)")
  p.add_argument("--repeats", type=int, default=1,
                 help="timed passes over the rounds; the fastest counts")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--threads", type=int, default=0,
                 help="torch intra-op threads; 0 = torch's default")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--check", default=None, metavar="FILE.npz",
                 help="only compare losses: params (ours' names and layout), "
                 "x, y, fractions, lr in FILE; prints them as JSON")
  args = p.parse_args(argv)
  if args.cohorts is None:
    mix = [LEVELS[level] for level in args.capacity_mix.split("-")]
    args.cohorts = [[mix[i % len(mix)]
                     for i in range(args.clients_per_round)]]
  else:
    args.rounds = len(args.cohorts)
  return args


def from_ours(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
  """Our params (`param/layer/name`: HWIO kernels, `[in, out]` dense
  kernels, norm `scale`) as this model's state dict."""
  out = {}
  for key, value in arrays.items():
    if not key.startswith("param/"):
      continue
    _, layer, name = key.split("/")
    if name == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    out[f"{layer}.{'bias' if name == 'bias' else 'weight'}"] = (
        torch.from_numpy(np.ascontiguousarray(value)))
  return out


def check(args: argparse.Namespace) -> dict:
  """Losses of one batch at each width before and after one SGD step, from
  the given params: `{"loss": [...], "loss_after_step": [...]}`."""
  arrays = dict(np.load(args.check))
  full = from_ours(arrays)
  x = torch.from_numpy(arrays["x"].transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(arrays["y"].astype(np.int64))
  losses, after = [], []
  for rate in arrays["fractions"].tolist():
    sub = PreResNet18(x.shape[1], args.num_classes, args.widths, rate,
                      args.scaler).train()
    load_slices(sub, full)
    opt = torch.optim.SGD(sub.parameters(), lr=float(arrays["lr"]))
    loss = masked_loss(sub(x), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())
    with torch.no_grad():
      after.append(masked_loss(sub(x), y).item())
  result = {"loss": losses, "loss_after_step": after}
  print(json.dumps(result), flush=True)
  return result


def check_param_counts(args: argparse.Namespace) -> None:
  """At HeteroFL's shapes, each level's count must equal the table's."""
  if (args.input_shape, args.num_classes, args.widths) == (
      (32, 32, 3), 10, (64, 128, 256, 512)):
    counts = tuple(num_params(PreResNet18(3, 10, args.widths, rate, False))
                   for rate in LEVELS.values())
    assert counts == PARAMS, counts


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  if args.check:
    return check(args)
  check_param_counts(args)
  height, width, channels = args.input_shape
  full_model = PreResNet18(channels, args.num_classes, args.widths, 1.0,
                           args.scaler)
  full = {k: v.detach() for k, v in full_model.named_parameters()}
  subs = {}  # one module per level, its weights overwritten per client
  for rate in sorted({r for cohort in args.cohorts for r in cohort}):
    subs[rate] = PreResNet18(channels, args.num_classes, args.widths, rate,
                             args.scaler)
  # Every client slot of every round gets its own data, made up front.
  workload = common.Workload(
      "preresnet18", 0, args.examples, (channels, height, width),
      args.num_classes, args.batch_size, 1, args.lr, 1.0, ())
  data = [[common.client_data(workload, r * 10_000 + i, args.seed)
           for i in range(len(cohort))]
          for r, cohort in enumerate(args.cohorts)]
  data = [[(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
           for x, y in cohort] for cohort in data]
  generator = torch.Generator().manual_seed(args.seed)

  def run_round(r: int) -> None:
    r %= len(args.cohorts)
    total = {k: torch.zeros_like(v) for k, v in full.items()}
    count = {k: torch.zeros_like(v) for k, v in full.items()}
    for rate, (x, y) in zip(args.cohorts[r], data[r]):
      sub = subs[rate]
      load_slices(sub, full)
      train_client(sub, x, y, args.local_steps, args.batch_size, args.lr,
                   generator)
      accumulate(total, count, sub)
    combine(full, total, count)

  seconds = common.time_rounds(run_round, args.warmup,
                               args.rounds * args.repeats)
  passes = [sum(seconds[i:i + args.rounds])
            for i in range(0, len(seconds), args.rounds)]
  steps = sum(len(args.cohorts[r % len(args.cohorts)])
              for r in range(args.rounds)) * args.local_steps
  result = {
      "peer": "torch", "workload": "preresnet18",
      "clients_per_round": [len(c) for c in args.cohorts],
      "local_steps": args.local_steps, "rounds": args.rounds,
      "repeats": args.repeats, "round_seconds": seconds,
      "steps_per_second": steps / statistics.mean(passes),
      "best_steps_per_second": steps / min(passes),
      "params_per_level": {f"{r:g}": num_params(s) for r, s in subs.items()},
      "torch_threads": torch.get_num_threads(),
      "versions": common.package_versions("torch", "numpy")}
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
