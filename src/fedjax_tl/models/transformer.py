"""A small pre-LN Transformer: a classifier over tokens, or a causal LM.

The sizes follow HeteroFL's WikiText-2 Transformer (Diao et al., ICLR 2021:
embedding 256, 8 heads, MLP 512, 4 layers): token (or feature) embedding
plus a learned position embedding, then blocks of `x + attn(LN(x))` and
`x + mlp(LN(x))` (GELU), a final LayerNorm and a linear head. (The
authors' own model is post-LN and trained as a masked-token model with a
two-layer decoder; pre-LN is what small Transformers now use, and it
trains without warm-up.) Two tasks, chosen by the input's shape:

- `input_shape == (T,)`: integer token ids; a causal language model whose
  head gives next-token logits `[batch, T, vocab]` (vocab = `num_classes`).
- otherwise: an image or a sequence of feature vectors, read as tokens (an
  image's rows, `[H, W*C]`, or its `patch` x `patch` patches), bidirectional
  attention, mean-pooled into a classifier head.

Width groups: `embed` (the residual stream: every layer writing it, the
embeddings and every LayerNorm's features, which normalise over the units a
client holds), `blocks/i/heads` (block i's attention heads, each `head_dim`
entries wide: a client keeps whole heads) and `blocks/i/mlp` (block i's MLP
hidden units). HeteroFL cuts the embedding and hidden sizes and keeps 8
heads of a narrower `head_dim`; we keep `head_dim` and drop whole heads, so
a sub-model is a Transformer with fewer heads. HeteroFL's scaler, when on,
multiplies every projection's outputs in training as the authors' code does
(queries and keys included), and LayerNorms make the model `normalised`, so
the scaler is the identity at evaluation, as the authors define it.

LoRA adapters (`hetlora`, `lora`) go on the attention and MLP projections and
on the head (`adapter_targets`); the embeddings stay frozen.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_tl.models import axes
from fedjax_tl.models.base import ModelDef, Options, from_module
from fedjax_tl.models.layers import dropout, scale_units, unit_scale
from fedjax_tl.models.norms import Norm

PROJECTIONS = ("q", "k", "v", "o", "up", "down")


class Block(nnx.Module):
  """One pre-LN block: attention then MLP, each added to the stream."""

  def __init__(self, embed: int, heads: int, head_dim: int, mlp: int, *,
               rngs: nnx.Rngs):
    inner = heads * head_dim
    linear = lambda a, b: nnx.Linear(a, b, rngs=rngs)
    self.ln1 = Norm(embed, axes=())
    self.q, self.k, self.v = (linear(embed, inner) for _ in range(3))
    self.o = linear(inner, embed)
    self.ln2 = Norm(embed, axes=())
    self.up = linear(embed, mlp)
    self.down = linear(mlp, embed)


class Transformer(nnx.Module):
  """A pre-LN Transformer (see the module docstring)."""

  masks_activations = True  # __call__ applies `units`

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               embed: int = 256, heads: int = 8, mlp: int = 512,
               layers: int = 4, head_dim: int | None = None, patch: int = 0,
               dropout: float = 0.0, rngs: nnx.Rngs):
    self.lm = len(input_shape) == 1
    self.patch = patch
    self.head_dim = head_dim or embed // heads
    if self.lm:
      tokens, features = input_shape[0], None
      self.token = nnx.Embed(num_classes, embed, rngs=rngs)
    else:
      tokens, features = _tokens(input_shape, patch)
      self.token = nnx.Linear(features, embed, rngs=rngs)
    self.tokens = tokens
    self.pos = nnx.Embed(tokens, embed, rngs=rngs)
    self.blocks = nnx.List([Block(embed, heads, self.head_dim, mlp, rngs=rngs)
                            for _ in range(layers)])
    self.ln_f = Norm(embed, axes=())
    self.head = nnx.Linear(embed, num_classes, rngs=rngs)
    # Dropout after each attention and each MLP, as HeteroFL's model has.
    self.dropout_rates = (float(dropout),) * (2 * layers)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None,
               units: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """Logits `[batch, classes]`, or `[batch, T, vocab]` for the LM."""
    stream = lambda h: scale_units(h, units, "embed")
    norm = lambda layer, h: layer(h, unit_scale(units, "embed"))[0]
    if self.lm:
      h = self.token(x.astype(jnp.int32))
    else:
      h = self.token(_as_tokens(x, self.patch))
    h = stream(h + self.pos.embedding[...][None])
    for i, block in enumerate(self.blocks):
      name = f"blocks/{i}"
      a = self._attention(block, norm(block.ln1, h), units, f"{name}/heads")
      h = h + dropout(stream(block.o(a)), self.dropout_rates[2 * i], rng,
                      2 * i)
      m = jax.nn.gelu(scale_units(block.up(norm(block.ln2, h)), units,
                                  f"{name}/mlp"))
      h = h + dropout(stream(block.down(m)), self.dropout_rates[2 * i + 1],
                      rng, 2 * i + 1)
    h = norm(self.ln_f, h)
    return self.head(h if self.lm else h.mean(axis=1))

  def _attention(self, block: Block, h: jax.Array,
                 units: Mapping[str, jax.Array] | None,
                 group: str) -> jax.Array:
    """Multi-head attention of `h[batch, T, embed]`; the number of heads is
    read off the (possibly sliced) projections."""
    q, k, v = (scale_units(layer(h), units, group, self.head_dim)
               for layer in (block.q, block.k, block.v))
    split = lambda t: t.reshape(*t.shape[:-1], -1, self.head_dim)
    scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / math.sqrt(
        self.head_dim)
    if self.lm:
      causal = jnp.tril(jnp.ones((self.tokens, self.tokens), bool))
      scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, split(v))
    return out.reshape(*out.shape[:2], -1)

  def adapter_targets(self) -> tuple[str, ...]:
    """The layers LoRA adapts: every projection and the head."""
    return (*(f"blocks/{i}/{p}" for i in range(len(self.blocks))
              for p in PROJECTIONS), "head")

  def axes(self) -> tuple[axes.Layer, ...]:
    t = self.tokens
    stream = "embed"
    token = (axes.layer("token", embedding=(None, stream)) if self.lm else
             axes.dense("token", None, stream, positions=t))
    layers = [token, axes.layer("pos", embedding=(None, stream))]
    for i in range(len(self.blocks)):
      name = f"blocks/{i}"
      heads = axes.Axis(f"{name}/heads", per_unit=self.head_dim)
      mlp = f"{name}/mlp"
      layers += [axes.norm(f"{name}/ln1", stream, t),
                 *(axes.dense(f"{name}/{p}", stream, heads, positions=t)
                   for p in "qkv"),
                 axes.dense(f"{name}/o", heads, stream, positions=t),
                 axes.norm(f"{name}/ln2", stream, t),
                 axes.dense(f"{name}/up", stream, mlp, positions=t),
                 axes.dense(f"{name}/down", mlp, stream, positions=t)]
    return (*layers, axes.norm("ln_f", stream, t),
            axes.dense("head", stream, None, positions=t if self.lm else 1))


def _tokens(input_shape: Sequence[int], patch: int) -> tuple[int, int]:
  """`(tokens, features per token)` of an example of `input_shape`."""
  if len(input_shape) == 2:  # a sequence of feature vectors
    return input_shape[0], input_shape[1]
  if len(input_shape) != 3:
    raise ValueError(f"the transformer takes token ids [T], feature "
                     f"sequences [T, F] or images [H, W, C], not inputs of "
                     f"shape {tuple(input_shape)}")
  height, width, channels = input_shape
  if not patch:  # rows as tokens
    return height, width * channels
  if height % patch or width % patch:
    raise ValueError(f"patch {patch} does not divide the {height}x{width} "
                     f"images")
  return (height // patch) * (width // patch), patch * patch * channels


def _as_tokens(x: jax.Array, patch: int) -> jax.Array:
  """`x[batch, *input_shape]` as `[batch, tokens, features]`."""
  if x.ndim == 3:
    return x
  b, height, width, channels = x.shape
  if not patch:
    return x.reshape(b, height, width * channels)
  x = x.reshape(b, height // patch, patch, width // patch, patch, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(
      b, (height // patch) * (width // patch), patch * patch * channels)


def transformer(input_shape: Sequence[int], num_classes: int, seed: int,
                options: Options) -> ModelDef:
  """`Transformer` of `options.embed_dim` (None: 256), `num_heads`,
  `mlp_dim`, `num_layers` and `patch` (dropout 0 by default)."""
  return from_module(Transformer(
      input_shape, num_classes,
      embed=256 if options.embed_dim is None else options.embed_dim,
      heads=options.num_heads, mlp=options.mlp_dim,
      layers=options.num_layers, patch=options.patch,
      dropout=options.dropout or 0.0, rngs=nnx.Rngs(params=seed)))
