"""`import triton_python_backend_utils as pb_utils` for Triton python models (see
modelport.repository.pb_utils; instance processes alias this name to that module)."""

import sys

from modelport.repository import pb_utils as _impl

sys.modules[__name__] = _impl
