/* The compiled core of workers.answers.fastparse: vLLM's top-K alternatives into flat buffers.
 *
 * Why C: a 256-token top-20 answer holds ~5,000 "token_id:N" -> logprob pairs, and even
 * numpy passes over them cost ~100 ns per pair in Python-level glue (joining keys, padding,
 * argsort). fill_key_ids / fill_top_k read each pair once from the dicts orjson built;
 * scan_top_k reads the top_logprobs arrays straight from the body's bytes, so those dicts are
 * never built at all (orjson is then given the rest of the body).
 *
 * All three give up at the first doubt (False, or None for scan_top_k; buffers are then in an
 * unspecified state) and the caller falls back: to the checked path (workers.answers.parse), which
 * names the problem, or for scan_top_k to orjson over the whole body. They accept only what
 * that path accepts and give the same values: exact str keys "token_id:" + 1-18 ASCII digits,
 * exact float values (ints, bools and NaN are left to the checked path), K or K+1 entries per
 * token, best K by a stable descending sort.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PREFIX "token_id:"
#define CUT 9
#define MAX_DIGITS 18

#include "_json_scan.h" /* the JSON lexing both byte scanners share */

/* The id of an exact str "token_id:<1-18 ASCII digits>", or -1. */
static long long key_id(PyObject *key) {
    if (!PyUnicode_CheckExact(key) || !PyUnicode_IS_ASCII(key)) return -1;
    Py_ssize_t len = PyUnicode_GET_LENGTH(key);
    if (len <= CUT || len > CUT + MAX_DIGITS) return -1;
    const char *s = (const char *)PyUnicode_1BYTE_DATA(key);
    if (memcmp(s, PREFIX, CUT) != 0) return -1;
    long long v = 0;
    for (Py_ssize_t i = CUT; i < len; i++) {
        unsigned d = (unsigned)(unsigned char)s[i] - (unsigned)'0';
        if (d > 9) return -1;
        v = v * 10 + (long long)d;
    }
    return v;
}

/* Add (id, v) to a token's first `filled` alternatives, kept best first: a stable insertion
 * that moves only past strictly smaller values, so ties keep the server's order. */
static void insert_best(long long *ids, double *lps, Py_ssize_t filled, long long id, double v) {
    Py_ssize_t j = filled;
    while (j > 0 && lps[j - 1] < v) {
        lps[j] = lps[j - 1];
        ids[j] = ids[j - 1];
        j--;
    }
    lps[j] = v;
    ids[j] = id;
}

/* A writable C-contiguous buffer of at least `items` 8-byte values. */
static int big_enough(Py_buffer *buf, Py_ssize_t items) {
    return buf->itemsize == 8 && buf->len >= items * 8;
}

PyDoc_STRVAR(fill_key_ids_doc,
             "fill_key_ids(keys: list[str], out: int64 buffer) -> bool\n\n"
             "The id of every 'token_id:N' key into out; False if any key is not exactly that.");

static PyObject *fill_key_ids(PyObject *self, PyObject *args) {
    PyObject *keys;
    Py_buffer out;
    if (!PyArg_ParseTuple(args, "O!w*", &PyList_Type, &keys, &out)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(keys);
    int ok = big_enough(&out, n);
    long long *ids = (long long *)out.buf;
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        long long id = key_id(PyList_GET_ITEM(keys, i));
        if (id < 0) ok = 0;
        ids[i] = id;
    }
    PyBuffer_Release(&out);
    return PyBool_FromLong(ok);
}

PyDoc_STRVAR(fill_top_k_doc,
             "fill_top_k(tops: list[dict[str, float]], k: int, ids: int64 buffer, "
             "logprobs: float64 buffer) -> bool\n\n"
             "Per token, the k best alternatives by logprob (descending, ties in the server's "
             "order) into row-major (len(tops), k) buffers; False unless every entry is a dict "
             "of k or k+1 'token_id:N' -> float pairs.");

