/* segs.intake._fastscan: the decoder's native fast path (see segs/intake/decode.py).
 *
 * scan_readings() reads a batch of Kafka message values and, for each value, either
 * accepts it — a JSON object that is a valid reading by every rule of docs/contract.md,
 * with its fields stored in the caller's arrays — or declines it. It never rejects: a declined value
 * goes to the Python decoder, which alone gives reject reasons. So this file has one duty,
 * checked by a differential property test: whatever it accepts, the exact Python path
 * (segs.intake.decode._exact) accepts too, with the same values.
 *
 * It therefore accepts only a plain subset and declines everything else: values over the
 * size limit, non-ASCII bytes anywhere, escapes in the known fields or in any key, duplicate
 * known fields, nesting deeper than MAX_DEPTH in unknown fields, any rule broken. Numbers are
 * read with Clinger's fast path when it is exact (mantissa < 2^53, |power of ten| <= 22: one
 * correctly rounded IEEE operation) and with Python's own correctly rounded conversion
 * otherwise, so they equal float() of the same text bit for bit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

#include "_names.h"
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 32
#define METER_ID_MAX 64
#define REGION_MAX 100
#define VALUE_MIN 1e-12
#define VALUE_MAX 1e12

typedef const unsigned char *ptr;

static inline ptr skip_ws(ptr p, ptr end) {
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
    return p;
}

static inline int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

/* A string without escapes, p at its opening quote: sets [*s, *s + *len) to its content
 * and returns the position after the closing quote, or NULL (escape, control or non-ASCII
 * byte, no closing quote). */
static ptr plain_string(ptr p, ptr end, ptr *s, Py_ssize_t *len) {
    ptr q = ++p;
    while (q < end) {
        unsigned char c = *q;
        if (c == '"') {
            *s = p;
            *len = q - p;
            return q + 1;
        }
        if (c < 0x20 || c >= 0x80 || c == '\\') return NULL;
        q++;
    }
    return NULL;
}

