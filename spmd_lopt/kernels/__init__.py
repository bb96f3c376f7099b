"""Hand-written CPU kernels for the learned optimizers' hot loops, through XLA's FFI.

``cpu_build`` compiles a kernel's C++ source with the host's compiler once per machine and
caches the shared library, ``ffi_util`` registers it with XLA; ``per_entry_mlp`` is the
fused per-parameter MLP that MLPLOpt runs on every entry of every tensor; ``celo2_matrix``
is Celo2's rule (accumulators, features, their norms and its MLP) on one tensor and
``newton_schulz`` its orthogonalisation. Each kernel has a pure-JAX reference with the
same math, used on other platforms, for shapes the kernel does not cover, for gradients,
and when no compiler is present (or ``SPMD_LOPT_KERNELS=0``).
"""
