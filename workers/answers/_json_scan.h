/* JSON lexing for the compiled cores' byte scanners (workers/answers/_topk.c): whitespace,
 * strings, numbers read exactly as orjson reads them, "token_id:N" keys, a growable buffer, and
 * the set of ids one entry has shown.
 * Header-only so the hot steps inline into each scanner. Every function stops at the buffer's
 * end and returns NULL (or -1) where orjson would refuse the text or the reading is unsure, so
 * a caller can fall back to the checked path. Include after Python.h and the PREFIX / CUT /
 * MAX_DIGITS macros of the "token_id:" keys. */
#ifndef HARVEST_JSON_SCAN_H
#define HARVEST_JSON_SCAN_H

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

static inline int put(Buf *b, const void *src, Py_ssize_t n) {
    if (n < 0) return -1; /* a caller's bug: fail, so the scanner falls back */
    if (n == 0) return 0; /* K = 0: nothing to copy, and memcpy from/to NULL is undefined */
    if (b->len + n > b->cap) {
        Py_ssize_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) cap *= 2;
        char *grown = PyMem_Realloc(b->data, (size_t)cap);
        if (grown == NULL) return -1;
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, src, (size_t)n);
    b->len += n;
    return 0;
}

static inline const char *ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
    return p;
}

/* m / 10^e correctly rounded (ties to even), for 0 < m < 2^64 and 0 <= e <= 19: one exact
 * 128-bit division. Python's own dtoa (the fallback) gives the same double but is ~10x
 * slower on the 16-17 digit logprobs vLLM writes. */
static inline double ratio(uint64_t m, int e) {
    static const uint64_t POW10[20] = {1ULL,
                                       10ULL,
                                       100ULL,
                                       1000ULL,
                                       10000ULL,
                                       100000ULL,
                                       1000000ULL,
                                       10000000ULL,
                                       100000000ULL,
                                       1000000000ULL,
                                       10000000000ULL,
                                       100000000000ULL,
                                       1000000000000ULL,
                                       10000000000000ULL,
                                       100000000000000ULL,
                                       1000000000000000ULL,
                                       10000000000000000ULL,
                                       100000000000000000ULL,
                                       1000000000000000000ULL,
                                       10000000000000000000ULL};
    uint64_t den = POW10[e];
    int m_bits = 64 - __builtin_clzll(m), den_bits = 64 - __builtin_clzll(den);
    int shift = 55 + den_bits - m_bits; /* the quotient gets 55 or 56 bits, */
    if (shift < 0) shift = 0;           /* or more when m is already long enough */
    unsigned __int128 num = (unsigned __int128)m << shift;
    unsigned __int128 q = num / den;
    int sticky = num % den != 0;
    int q_bits = 64 - __builtin_clzll((uint64_t)(q >> 8)) + 8;
    int drop = q_bits - 53;
    uint64_t mant = (uint64_t)(q >> drop);
    uint64_t rest = (uint64_t)q & ((1ULL << drop) - 1), half = 1ULL << (drop - 1);
    if (rest > half || (rest == half && (sticky || (mant & 1)))) mant++;
    return ldexp((double)mant, drop - shift);
}

/* Whether the 8 bytes at p are all ASCII digits, and their value: the SWAR steps of the
 * fast_float family (digits as nibbles, pairs, quads, then the whole in three multiplies). */
static inline int eight_digits(const char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return ((v & 0xF0F0F0F0F0F0F0F0ULL) |
            (((v + 0x0606060606060606ULL) & 0xF0F0F0F0F0F0F0F0ULL) >> 4)) == 0x3333333333333333ULL;
}

static inline uint64_t eight_value(const char *p) {
    uint64_t v;
    memcpy(&v, p, 8); /* little-endian: the first digit in the lowest byte */
    v -= 0x3030303030303030ULL;
    v = v * 10 + (v >> 8); /* each even byte now holds two digits */
    v = (((v & 0x000000FF000000FFULL) * 0x000F424000000064ULL) +
         (((v >> 16) & 0x000000FF000000FFULL) * 0x0000271000000001ULL)) >> 32;
    return v;
}

/* The JSON number at p that orjson reads as a float (it has a fraction or an exponent) into
 * *v; past it, or NULL (an integer, not JSON, or not finite). */
static inline const char *float_at(const char *p, const char *end, double *v) {
    static const double EXACT[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                     1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                     1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    const char *start = p;
    int negative = 0, is_float = 0;
    Py_ssize_t digits = 0, scale = 0; /* significant digits read into m; digits after '.' */
    uint64_t m = 0;                   /* wraps past 19 digits: then unused */
    if (p < end && *p == '-') {
        negative = 1;
        p++;
    }
    if (p < end && *p == '0') {
        p++;
    } else if (p < end && *p >= '1' && *p <= '9') {
        for (; p < end && *p >= '0' && *p <= '9'; p++, digits++) m = m * 10 + (uint64_t)(*p - '0');
    } else {
        return NULL;
    }
    if (p < end && *p == '.') {
        const char *first = ++p;
        if (m == 0)
            while (p < end && *p == '0') p++; /* leading zeros: scale only */
        const char *significant = p;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        for (; end - p >= 8 && eight_digits(p); p += 8) m = m * 100000000ULL + eight_value(p);
#endif /* elsewhere: digit by digit below */
        for (; p < end && *p >= '0' && *p <= '9'; p++) m = m * 10 + (uint64_t)(*p - '0');
        if (p == first) return NULL;
        digits += p - significant;
        scale = p - first;
        is_float = 1;
    }
    Py_ssize_t exp10 = 0;
    if (p < end && (*p == 'e' || *p == 'E')) {
        int exp_negative = 0;
        p++;
        if (p < end && (*p == '+' || *p == '-')) exp_negative = *p++ == '-';
        const char *first = p;
        for (; p < end && *p >= '0' && *p <= '9'; p++)
            if (exp10 < 100000) exp10 = exp10 * 10 + (*p - '0');
        if (p == first) return NULL;
        if (exp_negative) exp10 = -exp10;
        is_float = 1;
    }
    if (!is_float) return NULL;
    Py_ssize_t e = scale - exp10; /* the value is m / 10^e */
    if (m == 0 && digits == 0) {
        *v = 0.0;
    } else if (digits <= 19 && e >= 0 && e <= 22 && m <= (1ULL << 53)) {
        *v = (double)m / EXACT[e]; /* both exact: one correctly rounded division */
    } else if (digits <= 19 && e >= 0 && e <= 19) {
        *v = ratio(m, (int)e);
    } else { /* long mantissas, large exponents: Python's correctly rounded dtoa */
        char *parsed_to;
        *v = PyOS_string_to_double(start, &parsed_to, NULL);
        if (PyErr_Occurred()) {
            PyErr_Clear();
            return NULL;
        }
        if (parsed_to != p) return NULL;
        negative = 0; /* the sign was parsed with the rest */
    }
    if (negative) *v = -*v;
    return (*v > -Py_HUGE_VAL && *v < Py_HUGE_VAL) ? p : NULL;
}

/* One '"token_id:N"' key at p; its id in *id; past the closing quote, or NULL. */
static inline const char *key_at(const char *p, const char *end, long long *id) {
    if (end - p < CUT + 3 || *p != '"' || memcmp(p + 1, PREFIX, CUT) != 0) return NULL;
    p += 1 + CUT;
    const char *digits = p;
    long long v = 0;
    while (p < end && *p >= '0' && *p <= '9' && p - digits < MAX_DIGITS) v = v * 10 + (*p++ - '0');
    if (p == digits || p >= end || *p != '"') return NULL; /* escapes, 19+ digits: unsure */
    *id = v;
    return p + 1;
}

/* Past one UTF-8 sequence at p (a byte >= 0x80), or NULL when orjson would refuse it. */
static inline const char *utf8_at(const char *p, const char *end) {
    const unsigned char *u = (const unsigned char *)p;
    int n;
    unsigned lo = 0x80, hi = 0xBF;
    if (u[0] >= 0xC2 && u[0] <= 0xDF) {
        n = 1;
    } else if (u[0] >= 0xE0 && u[0] <= 0xEF) {
        n = 2;
        if (u[0] == 0xE0) lo = 0xA0;
        if (u[0] == 0xED) hi = 0x9F; /* no surrogates */
    } else if (u[0] >= 0xF0 && u[0] <= 0xF4) {
        n = 3;
        if (u[0] == 0xF0) lo = 0x90;
        if (u[0] == 0xF4) hi = 0x8F;
    } else {
        return NULL;
    }
    if (end - p <= n || u[1] < lo || u[1] > hi) return NULL;
    for (int i = 2; i <= n; i++)
        if (u[i] < 0x80 || u[i] > 0xBF) return NULL;
    return p + n + 1;
}

static inline int hex(char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* Past the JSON string at p ('"'); NULL if unterminated or anything orjson would refuse
 * (a control character, an unknown escape, bad UTF-8; an escaped lone surrogate is left to
 * orjson too), or an escaped NUL. Every string of a body scan_prompt_logprobs accepts passes
 * here, so the caller need not search the body for a forged marker. */
static inline const char *skip_string(const char *p, const char *end) {
    for (p++; p < end;) {
        unsigned char c = (unsigned char)*p;
        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') { /* plain ASCII: the usual byte */
            p++;
            continue;
        }
        if (c == '"') return p + 1;
        if (c < 0x20) return NULL;
        if (c == '\\') {
            if (end - p < 2) return NULL;
            char e = p[1];
            if (e == 'u') {
                if (end - p < 6 || !hex(p[2]) || !hex(p[3]) || !hex(p[4]) || !hex(p[5]))
                    return NULL;
                if ((p[2] == 'd' || p[2] == 'D') && strchr("89abcdefABCDEF", p[3]))
                    return NULL; /* surrogates: pairs and lone ones, orjson decides */
                if (memcmp(p + 2, "0000", 4) == 0)
                    return NULL; /* a NUL: it could forge the marker this scan writes */
                p += 6;
            } else if (strchr("\"\\/bfnrt", e) != NULL && e != '\0') {
                p += 2;
            } else {
                return NULL;
            }
        } else if (c >= 0x80) {
            p = utf8_at(p, end);
            if (p == NULL) return NULL;
        } else {
            p++;
        }
    }
    return NULL;
}

/* Past a JSON number at p (the grammar exactly), or NULL. */
static inline const char *skip_number(const char *p, const char *end) {
    if (p < end && *p == '-') p++;
    if (p < end && *p == '0') {
        p++;
    } else if (p < end && *p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9') p++;
    } else {
        return NULL;
    }
    if (p < end && *p == '.') {
        const char *first = ++p;
        while (p < end && *p >= '0' && *p <= '9') p++;
        if (p == first) return NULL;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        const char *first = p;
        while (p < end && *p >= '0' && *p <= '9') p++;
        if (p == first) return NULL;
    }
    return p;
}

/* Past a JSON value that is a string, a number or null (what "rank" and "decoded_token"
 * hold); NULL for anything else. */
static inline const char *skip_simple(const char *p, const char *end) {
    if (p >= end) return NULL;
    if (*p == '"') return skip_string(p, end);
    if (end - p >= 4 && memcmp(p, "null", 4) == 0) return p + 4;
    return skip_number(p, end);
}


/* The ids of one entry seen so far: open addressing, a slot is in use when its stamp is the
 * entry's, so a new entry starts empty without clearing the table. Linear in K per entry where
 * a scan of the ids before it was quadratic (8,000 compares per token at K=128). */
typedef struct {
    long long id;
    Py_ssize_t stamp;
} Slot;

typedef struct {
    Slot *slots;
    size_t mask;
    Py_ssize_t stamp;
} Seen;

/* 1 if id was already seen in this entry, else 0 (and it is seen from now on). */
static inline int seen_before(Seen *seen, long long id) {
    size_t h = (size_t)(((unsigned long long)id * 0x9E3779B97F4A7C15ULL) >> 20) & seen->mask;
    while (seen->slots[h].stamp == seen->stamp) {
        if (seen->slots[h].id == id) return 1;
        h = (h + 1) & seen->mask;
    }
    seen->slots[h].stamp = seen->stamp;
    seen->slots[h].id = id;
    return 0;
}

#endif
