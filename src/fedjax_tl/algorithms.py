"""Named federated algorithms as recipes over the shared engine.

Every algorithm here runs the same round (vmapped local SGD, masked weighted
mean of the client deltas); a recipe picks the server optimiser that consumes
the mean delta as a pseudo-gradient and the client objective (FedProx's mu).
Reddi et al., "Adaptive Federated Optimization", ICLR 2021 for fedadam and
fedyogi; Li et al., MLSys 2020 for fedprox; Diao et al., ICLR 2021 for heterofl
(FedAvg over static-width sub-models, averaged over the clients holding each
parameter).
"""

from __future__ import annotations

import optax


def server_optimizer(algorithm: str, learning_rate: float,
                     eps: float = 1e-3) -> optax.GradientTransformation:
  """The server optimiser of a named algorithm.

  The aggregate client delta is fed to it as the gradient `-delta`, so FedAvg
  is SGD with learning rate 1.
  """
  if algorithm in ("fedavg", "fedprox", "heterofl"):
    return optax.sgd(learning_rate)
  if algorithm == "fedadam":
    return optax.adam(learning_rate, b1=0.9, b2=0.99, eps=eps)
  if algorithm == "fedyogi":
    return optax.yogi(learning_rate, b1=0.9, b2=0.99, eps=eps)
  raise ValueError(f"unknown algorithm {algorithm!r}")
