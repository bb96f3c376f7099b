"""``TransformerLM_Copy_*``: a small causal transformer LM on a copying task made on device.

Data (no files; every batch drawn from its key): a sequence is ``n`` symbols ``x_i``
uniform on ``{0..V-1}``, a separator ``V``, then ``x`` again: ``s = (x_1..x_n, V,
x_1..x_n)`` (length ``2n + 1``, vocabulary ``V + 1``). The model reads ``s[:-1]`` and
predicts ``s[1:]``; the loss is the mean next-token cross-entropy over the ``n`` copied
positions only (the prefix is random, its loss would be a floor of ``ln V``), so a model
that has learnt to copy reaches 0 and chance is ``ln(V + 1)``. Splits are held-out keys:
``sample_batch(key, split)`` folds a per-split constant into ``key``, so ``train``,
``valid`` and ``test`` batches never share a key (with ``V^n`` possible sequences their
contents overlap only by chance).

Model: token + learned position embeddings (width ``d``), ``layers`` pre-LayerNorm blocks
``h += MHA(LN(h), causal mask)``, ``h += W_2 gelu(W_1 LN(h))`` (hidden ``4d``), then
``LN`` and a linear read-out to ``V + 1`` logits.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from spmd_lopt.tasks import base

_SPLITS = {"train": 0, "valid": 1, "inner_valid": 1, "outer_valid": 3, "test": 2}


class CausalTransformer(nn.Module):
  """i32[B, L] tokens -> f32[B, L, vocab] logits; position ``t`` sees tokens ``<= t``."""
  vocab: int
  max_len: int
  width: int = 32
  heads: int = 2
  layers: int = 2

  @nn.compact
  def __call__(self, tokens):
    length = tokens.shape[-1]
    h = nn.Embed(self.vocab, self.width)(tokens)
    pos = self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.width))
    h = h + pos[:length]
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.layers):
      h = h + nn.MultiHeadDotProductAttention(num_heads=self.heads)(
          nn.LayerNorm()(h), mask=mask)
      y = nn.Dense(4 * self.width)(nn.LayerNorm()(h))
      h = h + nn.Dense(self.width)(nn.gelu(y))
    return nn.Dense(self.vocab)(nn.LayerNorm()(h))


class CopyLMTask(base.Task):
  """Next-token cross-entropy of ``CausalTransformer`` on the copying data above."""

  def __init__(self, num_symbols: int = 8, length: int = 8, batch_size: int = 32,
               width: int = 32, heads: int = 2, layers: int = 2, name: str = None):
    if num_symbols < 2 or length < 1 or batch_size < 1:
      raise ValueError(f"CopyLMTask: need num_symbols >= 2, length >= 1, batch_size >= 1; "
                       f"got {num_symbols}, {length}, {batch_size}.")
    self.num_symbols, self.length, self.batch_size = num_symbols, length, batch_size
    self.module = CausalTransformer(vocab=num_symbols + 1, max_len=2 * length,
                                    width=width, heads=heads, layers=layers)
    self.name = name or f"TransformerLM_Copy{num_symbols}x{length}"

  def sample_batch(self, key, split: str = "train"):
    """``i32[B, 2n + 1]`` sequences ``(x, V, x)``."""
    if split not in _SPLITS:
      raise ValueError(f"{self.name}: unknown split {split!r}; known: {tuple(_SPLITS)}.")
    key = jax.random.fold_in(key, _SPLITS[split])
    x = jax.random.randint(key, (self.batch_size, self.length), 0, self.num_symbols)
    sep = jnp.full((self.batch_size, 1), self.num_symbols, x.dtype)
    return jnp.concatenate([x, sep, x], axis=1)

  def init(self, key):
    return self.module.init(key, jnp.zeros((1, 2 * self.length), jnp.int32))["params"]

  def loss(self, params, key, data):
    del key
    logits = self.module.apply({"params": params}, data[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, data[:, 1:])
    return jnp.mean(ce[:, self.length:])  # the copied half: targets s[n+1:]


def TransformerLM_Copy8x8(batch_size: int = 32):
  """2-layer, width-32, 2-head causal transformer copying 8 symbols from an alphabet of 8."""
  return CopyLMTask(8, 8, batch_size, name="TransformerLM_Copy8x8")


TASKS = {f.__name__: f for f in (TransformerLM_Copy8x8,)}
