"""Reading converted directories: a parameter read from one is checked against the model's."""

import numpy as np
import pytest

from monoformer_jax.base.errors import UserError
from monoformer_jax.nn import converted


def test_a_parameter_must_have_a_counterpart_of_its_shape():
  want = np.zeros((4, 8))
  converted.check_param('w', np.ones((4, 8)), want, 'src', 'missing w')
  for got, wanted in ((None, want), (want, None)):
    with pytest.raises(UserError, match='^missing w$'):
      converted.check_param('w', got, wanted, 'src', 'missing w')
  with pytest.raises(UserError, match=r'^parameter w has shape \(8, 4\) in src; the model config '
                                      r'gives \(4, 8\)\.$'):
    converted.check_param('w', np.ones((8, 4)), want, 'src', 'missing w')
