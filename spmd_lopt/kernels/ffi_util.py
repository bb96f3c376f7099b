"""What every kernel's Python side needs around ``jax.ffi``: the ``implementation``
choice, whether a kernel can run here, registering its handler once, running it with its
XLA reference as the other platforms' program and as its gradient, and reading its calls
back from compiled HLO (XLA's cost analysis counts a custom call as nothing)."""

from __future__ import annotations

import functools
import re
from typing import Callable, Sequence

import jax

from spmd_lopt.kernels import cpu_build

IMPLEMENTATIONS = ("auto", "kernel", "reference")
_registered: set = set()


def check_implementation(who: str, implementation: str) -> None:
  """A ValueError naming ``who`` unless ``implementation`` is one of ``IMPLEMENTATIONS``:
  ``"auto"`` (a kernel where it can run), ``"kernel"`` (it, or an error saying why not),
  ``"reference"`` (XLA ops)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{who}: implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}.")


def unavailable(source: str) -> str:
  """Why the kernel built from ``source`` cannot run here ("" if it can): the default
  backend is not the CPU, or the library does not build (``cpu_build.reason``)."""
  if jax.default_backend() != "cpu":
    return f"the default backend is {jax.default_backend()}, not cpu"
  if cpu_build.load(source) is None:
    return cpu_build.reason(source)
  return ""


def register(target: str, source: str, symbol: str) -> None:
  """Register the handler ``symbol`` of ``source``'s library as the CPU custom-call
  ``target`` (once per process; the caller has checked that the library loads)."""
  if target not in _registered:
    lib = cpu_build.load(source)
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform="cpu")
    _registered.add(target)


def varying_axes(x) -> set:
  """The shard_map mesh axes ``x`` varies over (empty outside shard_map)."""
  t = jax.typeof(x)
  mat = getattr(t, "manual_axis_type", None)  # jax >= 0.9; older versions call it vma
  return set(mat.varying if mat is not None else getattr(t, "vma", ()))


def varying_like(outs, args):
  """The pytree ``outs`` with every leaf marked as varying over each mesh axis some leaf of
  ``args`` varies over. Inside shard_map an FFI call's results carry no varying axes of
  their own (nor does a reference that passes an unvarying input through), and scan
  carries and the branches of ``platform_dependent`` must all have one type."""
  varying = set().union(*(varying_axes(a) for a in jax.tree.leaves(args)))

  def fix(out):
    missing = tuple(sorted(varying - varying_axes(out)))
    return jax.lax.pcast(out, missing, to="varying") if missing else out

  return jax.tree.map(fix, outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def kernel_or_reference(kernel: Callable, reference: Callable, *args):
  """``kernel(*args)`` where the program is lowered for the CPU, ``reference(*args)`` (the
  same math as XLA ops) for any other platform; the gradient always differentiates
  ``reference`` (a kernel has no derivative of its own). Both results are marked varying
  over the mesh axes of ``args`` (``varying_like``), so the two branches have one type."""
  return jax.lax.platform_dependent(
      *args, cpu=lambda *a: varying_like(kernel(*a), a),
      default=lambda *a: varying_like(reference(*a), a))


def _kernel_or_reference_fwd(kernel, reference, *args):
  return kernel_or_reference(kernel, reference, *args), args


def _kernel_or_reference_bwd(kernel, reference, args, cotangent):
  del kernel
  _, vjp = jax.vjp(reference, *args)
  return vjp(cotangent)


kernel_or_reference.defvjp(_kernel_or_reference_fwd, _kernel_or_reference_bwd)


def hlo_custom_calls(hlo_text: str, target: str) -> list:
  """The calls of custom-call ``target`` in a compiled module's HLO text, each as
  ``(result_shapes, attrs)``: the dims of every f32 result (one, or a tuple's) and the
  integer attributes of its ``backend_config``."""
  calls = []
  pattern = re.compile(r"=\s*([^\n]*?)\s*custom-call\([^\n]*custom_call_target=\""
                       + re.escape(target) + r"\"[^\n]*backend_config=\{([^}]*)\}")
  for m in pattern.finditer(hlo_text):
    shapes = [[int(d) for d in dims.split(",") if d]
              for dims in re.findall(r"f32\[([0-9,]*)\]", m.group(1))]
    attrs = {k: int(v) for k, v in re.findall(r"(\w+) = (-?\d+) : i64", m.group(2))}
    calls.append((shapes, attrs))
  return calls
