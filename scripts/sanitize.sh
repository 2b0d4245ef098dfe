#!/usr/bin/env bash
# The parser's compiled cores (workers/answers/_topk.c reads bytes a server sent; _tail.c the
# values read): build them with AddressSanitizer + UndefinedBehaviorSanitizer and run the parser
# tests and a random-edit fuzz of real bodies against that build. Any finding aborts the
# interpreter, so pytest fails.
#
# The build goes into a copy of the sources under .cache/sanitize (the checkout's own module is
# left alone); pytest runs from there, so `workers` is that copy. CPython is not instrumented:
# libasan is preloaded, PYTHONMALLOC=malloc puts every object (a body's bytes too) in ASan's
# heap so a read past a body's end is caught, and leak detection is off (the interpreter keeps
# its objects at exit by design).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute: pytest runs from the copy
CC=${CC:-gcc}
OUT=.cache/sanitize
rm -rf "$OUT"
mkdir -p "$OUT"
cp -r schemas workers tests pyproject.toml "$OUT"/
find "$OUT" -name '*.so' -delete
find "$OUT" -name '__pycache__' -prune -exec rm -rf {} +
INCLUDE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
for core in _topk _tail; do
  "$CC" -shared -fPIC -O1 -g -fno-omit-frame-pointer \
    -fsanitize=address,undefined -fno-sanitize-recover=all \
    -I"$INCLUDE" -Wall -Werror \
    "workers/answers/$core.c" -o "$OUT/workers/answers/$core$SUFFIX"
done
ASAN_LIB=$("$CC" -print-file-name=libasan.so)
[[ -f $ASAN_LIB ]] || { echo "sanitize: $CC has no libasan (Debian: apt-get install gcc)" >&2; exit 1; }
cd "$OUT"
export LD_PRELOAD="$ASAN_LIB" PYTHONMALLOC=malloc
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export HARVEST_FUZZ_EDITS=${HARVEST_FUZZ_EDITS:-4000}
# The check that the instrumented module is the one under test (not the checkout's).
"$PY" -c '
from pathlib import Path
from workers.answers import fastparse, tail
for core in (fastparse.compiled, tail.compiled):
    assert core is not None, "a sanitized core did not import"
    assert Path(core.__file__).resolve().is_relative_to(Path.cwd().resolve()), core.__file__
    print("sanitized core:", core.__file__)
'
"$PY" -m pytest -q -p no:cacheprovider --capture=sys tests/workers/answers  # fd 2 free: a report survives an abort
