"""What a script run in the Triton interpreter (TRITON_INTERPRET=1) executes first, and a
runner for such scripts."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# triton 3.6's interpreter: a 1-element array used as an int (a loop bound, an index)
PRELUDE = textwrap.dedent("""
    import triton.runtime.interpreter as ti
    _patch = ti._patch_lang_tensor
    def _fixed(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    ti._patch_lang_tensor = _fixed
""")


def run_interpreted(script: str, timeout: int = 300) -> str:
    """Run PRELUDE + script in a Python of its own under TRITON_INTERPRET=1 with src/ on the
    path; its stdout, or an AssertionError with the end of its stderr."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(SRC)}
    p = subprocess.run([sys.executable, "-c", PRELUDE + script], env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout
