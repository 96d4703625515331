"""Permutation alignment of two networks: which units may be permuted, and how to match them.

Read in this order (each module imports only the ones above it):

- :mod:`.spec`: :class:`PermutationSpec` (which axes of which ``state_dict`` tensors move
  together) and permutations (:func:`apply_permutation`, identity, random, inverse);
- :mod:`.trace`: a spec for any ``nn.Module`` from a ``torch.fx`` trace
  (:func:`trace_spec`), and :func:`check_equivalence`, which checks that a spec keeps the
  function;
- :mod:`.builders`: hand-written specs of the built-in architectures (the tracer's test
  oracle) and :func:`permutation_spec`, which picks a builder or traces the model;
- one module per matching method: :mod:`.weight` (weight matching) and :mod:`.activation`
  (activation matching);
- :mod:`.methods`: the registry of matching methods that pair methods use
  (``MATCHERS[name].match``). No matching method names an architecture: they read specs.
"""

from .activation import activation_matching, feature_modules
from .builders import permutation_spec
from .methods import MATCHERS, Matcher
from .spec import (PermutationSpec, apply_permutation, identity_permutation, invert_permutation,
                   random_permutation)
from .trace import (EquivalenceError, SpecWarning, TraceError, check_equivalence, permuted_share,
                    trace_spec)
from .weight import matching_objective, weight_matching

__all__ = [
    "PermutationSpec", "apply_permutation", "identity_permutation", "invert_permutation",
    "random_permutation", "permutation_spec", "trace_spec", "check_equivalence", "TraceError",
    "EquivalenceError", "SpecWarning", "permuted_share", "weight_matching", "matching_objective",
    "activation_matching", "feature_modules", "MATCHERS", "Matcher",
]