static PyObject *fill_top_k(PyObject *self, PyObject *args) {
    PyObject *tops;
    Py_ssize_t k;
    Py_buffer ids_buf, lps_buf;
    if (!PyArg_ParseTuple(args, "O!nw*w*", &PyList_Type, &tops, &k, &ids_buf, &lps_buf))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(tops);
    int ok = k > 0 && big_enough(&ids_buf, n * k) && big_enough(&lps_buf, n * k);
    long long *row_ids = NULL;
    double *row_lps = NULL;
    if (ok) {
        row_ids = PyMem_Malloc(sizeof(long long) * (size_t)(k + 1));
        row_lps = PyMem_Malloc(sizeof(double) * (size_t)(k + 1));
        if (row_ids == NULL || row_lps == NULL) {
            PyMem_Free(row_ids);
            PyMem_Free(row_lps);
            PyBuffer_Release(&ids_buf);
            PyBuffer_Release(&lps_buf);
            return PyErr_NoMemory();
        }
    }
    long long *ids = (long long *)ids_buf.buf;
    double *lps = (double *)lps_buf.buf;
    for (Py_ssize_t t = 0; ok && t < n; t++) {
        PyObject *entry = PyList_GET_ITEM(tops, t);
        if (!PyDict_CheckExact(entry)) {
            ok = 0;
            break;
        }
        Py_ssize_t width = PyDict_GET_SIZE(entry);
        if (width < k || width > k + 1) {
            ok = 0;
            break;
        }
        Py_ssize_t pos = 0, filled = 0;
        PyObject *key, *value;
        while (PyDict_Next(entry, &pos, &key, &value)) {
            long long id = key_id(key);
            if (id < 0 || !PyFloat_CheckExact(value)) {
                ok = 0;
                break;
            }
            double v = PyFloat_AS_DOUBLE(value);
            if (v != v) { /* NaN: no order to agree on */
                ok = 0;
                break;
            }
            insert_best(row_ids, row_lps, filled++, id, v);
        }
        if (ok) {
            memcpy(ids + t * k, row_ids, sizeof(long long) * (size_t)k);
            memcpy(lps + t * k, row_lps, sizeof(double) * (size_t)k);
        }
    }
    PyMem_Free(row_ids);
    PyMem_Free(row_lps);
    PyBuffer_Release(&ids_buf);
    PyBuffer_Release(&lps_buf);
    return PyBool_FromLong(ok);
}


/* ---- from the body's bytes: every "top_logprobs" array read without Python objects ---- */

/* The top_logprobs array at p ('['): each entry's best k appended to ids / lps, one more row
 * per entry in *rows. Past the closing ']', or NULL when anything is not as the dict path
 * (fill_top_k over orjson's objects) would surely read it: the caller then parses it all. */
static const char *read_tops(const char *p, const char *end, Py_ssize_t k, Buf *ids, Buf *lps,
                             long long *row_ids, double *row_lps, Py_ssize_t *rows, Seen *seen) {
    p = ws(p + 1, end);
    if (p < end && *p == ']') return NULL;
    for (;;) {
        if (p >= end || *p != '{') return NULL;
        p = ws(p + 1, end);
        Py_ssize_t filled = 0;
        seen->stamp++;
        for (;;) {
            long long id;
            p = key_at(p, end, &id);
            if (p == NULL) return NULL;
            p = ws(p, end);
            if (p >= end || *p != ':') return NULL;
            p = ws(p + 1, end);
            double v;
            const char *num_end = float_at(p, end, &v);
            if (num_end == NULL || filled > k) return NULL;
            if (seen_before(seen, id)) return NULL; /* a repeated id: the dict keeps one */
            insert_best(row_ids, row_lps, filled++, id, v);
            p = ws(num_end, end);
            if (p < end && *p == ',') {
                p = ws(p + 1, end);
                continue;
            }
            if (p < end && *p == '}') break;
            return NULL;
        }
        if (filled < k) return NULL;
        if (put(ids, row_ids, (Py_ssize_t)sizeof(long long) * k) < 0 ||
            put(lps, row_lps, (Py_ssize_t)sizeof(double) * k) < 0)
            return NULL;
        (*rows)++;
        p = ws(p + 1, end);
        if (p < end && *p == ',') {
            p = ws(p + 1, end);
            continue;
        }
        if (p < end && *p == ']') return p + 1;
        return NULL;
    }
}