static inline int is_hex(unsigned char c) {
    return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* Any JSON string (valid escapes allowed), p at its opening quote. */
static ptr any_string(ptr p, ptr end) {
    ptr q = p + 1;
    while (q < end) {
        unsigned char c = *q;
        if (c == '"') return q + 1;
        if (c < 0x20 || c >= 0x80) return NULL;
        if (c == '\\') {
            if (q + 1 >= end) return NULL;
            c = q[1];
            if (c == 'u') {
                if (end - q < 6 || !is_hex(q[2]) || !is_hex(q[3]) || !is_hex(q[4]) ||
                    !is_hex(q[5]))
                    return NULL;
                q += 6;
                continue;
            }
            if (!strchr("\"\\/bfnrt", c) || c == 0) return NULL;
            q += 2;
            continue;
        }
        q++;
    }
    return NULL;
}

/* The end of a JSON number token starting at p (grammar of RFC 8259), or NULL. */
static ptr number_end(ptr p, ptr end) {
    ptr q = p;
    if (q < end && *q == '-') q++;
    if (q >= end) return NULL;
    if (*q == '0') {
        q++;
    } else if (*q >= '1' && *q <= '9') {
        while (q < end && is_digit(*q)) q++;
    } else {
        return NULL;
    }
    if (q < end && *q == '.') {
        q++;
        if (q >= end || !is_digit(*q)) return NULL;
        while (q < end && is_digit(*q)) q++;
    }
    if (q < end && (*q == 'e' || *q == 'E')) {
        q++;
        if (q < end && (*q == '+' || *q == '-')) q++;
        if (q >= end || !is_digit(*q)) return NULL;
        while (q < end && is_digit(*q)) q++;
    }
    return q;
}

static const double POW10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                               1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                               1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* float() of the number token [p, q); 0 on success, -1 to decline. */
static int number_value(ptr p, ptr q, double *out) {
    ptr r = p;
    int neg = 0;
    if (*r == '-') {
        neg = 1;
        r++;
    }
    uint64_t m = 0;
    int digits = 0, scale = 0, exact = 1;
    for (; r < q && is_digit(*r); r++) {
        if (m || *r != '0') digits++;
        if (digits > 19) exact = 0; else m = m * 10 + (uint64_t)(*r - '0');
    }
    int integer = r == q;
    if (r < q && *r == '.') {
        for (r++; r < q && is_digit(*r); r++) {
            if (m || *r != '0') digits++;
            if (digits > 19) exact = 0; else m = m * 10 + (uint64_t)(*r - '0');
            scale--;
        }
    }
    if (r < q && (*r == 'e' || *r == 'E')) {
        r++;
        int eneg = 0;
        long e = 0;
        if (*r == '+' || *r == '-') eneg = *r++ == '-';
        for (; r < q; r++) {
            if (e < 100000) e = e * 10 + (*r - '0');
        }
        scale += (int)(eneg ? -e : e);
    }
    if (integer && m == 0) { /* JSON -0 is the integer 0: +0.0, as float(int("-0")) */
        *out = 0.0;
        return 0;
    }
    if (exact && m < ((uint64_t)1 << 53) && scale >= -22 && scale <= 22) {
        double v = (double)m;
        v = scale < 0 ? v / POW10[-scale] : v * POW10[scale];
        *out = neg ? -v : v;
        return 0;
    }
    /* Python's correctly rounded conversion, on a NUL-terminated copy of the token. */
    char buf[512];
    Py_ssize_t n = q - p;
    if (n >= (Py_ssize_t)sizeof(buf)) return -1;
    memcpy(buf, p, (size_t)n);
    buf[n] = 0;
    char *stop = NULL;
    double v = PyOS_string_to_double(buf, &stop, NULL);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    if (stop != buf + n) return -1;
    *out = v;
    return 0;
}

/* Skip any JSON value (for unknown fields), p at its first byte; NULL to decline. */
static ptr skip_value(ptr p, ptr end, int depth) {
    if (p >= end) return NULL;
    switch (*p) {
    case '"':
        return any_string(p, end);
    case '{':
    case '[': {
        if (depth >= MAX_DEPTH) return NULL;
        unsigned char close = *p == '{' ? '}' : ']';
        int object = *p == '{';
        p = skip_ws(p + 1, end);
        if (p < end && *p == close) return p + 1;
        for (;;) {
            if (object) {
                if (p >= end || *p != '"') return NULL;
                p = any_string(p, end);
                if (!p) return NULL;
                p = skip_ws(p, end);
                if (p >= end || *p != ':') return NULL;
                p = skip_ws(p + 1, end);
            }
            p = skip_value(p, end, depth + 1);
            if (!p) return NULL;
            p = skip_ws(p, end);
            if (p >= end) return NULL;
            if (*p == close) return p + 1;
            if (*p != ',') return NULL;
            p = skip_ws(p + 1, end);
        }
    }
    case 't':
        return end - p >= 4 && memcmp(p, "true", 4) == 0 ? p + 4 : NULL;
    case 'f':
        return end - p >= 5 && memcmp(p, "false", 5) == 0 ? p + 5 : NULL;
    case 'n':
        return end - p >= 4 && memcmp(p, "null", 4) == 0 ? p + 4 : NULL;
    default:
        return number_end(p, end);
    }
}

static const int DAYS_IN_MONTH[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};

static int64_t days_from_civil(int64_t y, int64_t m, int64_t d) {
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static inline int digits2(ptr s, int *v) {
    if (!is_digit(s[0]) || !is_digit(s[1])) return -1;
    *v = (s[0] - '0') * 10 + (s[1] - '0');
    return 0;
}

/* YYYY-MM-DDTHH:MM:SS[.f+](Z|+HH:MM|-HH:MM) → ms since the epoch, fraction truncated to
 * milliseconds; -1 to decline. The rules of segs.intake.decode.parse_timestamp_ms. */
static int timestamp_ms(ptr s, Py_ssize_t n, int64_t *out) {
    int year, y2, month, day, hour, minute, second;
    if (n < 20 || s[4] != '-' || s[7] != '-' || s[10] != 'T' || s[13] != ':' || s[16] != ':')
        return -1;
    if (digits2(s, &year) || digits2(s + 2, &y2) || digits2(s + 5, &month) ||
        digits2(s + 8, &day) || digits2(s + 11, &hour) || digits2(s + 14, &minute) ||
        digits2(s + 17, &second))
        return -1;
    year = year * 100 + y2;
    Py_ssize_t i = 19;
    int ms = 0;
    if (s[i] == '.') {
        i++;
        Py_ssize_t start = i;
        while (i < n && is_digit(s[i])) {
            if (i - start < 3) ms = ms * 10 + (s[i] - '0');
            i++;
        }
        if (i == start) return -1;
        for (Py_ssize_t k = i - start; k < 3; k++) ms *= 10;
    }
    if (i >= n) return -1;
    int offset_min = 0;
    if (s[i] == 'Z') {
        i++;
    } else if (s[i] == '+' || s[i] == '-') {
        int oh, om;
        if (n - i < 6 || s[i + 3] != ':' || digits2(s + i + 1, &oh) || digits2(s + i + 4, &om))
            return -1;
        if (oh > 23 || om > 59) return -1;
        offset_min = (oh * 60 + om) * (s[i] == '-' ? -1 : 1);
        i += 6;
    } else {
        return -1;
    }
    if (i != n) return -1;
    if (month < 1 || month > 12) return -1;
    int leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    if (day < 1 || day > DAYS_IN_MONTH[month - 1] + (leap && month == 2)) return -1;
    if (hour > 23 || minute > 59 || second > 59) return -1;
    int64_t seconds = days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 +
                      second;
    *out = (seconds - (int64_t)offset_min * 60) * 1000 + ms;
    return 0;
}

static inline int value_ok(double v) {
    /* finite, not negative (-0.0 passes, as in Python), 0 or within [VALUE_MIN, VALUE_MAX] */
    return v == 0 || (v >= VALUE_MIN && v <= VALUE_MAX);
}

enum { F_METER = 1, F_REGION = 2, F_TS = 4, F_POWER = 8, F_ENERGY = 16, F_VOLTAGE = 32 };

typedef struct {
    ptr meter, region;
    Py_ssize_t meter_len, region_len;
    int64_t ts;
    double power, energy, voltage;
} Reading;

static int key_field(ptr k, Py_ssize_t n) {
    switch (n) {
    case 6:
        return memcmp(k, "region", 6) == 0 ? F_REGION : 0;
    case 7:
        if (memcmp(k, "meterId", 7) == 0) return F_METER;
        if (memcmp(k, "powerKw", 7) == 0) return F_POWER;
        return memcmp(k, "voltage", 7) == 0 ? F_VOLTAGE : 0;
    case 9:
        if (memcmp(k, "timestamp", 9) == 0) return F_TS;
        return memcmp(k, "energyKwh", 9) == 0 ? F_ENERGY : 0;
    default:
        return 0;
    }
}

/* A number field, or null where allowed (energy, voltage keep their defaults). */
static ptr number_field(ptr p, ptr end, int nullable, double *out) {
    if (nullable && end - p >= 4 && memcmp(p, "null", 4) == 0) return p + 4;
    ptr q = number_end(p, end);
    if (!q || number_value(p, q, out) || !value_ok(*out)) return NULL;
    return q;
}

/* 0 and the reading when the value is accepted, -1 to decline. */
static int scan_one(ptr p, Py_ssize_t len, int64_t min_ts, int64_t max_ts, Reading *r) {
    ptr end = p + len;
    int seen = 0;
    r->energy = 0.0;
    r->voltage = Py_NAN;
    p = skip_ws(p, end);
    if (p >= end || *p != '{') return -1;
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') return -1; /* no fields: missing_field */
    for (;;) {
        ptr key;
        Py_ssize_t key_len;
        if (p >= end || *p != '"') return -1;
        p = plain_string(p, end, &key, &key_len);
        if (!p) return -1;
        p = skip_ws(p, end);
        if (p >= end || *p != ':') return -1;
        p = skip_ws(p + 1, end);
        if (p >= end) return -1;
        int f = key_field(key, key_len);
        if (f & seen) return -1; /* duplicate: the last one wins in Python; leave it there */
        seen |= f;
        switch (f) {
        case F_METER:
        case F_REGION: {
            ptr s;
            Py_ssize_t n;
            if (*p != '"' || !(p = plain_string(p, end, &s, &n))) return -1;
            if (n < 1 || n > (f == F_METER ? METER_ID_MAX : REGION_MAX)) return -1;
            if (f == F_METER) {
                r->meter = s;
                r->meter_len = n;
            } else {
                r->region = s;
                r->region_len = n;
            }
            break;
        }
        case F_TS: {
            ptr s;
            Py_ssize_t n;
            if (*p != '"' || !(p = plain_string(p, end, &s, &n))) return -1;
            if (timestamp_ms(s, n, &r->ts) || r->ts < min_ts || r->ts > max_ts) return -1;
            break;
        }
        case F_POWER:
            p = number_field(p, end, 0, &r->power);
            break;
        case F_ENERGY:
            p = number_field(p, end, 1, &r->energy);
            break;
        case F_VOLTAGE:
            p = number_field(p, end, 1, &r->voltage);
            break;
        default:
            p = skip_value(p, end, 1);
        }
        if (!p) return -1;
        p = skip_ws(p, end);
        if (p >= end) return -1;
        if (*p == '}') break;
        if (*p != ',') return -1;
        p = skip_ws(p + 1, end);
    }
    if (skip_ws(p + 1, end) != end) return -1;
    return (seen & (F_METER | F_REGION | F_TS | F_POWER)) == (F_METER | F_REGION | F_TS | F_POWER)
               ? 0
               : -1;
}

/* The slot of an interned name, or -1 (and a new str in *name) if it has none yet. slots
 * is a dict of str -> int or a NameArena. */
static int lookup(PyObject *slots, ptr s, Py_ssize_t n, PyObject **name, long *slot) {
    if (Py_IS_TYPE(slots, &NameArena_Type)) {
        *slot = (long)arena_find((NameArena *)slots, (const char *)s, n);
        if (*slot >= 0) return 0;
        *name = PyUnicode_DecodeASCII((const char *)s, n, NULL);
        return *name ? 0 : -1;
    }
    PyObject *key = PyUnicode_DecodeASCII((const char *)s, n, NULL);
    if (!key) return -1;
    PyObject *v = PyDict_GetItemWithError(slots, key);
    if (v) {
        Py_DECREF(key);
        *slot = PyLong_AsLong(v);
        if (*slot == -1 && PyErr_Occurred()) return -1;
        if (*slot < 0 || *slot > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "slots must be within 0..2**31-1");
            return -1;
        }
        return 0;
    }
    if (PyErr_Occurred()) {
        Py_DECREF(key);
        return -1;
    }
    *slot = -1;
    *name = key;
    return 0;
}

static int writable(Py_buffer *b, Py_ssize_t n, Py_ssize_t item, const char *what) {
    if (b->len < n * item || b->itemsize != item) {
        PyErr_Format(PyExc_ValueError, "%s: needs %zd items of %zd bytes", what, n, item);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(scan_readings_doc,
"scan_readings(values, max_bytes, min_ts_ms, max_ts_ms, meter_slots, region_slots,\n"
"              accepted, meter, region, ts_ms, power, energy, voltage) -> list\n\n"
"Fill the arrays for every value accepted (accepted[i] = 1; 0 = declined, the Python\n"
"decoder decides). meter_slots is a dict or a NameArena, region_slots a dict. Names\n"
"without a slot get -1; the returned list holds\n"
"(index, meter name or None, region name or None) for those.");

static PyObject *scan_readings(PyObject *self, PyObject *args) {
    PyObject *values, *meter_slots, *region_slots;
    Py_ssize_t max_bytes;
    long long min_ts, max_ts;
    Py_buffer acc, mtr, reg, ts, pw, en, vo;
    if (!PyArg_ParseTuple(args, "OnLLOO!w*w*w*w*w*w*w*", &values, &max_bytes, &min_ts,
                          &max_ts, &meter_slots, &PyDict_Type, &region_slots,
                          &acc, &mtr, &reg, &ts, &pw, &en, &vo))
        return NULL;
    PyObject *result = NULL, *batch = NULL, *fresh = NULL;
    if (!PyDict_Check(meter_slots) && !Py_IS_TYPE(meter_slots, &NameArena_Type)) {
        PyErr_SetString(PyExc_TypeError, "meter_slots must be a dict or a NameArena");
        goto done;
    }
    /* A tuple of its own: the dict lookups below may run Python code (a str subclass's
     * __eq__), which must not be able to free the values scanned. */
    batch = PySequence_Tuple(values);
    if (!batch) goto done;
    Py_ssize_t n = PyTuple_GET_SIZE(batch);
    if (writable(&acc, n, 1, "accepted") || writable(&mtr, n, 4, "meter") ||
        writable(&reg, n, 4, "region") || writable(&ts, n, 8, "ts_ms") ||
        writable(&pw, n, 8, "power") || writable(&en, n, 8, "energy") ||
        writable(&vo, n, 8, "voltage"))
        goto done;
    fresh = PyList_New(0);
    if (!fresh) goto done;
    PyObject **items = &PyTuple_GET_ITEM(batch, 0);
    uint8_t *a_acc = acc.buf;
    int32_t *a_mtr = mtr.buf, *a_reg = reg.buf;
    int64_t *a_ts = ts.buf;
    double *a_pw = pw.buf, *a_en = en.buf, *a_vo = vo.buf;
    ptr last_region = NULL;
    Py_ssize_t last_region_len = 0;
    long last_region_slot = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = items[i];
        Reading r;
        a_acc[i] = 0;
        if (!PyBytes_CheckExact(v) || PyBytes_GET_SIZE(v) > max_bytes ||
            scan_one((ptr)PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v), (int64_t)min_ts,
                     (int64_t)max_ts, &r))
            continue;
        PyObject *new_meter = NULL, *new_region = NULL;
        long m_slot, r_slot;
        if (lookup(meter_slots, r.meter, r.meter_len, &new_meter, &m_slot)) goto done;
        if (last_region && r.region_len == last_region_len &&
            memcmp(r.region, last_region, (size_t)r.region_len) == 0) {
            r_slot = last_region_slot;
        } else {
            if (lookup(region_slots, r.region, r.region_len, &new_region, &r_slot)) {
                Py_XDECREF(new_meter);
                goto done;
            }
            if (!new_region) {
                last_region = r.region;
                last_region_len = r.region_len;
                last_region_slot = r_slot;
            }
        }
        if (new_meter || new_region) {
            PyObject *t = Py_BuildValue("(nNN)", i, new_meter ? new_meter : Py_NewRef(Py_None),
                                        new_region ? new_region : Py_NewRef(Py_None));
            if (!t || PyList_Append(fresh, t)) {
                Py_XDECREF(t);
                goto done;
            }
            Py_DECREF(t);
        }
        a_acc[i] = 1;
        a_mtr[i] = (int32_t)m_slot;
        a_reg[i] = (int32_t)r_slot;
        a_ts[i] = r.ts;
        a_pw[i] = r.power;
        a_en[i] = r.energy;
        a_vo[i] = r.voltage;
    }
    result = fresh;
    fresh = NULL;
done:
    Py_XDECREF(fresh);
    Py_XDECREF(batch);
    PyBuffer_Release(&acc);
    PyBuffer_Release(&mtr);
    PyBuffer_Release(&reg);
    PyBuffer_Release(&ts);
    PyBuffer_Release(&pw);
    PyBuffer_Release(&en);
    PyBuffer_Release(&vo);
    return result;
}

static PyMethodDef methods[] = {
    {"scan_readings", scan_readings, METH_VARARGS, scan_readings_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "segs.intake._fastscan",
    .m_doc = "Native fast path of the reading decoder (see segs/intake/decode.py) and the\n"
             "compact meter-id interner NameArena (see segs/intake/_names.h).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastscan(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && arena_add_types(m) < 0) Py_CLEAR(m);
    return m;
}
