/* The compiled twin of workers.answers.tail.tail_logprob: per token, log(1 - sum(exp(top))).
 *
 * Why C: numpy's version makes seven temporary (tokens, K) arrays per answer; for a 256-token
 * top-20 score answer that was ~11% of a worker's CPU in bench/profile_unit.py, more than half
 * of what reading the whole body costs. One pass per row here, the same formula in float64:
 * logsumexp around the row's peak, then log1mexp (log1p(-exp(x)) below -ln 2, log(-expm1(x))
 * above). The numpy version stays the reference (tests/workers/test_tail.py compares them).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

PyDoc_STRVAR(tail_rows_doc,
             "tail_rows(tops: float64 buffer, k: int, out: float32 buffer) -> bool\n\n"
             "For each row of k values (row-major), log(1 - sum(exp(row))) into out as float32 "
             "(the rules of workers.answers.tail.tail_logprob). False, with out untouched, "
             "unless tops holds a whole number of rows of k >= 1 float64s and out holds one "
             "float32 per row.");

static PyObject *tail_rows(PyObject *self, PyObject *args) {
    Py_buffer tops, out;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "y*nw*", &tops, &k, &out)) return NULL;
    int ok = k >= 1 && tops.itemsize == 8 && out.itemsize == 4 && tops.len % (8 * k) == 0 &&
             out.len == tops.len / (8 * k) * 4;
    if (ok) {
        const double *x = tops.buf;
        float *tail = out.buf;
        Py_ssize_t rows = tops.len / (8 * k);
        for (Py_ssize_t r = 0; r < rows; r++, x += k) {
            double peak = -INFINITY;
            int nan = 0;
            for (Py_ssize_t j = 0; j < k; j++) {
                if (isnan(x[j])) nan = 1;
                else if (x[j] > peak) peak = x[j];
            }
            if (nan) { /* numpy: the row's max is NaN, and so is everything after it */
                tail[r] = NAN;
                continue;
            }
            if (!isfinite(peak)) peak = 0.0; /* a row of -inf: an empty top, all mass in tail */
            double sum = 0.0;
            for (Py_ssize_t j = 0; j < k; j++) sum += exp(x[j] - peak);
            double lse = log(sum) + peak;
            if (lse > 0.0) lse = 0.0; /* rounding put >= 1 in the top K: no tail, never NaN */
            tail[r] = (float)(lse < -M_LN2 ? log1p(-exp(lse)) : log(-expm1(lse)));
        }
    }
    PyBuffer_Release(&tops);
    PyBuffer_Release(&out);
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"tail_rows", tail_rows, METH_VARARGS, tail_rows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tail", "The compiled twin of workers.answers.tail.", -1, methods,
};

PyMODINIT_FUNC PyInit__tail(void) { return PyModule_Create(&module); }
