"""What a script run in the Triton interpreter (TRITON_INTERPRET=1) executes first."""

import textwrap

# triton 3.6's interpreter: a 1-element array used as an int (a loop bound, an index)
PRELUDE = textwrap.dedent("""
    import triton.runtime.interpreter as ti
    _patch = ti._patch_lang_tensor
    def _fixed(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    ti._patch_lang_tensor = _fixed
""")
