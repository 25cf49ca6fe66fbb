"""Compatibility name: ``resumer.examples_train`` is ``resumer.examples.train`` (the example training loops).

Job files name factories as ``resumer.examples_train:NAME``; this module makes that name the very same module object.
"""

import sys

from resumer.examples import train as _module

sys.modules[__name__] = _module
