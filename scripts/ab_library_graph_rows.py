"""Interleaved A/B of XLA's CPU library graphs (``spmd_lopt.xla_options.CPU_OPTIONS``) on
the per-parameter MLP chain, by rows per product: the evidence for
``xla_options.MIN_LIBRARY_ROWS``.

For ``(T tasks, N rows)`` it times a ``lax.scan`` of ``relu(relu(x @ W0 + b0) @ W1 + b1)
@ W2 + b2`` with per-task weights (``x [T, N, 8]``, hidden 32, out 2; MLPLOpt's shapes)
compiled with and without the options, alternated call by call, and prints the median of
the pairwise process-CPU-time ratios plain / fused (> 1: the library graph is faster).

  PYTHONPATH=$PWD python scripts/ab_library_graph_rows.py
"""

import statistics
import time

import jax

from spmd_lopt import xla_options

HIDDEN = 32
POINTS = [(128, 10, 50), (128, 40, 20), (64, 160, 10), (32, 512, 5), (32, 2048, 2)]


def mlp(x, w0, b0, w1, b1, w2, b2):
  one = lambda x, w0, b0, w1, b1, w2, b2: (
      jax.nn.relu(jax.nn.relu(x @ w0 + b0) @ w1 + b1) @ w2 + b2)
  return jax.vmap(one)(x, w0, b0, w1, b1, w2, b2)


def scan_of(steps):
  def run(x, *ws):
    def body(c, _):
      # Feed the output back so the steps cannot be merged or hoisted.
      return c + 1e-3 * mlp(c, *ws)[..., :1], None
    return jax.lax.scan(body, x, None, length=steps)[0]
  return run


def main():
  opts = xla_options.step_options(None)
  for t, n, steps in POINTS:
    k = jax.random.split(jax.random.key(0), 7)
    args = (jax.random.normal(k[0], (t, n, 8)), 0.3 * jax.random.normal(k[1], (t, 8, HIDDEN)),
            jax.random.normal(k[2], (t, HIDDEN)),
            0.2 * jax.random.normal(k[3], (t, HIDDEN, HIDDEN)),
            jax.random.normal(k[4], (t, HIDDEN)), 0.2 * jax.random.normal(k[5], (t, HIDDEN, 2)),
            jax.random.normal(k[6], (t, 2)))
    fused = jax.jit(scan_of(steps), compiler_options=opts)
    plain = jax.jit(scan_of(steps))
    jax.block_until_ready((fused(*args), plain(*args)))
    tf, tp = [], []
    for _ in range(21):
      for fn, out in ((fused, tf), (plain, tp)):
        c0 = time.process_time()
        jax.block_until_ready(fn(*args))
        out.append(time.process_time() - c0)
    ratios = [p / f for p, f in zip(tp, tf)]
    q = statistics.quantiles(ratios, n=4)
    print(f"T={t} N={n} steps={steps}: fused {1e3 * statistics.median(tf):.2f} ms, plain "
          f"{1e3 * statistics.median(tp):.2f} ms CPU; plain/fused pairwise median "
          f"{statistics.median(ratios):.3f} ({q[0]:.3f}-{q[2]:.3f})", flush=True)


if __name__ == "__main__":
  main()
