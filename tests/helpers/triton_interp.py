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

    # and every call of a @triton.jit helper (tl.sum, tl.zeros, ours) from a kernel patches
    # triton.language over again (inspect.getmembers of each module, a third of the run; such
    # patches are never undone): skipped where the running launch or a helper in it has
    # patched the helper's modules already (same builder, so the same patches), else done
    _fn_langs = {}
    def _langs(fn):
        if fn not in _fn_langs:
            _fn_langs[fn] = {id(v) for v in fn.__globals__.values()
                             if v is ti.tl or v is ti.tl.core}
        return _fn_langs[fn]
    _launched = []
    _launch = ti.GridExecutor.__call__
    def _run_launch(self, *args, **kwargs):
        _launched.append(_langs(self.fn))
        try:
            return _launch(self, *args, **kwargs)
        finally:
            _launched.pop()
    ti.GridExecutor.__call__ = _run_launch
    def _call_helper(self, *args, **kwargs):
        langs = _langs(self.fn)
        if not (_launched and langs <= _launched[-1]):
            ti._patch_lang(self.fn)
            if _launched:
                _launched[-1] |= langs
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise ti.InterpreterError(repr(e)) from e
    ti.InterpretedFunction.__call__ = _call_helper

    # and its numpy dtype of a triton dtype builds a dict of 19 dtypes for each value: once
    _np_dtypes = {}
    _np_dtype = ti._get_np_dtype
    def _get_np_dtype(tt_dtype):
        key = tt_dtype.element_ty if isinstance(tt_dtype, ti.tl.block_type) else tt_dtype
        if isinstance(key, ti.tl.pointer_type):
            return _np_dtype(key)
        if key not in _np_dtypes:
            _np_dtypes[key] = _np_dtype(key)
        return _np_dtypes[key]
    ti._get_np_dtype = _get_np_dtype

    # and each tl.tuple (every tensor's shape is one, so every op makes some) builds its
    # tuple_type at once, and the type its name string (a quarter of a run, nearly all never
    # read): both on first use, from the same values and fields
    _core = ti.tl.core
    _tuple_type = _core.tuple_type
    def _tuple_type_init(self, types, fields=None):
        self.types = types
        self.fields = fields or [''] * len(types)
    _tuple_type.__init__ = _tuple_type_init
    _tuple_type.name = property(
        lambda self: '[' + ','.join([f"{k}:{v}" for k, v in zip(self.fields, self.types)]) + ']')
    def _tuple_init(self, args, type=None):
        self.values = [i for i in args]
        if type is not None and not isinstance(type, _tuple_type):
            type = _tuple_type(type)  # make_template's list of types
        self.__dict__["_lazy_type"] = type
    def _tuple_get_type(self):
        t = self.__dict__.get("_lazy_type")
        if t is None:
            t = self.__dict__["_lazy_type"] = _core._type_for_tuple_values(self.values)
        return t
    def _tuple_set_type(self, t):
        self.__dict__["_lazy_type"] = t
    _core.tuple.__init__ = _tuple_init
    _core.tuple.type = property(_tuple_get_type, _tuple_set_type)
""")


def run_interpreted(script: str, timeout: int = 300) -> str:
    """Run PRELUDE + script in a Python of its own under TRITON_INTERPRET=1 with src/ on the
    path; its stdout, or an AssertionError with the end of its stderr."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(SRC)}
    p = subprocess.run([sys.executable, "-c", PRELUDE + script], env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout
