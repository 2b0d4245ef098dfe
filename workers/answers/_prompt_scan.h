/* The score-mode scanner of workers/answers/_topk.c (its own file to keep each one small):
 * vLLM's "prompt_logprobs" arrays read from a score answer's bytes. Included by _topk.c after
 * _json_scan.h and the "token_id:" macros; not a separate module. */
#ifndef HARVEST_PROMPT_SCAN_H
#define HARVEST_PROMPT_SCAN_H

/* ---- score mode: the "prompt_logprobs" array, entries {"<id>": {"logprob", "rank",
 * "decoded_token"}, ...}, read from the bytes (workers.teacher.score's checked path is the
 * reference: the actual token's logprob, and exactly k alternatives sorted by (-logprob, id),
 * the actual token dropped when it was added as a k+1st key). ---- */

/* Whether (id, v) ranks before (id2, v2): larger logprob first, then the smaller id. */
static int before(long long id, double v, long long id2, double v2) {
    return v > v2 || (v == v2 && id < id2);
}

/* Past the name at p when it is written exactly "logprob", "rank" or "decoded_token" (what
 * skip_string would pass, found without a byte loop), else NULL. */
static inline const char *known_name(const char *p, const char *end) {
    Py_ssize_t left = end - p;
    if (left >= 9 && memcmp(p, "\"logprob\"", 9) == 0) return p + 9;
    if (left >= 6 && memcmp(p, "\"rank\"", 6) == 0) return p + 6;
    if (left >= 15 && memcmp(p, "\"decoded_token\"", 15) == 0) return p + 15;
    return NULL;
}

/* One entry at p ('{'): every key's id and logprob into row_ids / row_lps (at most k + 1),
 * *count of them; past its '}', or NULL when unsure. */
static const char *read_entry(const char *p, const char *end, Py_ssize_t k, long long *row_ids,
                              double *row_lps, Py_ssize_t *count) {
    Py_ssize_t filled = 0;
    p = ws(p + 1, end);
    if (p < end && *p == '}') return NULL; /* an empty entry: the checked path names it */
    for (;;) {
        if (p >= end || *p != '"' || filled > k) return NULL;
        const char *digits = ++p;
        long long id = 0;
        while (p < end && *p >= '0' && *p <= '9' && p - digits < MAX_DIGITS) id = id * 10 + (*p++ - '0');
        if (p == digits || p >= end || *p != '"') return NULL;
        p = ws(p + 1, end);
        if (p >= end || *p != ':') return NULL;
        p = ws(p + 1, end);
        if (p >= end || *p != '{') return NULL;
        p = ws(p + 1, end);
        int have = 0;
        double v = 0.0;
        for (;;) { /* the value object: "logprob" once, "rank" / "decoded_token" skipped */
            if (p >= end || *p != '"') return NULL;
            const char *name = p + 1, *after = known_name(p, end);
            if (after == NULL) after = skip_string(p, end);
            if (after == NULL) return NULL;
            Py_ssize_t len = after - name - 1;
            p = ws(after, end);
            if (p >= end || *p != ':') return NULL;
            p = ws(p + 1, end);
            if (len == 7 && memcmp(name, "logprob", 7) == 0) {
                if (have) return NULL; /* repeated: the dict keeps the last one */
                p = float_at(p, end, &v);
                have = 1;
            } else if ((len == 4 && memcmp(name, "rank", 4) == 0) ||
                       (len == 13 && memcmp(name, "decoded_token", 13) == 0)) {
                p = skip_simple(p, end);
            } else {
                return NULL;
            }
            if (p == NULL) return NULL;
            p = ws(p, end);
            if (p < end && *p == ',') {
                p = ws(p + 1, end);
                continue;
            }
            if (p < end && *p == '}') break;
            return NULL;
        }
        if (!have) return NULL;
        for (Py_ssize_t j = 0; j < filled; j++)
            if (row_ids[j] == id) return NULL; /* a repeated id: the dict keeps one */
        row_ids[filled] = id;
        row_lps[filled++] = v;
        p = ws(p + 1, end);
        if (p < end && *p == ',') {
            p = ws(p + 1, end);
            continue;
        }
        if (p < end && *p == '}') break;
        return NULL;
    }
    *count = filled;
    return p + 1;
}

PyDoc_STRVAR(scan_prompt_logprobs_doc,
             "scan_prompt_logprobs(body: bytes, k: int, ids: int64 buffer, lengths: int64 "
             "buffer, starts: int64 buffer)\n"
             "    -> (bytes, bytearray, bytearray, bytearray) | None\n\n"
             "The \"prompt_logprobs\" arrays of a score answer read from the bytes, one per "
             "sequence: ids holds the sequences one after another, lengths[j] and starts[j] say "
             "how long the j-th is and where its scored positions start. The j-th array met is "
             "read against the j-th sequence: for its positions start.., the actual token's "
             "logprob (float64) and exactly k alternatives (int64 ids, float64 logprobs, sorted "
             "by (-logprob, id); the actual token dropped when it came as a k+1st key), all "
             "sequences' rows one after another; the body returned with the j-th array replaced "
             "by \"\\u0000p<j>\". None when anything is not surely as the checked path reads it, "
             "or the body holds another number of arrays than sequences.");

/* The array at v ('['), read against the sequence want[0..n) from position start on: its rows
 * appended to own / top_ids / top_lps; past its ']', or NULL when unsure. */
static const char *read_array(const char *v, const char *end, Py_ssize_t k, const long long *want,
                              Py_ssize_t n, Py_ssize_t start, long long *row_ids, double *row_lps,
                              Buf *own, Buf *top_ids, Buf *top_lps) {
    const char *r = ws(v + 1, end);
    if (end - r < 4 || memcmp(r, "null", 4) != 0) return NULL;
    r = ws(r + 4, end);
    if (r < end && *r == ']') return n == 1 ? r + 1 : NULL; /* one token: nothing to score */
    for (Py_ssize_t pos = 1;; pos++) {
        if (r >= end || *r != ',' || pos >= n) return NULL;
        r = ws(r + 1, end);
        if (r >= end || *r != '{') return NULL;
        Py_ssize_t count = 0;
        r = read_entry(r, end, k, row_ids, row_lps, &count);
        if (r == NULL || count < k) return NULL;
        if (pos >= start) {
            long long actual = want[pos];
            Py_ssize_t at = -1, keep = 0;
            for (Py_ssize_t j = 0; j < count; j++)
                if (row_ids[j] == actual) at = j;
            if (at < 0) return NULL;
            double own_lp = row_lps[at];
            long long best_ids[k + 1];
            double best_lps[k + 1];
            for (Py_ssize_t j = 0; j < count; j++) {
                if (j == at && count == k + 1) continue; /* added beside the top k */
                Py_ssize_t i = keep++;
                while (i > 0 && before(row_ids[j], row_lps[j], best_ids[i - 1], best_lps[i - 1])) {
                    best_ids[i] = best_ids[i - 1];
                    best_lps[i] = best_lps[i - 1];
                    i--;
                }
                best_ids[i] = row_ids[j];
                best_lps[i] = row_lps[j];
            }
            if (put(own, &own_lp, sizeof(double)) < 0 ||
                put(top_ids, best_ids, (Py_ssize_t)sizeof(long long) * k) < 0 ||
                put(top_lps, best_lps, (Py_ssize_t)sizeof(double) * k) < 0)
                return NULL;
        }
        r = ws(r, end);
        if (r < end && *r == ']') return pos == n - 1 ? r + 1 : NULL;
    }
}

static PyObject *scan_prompt_logprobs(PyObject *self, PyObject *args) {
    const char *body;
    Py_ssize_t size, k;
    Py_buffer ids_buf, len_buf, start_buf;
    if (!PyArg_ParseTuple(args, "y#ny*y*y*", &body, &size, &k, &ids_buf, &len_buf, &start_buf))
        return NULL;
    const long long *want = ids_buf.buf, *lengths = len_buf.buf, *starts = start_buf.buf;
    Py_ssize_t total = ids_buf.itemsize == 8 ? ids_buf.len / 8 : -1;
    Py_ssize_t seqs = len_buf.itemsize == 8 ? len_buf.len / 8 : -1;
    const char *p = body, *end = body + size, *copied = body;
    Buf out = {0}, top_ids = {0}, top_lps = {0}, own = {0};
    long long *row_ids = PyMem_Malloc(sizeof(long long) * (size_t)(k + 2));
    double *row_lps = PyMem_Malloc(sizeof(double) * (size_t)(k + 2));
    PyObject *result = NULL;
    int ok = row_ids != NULL && row_lps != NULL && k >= 0 && seqs >= 1 &&
             start_buf.itemsize == 8 && start_buf.len / 8 == seqs;
    Py_ssize_t sum = 0;
    for (Py_ssize_t j = 0; ok && j < seqs; j++) {
        ok = lengths[j] >= 1 && starts[j] >= 1 && starts[j] <= lengths[j];
        sum += ok ? lengths[j] : 0;
    }
    ok = ok && sum == total;
    Py_ssize_t found = 0, offset = 0; /* arrays read so far; where the next sequence starts */
    while (ok && p < end) {
        const char *q = memchr(p, '"', (size_t)(end - p));
        if (q == NULL) break;
        const char *s = skip_string(q, end);
        if (s == NULL) {
            ok = 0;
            break;
        }
        p = s;
        if (s - q - 2 != 15 || memcmp(q + 1, "prompt_logprobs", 15) != 0) continue;
        const char *v = ws(p, end);
        if (v >= end || *v != ':') continue; /* a value, not a key */
        v = ws(v + 1, end);
        if (found == seqs || v >= end || *v != '[') { /* one too many, or null: checked path */
            ok = 0;
            break;
        }
        const char *after = read_array(v, end, k, want + offset, lengths[found], starts[found],
                                       row_ids, row_lps, &own, &top_ids, &top_lps);
        char mark[40];
        int mark_len = snprintf(mark, sizeof mark, "\"\\u0000p%zd\"", found);
        if (after == NULL || put(&out, copied, v - copied) < 0 || put(&out, mark, mark_len) < 0) {
            ok = 0;
            break;
        }
        offset += lengths[found++];
        p = copied = after;
    }
    if (ok && found == seqs && put(&out, copied, end - copied) == 0) {
        const char *none = ""; /* k = 0 leaves the top-K buffers unallocated */
        result = Py_BuildValue("(y#y#y#y#)", out.data, out.len,
                               top_ids.data ? top_ids.data : none, top_ids.len,
                               top_lps.data ? top_lps.data : none, top_lps.len,
                               own.data ? own.data : none, own.len);
    }
    PyBuffer_Release(&ids_buf);
    PyBuffer_Release(&len_buf);
    PyBuffer_Release(&start_buf);
    PyMem_Free(out.data);
    PyMem_Free(top_ids.data);
    PyMem_Free(top_lps.data);
    PyMem_Free(own.data);
    PyMem_Free(row_ids);
    PyMem_Free(row_lps);
    if (result == NULL && !PyErr_Occurred()) Py_RETURN_NONE;
    return result;
}

#endif
