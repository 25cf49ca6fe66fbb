"""Compatibility name: ``resumer.examples_jobs`` is ``resumer.examples.jobs`` (the example job models and loops).

Job files name factories as ``resumer.examples_jobs:NAME``; this module makes that name the very same module object.
"""

import sys

from resumer.examples import jobs as _module

sys.modules[__name__] = _module