PyDoc_STRVAR(scan_top_k_doc,
             "scan_top_k(body: bytes, k: int) -> (bytes, bytearray, bytearray, list[int]) | None\n\n"
             "Every \"top_logprobs\": [...] array of the body read into row-major int64 ids and "
             "float64 logprobs (best k per token, as fill_top_k), the body returned with each "
             "array replaced by the JSON string \"\\u0000<i>\" (i counting arrays), and the rows "
             "of each array. None when any array is not surely read as the dict path would.");

static PyObject *scan_top_k(PyObject *self, PyObject *args) {
    const char *body;
    Py_ssize_t size, k;
    if (!PyArg_ParseTuple(args, "y#n", &body, &size, &k)) return NULL;
    if (k <= 0) Py_RETURN_NONE;
    const char *p = body, *end = body + size, *copied = body;
    Buf out = {0}, ids = {0}, lps = {0};
    long long *row_ids = PyMem_Malloc(sizeof(long long) * (size_t)(k + 1));
    double *row_lps = PyMem_Malloc(sizeof(double) * (size_t)(k + 1));
    size_t table = 16; /* a power of two at least twice the k + 1 ids of an entry */
    while (table < 2 * (size_t)(k + 1)) table *= 2;
    Seen seen = {PyMem_Calloc(table, sizeof(Slot)), table - 1, 0};
    PyObject *rows = PyList_New(0), *result = NULL;
    int ok = row_ids != NULL && row_lps != NULL && rows != NULL && seen.slots != NULL;
    Py_ssize_t arrays = 0;
    while (ok && p < end) {
        const char *q = memchr(p, '"', (size_t)(end - p));
        if (q == NULL) break;
        const char *s = q + 1; /* the string's end, past escapes */
        int escaped = 0;
        while (s < end && *s != '"') {
            if (*s == '\\') {
                escaped = 1;
                s++;
            }
            s++;
        }
        if (s >= end) { /* unterminated: orjson names the problem */
            ok = 0;
            break;
        }
        p = s + 1;
        if (escaped || s - q - 1 != 12 || memcmp(q + 1, "top_logprobs", 12) != 0) continue;
        const char *v = ws(p, end);
        if (v >= end || *v != ':') continue; /* a value, not a key */
        v = ws(v + 1, end);
        if (v >= end || *v != '[') continue; /* null and the like: the checked path decides */
        Py_ssize_t n = 0;
        const char *after = read_tops(v, end, k, &ids, &lps, row_ids, row_lps, &n, &seen);
        if (after == NULL) {
            ok = 0;
            break;
        }
        char marker[32];
        int m = snprintf(marker, sizeof marker, "\"\\u0000%zd\"", arrays++);
        PyObject *count = PyLong_FromSsize_t(n);
        if (count == NULL || PyList_Append(rows, count) < 0 || put(&out, copied, v - copied) < 0 ||
            put(&out, marker, m) < 0) {
            Py_XDECREF(count);
            ok = 0;
            break;
        }
        Py_DECREF(count);
        copied = p = after;
    }
    if (ok && arrays > 0 && put(&out, copied, end - copied) == 0) {
        result = Py_BuildValue("(y#y#y#O)", out.data, out.len, ids.data, ids.len, lps.data,
                               lps.len, rows);
    }
    PyMem_Free(out.data);
    PyMem_Free(ids.data);
    PyMem_Free(lps.data);
    PyMem_Free(row_ids);
    PyMem_Free(row_lps);
    PyMem_Free(seen.slots);
    Py_XDECREF(rows);
    if (result == NULL && !PyErr_Occurred()) Py_RETURN_NONE;
    return result;
}

#include "_prompt_scan.h" /* scan_prompt_logprobs: score mode */

static PyMethodDef methods[] = {
    {"fill_key_ids", fill_key_ids, METH_VARARGS, fill_key_ids_doc},
    {"fill_top_k", fill_top_k, METH_VARARGS, fill_top_k_doc},
    {"scan_top_k", scan_top_k, METH_VARARGS, scan_top_k_doc},
    {"scan_prompt_logprobs", scan_prompt_logprobs, METH_VARARGS, scan_prompt_logprobs_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_topk", "The compiled core of workers.answers.fastparse.", -1, methods,
};

PyMODINIT_FUNC PyInit__topk(void) { return PyModule_Create(&module); }
