/* NameArena: see _names.h. */
#include "_names.h"

#include <stdlib.h>
#include <string.h>

#define MIN_SLOTS 1024
#define MIN_TABLE 2048
#define MIN_DEAD 65536 /* dead bytes below this are never worth a compaction */

/* Room for need items in *p, growing by a quarter at least (segs.intake.readings.room);
 * -1 with MemoryError set. */
static int grow(void *p, Py_ssize_t *cap, Py_ssize_t need, size_t item) {
    void **at = p;
    if (need <= *cap && *at) return 0; /* allocated even for 0 items: never a NULL buffer */
    Py_ssize_t c = *cap + *cap / 4;
    if (c < need) c = need;
    if (c < MIN_SLOTS) c = MIN_SLOTS;
    void *q = PyMem_Realloc(*at, (size_t)c * item);
    if (!q) {
        PyErr_NoMemory();
        return -1;
    }
    *at = q;
    *cap = c;
    return 0;
}

static inline Py_hash_t hash_of(const char *p, Py_ssize_t n) {
#if PY_VERSION_HEX >= 0x030E0000
    return Py_HashBuffer(p, n); /* 3.14 made the keyed bytes hash public */
#else
    return _Py_HashBytes(p, n);
#endif
}

static Py_ssize_t find_hashed(NameArena *a, const char *p, Py_ssize_t n, Py_hash_t h) {
    for (size_t i = (size_t)h & a->mask;; i = (i + 1) & a->mask) {
        int32_t s = a->table[i];
        if (s < 0) return -1;
        if (a->hash[s] == h && a->len[s] == n && memcmp(a->buf + a->off[s], p, (size_t)n) == 0)
            return s;
    }
}

Py_ssize_t arena_find(NameArena *a, const char *p, Py_ssize_t n) {
    return find_hashed(a, p, n, hash_of(p, n));
}

static int table_resize(NameArena *a, size_t size) {
    int32_t *t = PyMem_Malloc(size * sizeof(int32_t));
    if (!t) {
        PyErr_NoMemory();
        return -1;
    }
    memset(t, 0xff, size * sizeof(int32_t));
    size_t mask = size - 1;
    for (Py_ssize_t s = 0; s < a->n; s++) {
        if (a->len[s] < 0) continue;
        size_t i = (size_t)a->hash[s] & mask;
        while (t[i] >= 0) i = (i + 1) & mask;
        t[i] = (int32_t)s;
    }
    PyMem_Free(a->table);
    a->table = t;
    a->mask = mask;
    return 0;
}

/* Stores a name not in the table, of hash h; returns its slot, or -1 with an exception set. */
static Py_ssize_t arena_add(NameArena *a, const char *p, Py_ssize_t n, Py_hash_t h) {
    if ((size_t)(a->live + 1) * 2 > a->mask + 1 && table_resize(a, (a->mask + 1) * 2)) return -1;
    if (grow(&a->buf, &a->buf_cap, a->buf_len + n, 1)) return -1;
    Py_ssize_t s;
    if (a->n_free) {
        if (grow(&a->reused, &a->reused_cap, a->n_reused + 1, sizeof(int32_t))) return -1;
        s = a->free_[--a->n_free];
        a->reused[a->n_reused++] = (int32_t)s;
    } else {
        if (a->n >= INT32_MAX) {
            PyErr_SetString(PyExc_OverflowError, "more than 2**31-1 names");
            return -1;
        }
        Py_ssize_t c1 = a->cap, c2 = a->cap, c3 = a->cap;
        if (grow(&a->off, &c1, a->n + 1, sizeof(int64_t)) ||
            grow(&a->len, &c2, a->n + 1, sizeof(int32_t)) ||
            grow(&a->hash, &c3, a->n + 1, sizeof(Py_hash_t)))
            return -1; /* the arrays grown so far only have more room: no harm */
        a->cap = c1;
        s = a->n++;
    }
    memcpy(a->buf + a->buf_len, p, (size_t)n);
    a->off[s] = a->buf_len;
    a->len[s] = (int32_t)n;
    a->hash[s] = h;
    a->buf_len += n;
    size_t i = (size_t)a->hash[s] & a->mask;
    while (a->table[i] >= 0) i = (i + 1) & a->mask;
    a->table[i] = (int32_t)s;
    a->live++;
    return s;
}

/* Takes slot s (in use) out of the table: backward shift, so no probe chain breaks. */
static void table_remove(NameArena *a, Py_ssize_t s) {
    size_t mask = a->mask, i = (size_t)a->hash[s] & mask;
    while (a->table[i] != s) i = (i + 1) & mask;
    for (size_t j = (i + 1) & mask;; j = (j + 1) & mask) {
        int32_t t = a->table[j];
        if (t < 0) break;
        size_t home = (size_t)a->hash[t] & mask;
        /* t may fill the hole at i unless its home lies cyclically in (i, j]. */
        int stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
            a->table[i] = t;
            i = j;
        }
    }
    a->table[i] = -1;
    a->live--;
}

static void compact(NameArena *a) {
    /* Moves the live names to the front of buf, in slot order. */
    Py_ssize_t at = 0;
    char *tmp = PyMem_Malloc((size_t)(a->buf_len - a->dead) + 1);
    if (!tmp) return; /* compaction is an optimisation: skip it rather than fail */
    for (Py_ssize_t s = 0; s < a->n; s++) {
        if (a->len[s] < 0) continue;
        memcpy(tmp + at, a->buf + a->off[s], (size_t)a->len[s]);
        a->off[s] = at;
        at += a->len[s];
    }
    PyMem_Free(a->buf);
    a->buf = tmp;
    a->buf_len = at;
    a->buf_cap = at + 1;
    a->dead = 0;
}

/* UTF-8 bytes of a str argument; NULL without an exception for a str that has none (lone
 * surrogates), NULL with one for a non-str. */
static const char *utf8_of(PyObject *name, Py_ssize_t *n) {
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "names are str, not %.50s", Py_TYPE(name)->tp_name);
        return NULL;
    }
    const char *p = PyUnicode_AsUTF8AndSize(name, n);
    if (!p && PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) PyErr_Clear();
    return p;
}

static PyObject *NameArena_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if ((args && PyTuple_GET_SIZE(args)) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "NameArena() takes no arguments");
        return NULL;
    }
    NameArena *a = (NameArena *)type->tp_alloc(type, 0);
    if (!a) return NULL;
    a->table = PyMem_Malloc(MIN_TABLE * sizeof(int32_t));
    if (!a->table) {
        Py_DECREF(a);
        return PyErr_NoMemory();
    }
    memset(a->table, 0xff, MIN_TABLE * sizeof(int32_t));
    a->mask = MIN_TABLE - 1;
    return (PyObject *)a;
}

static void NameArena_dealloc(NameArena *a) {
    PyMem_Free(a->buf);
    PyMem_Free(a->off);
    PyMem_Free(a->len);
    PyMem_Free(a->hash);
    PyMem_Free(a->table);
    PyMem_Free(a->free_);
    PyMem_Free(a->reused);
    Py_TYPE(a)->tp_free((PyObject *)a);
}

static PyObject *NameArena_slot(NameArena *a, PyObject *name) {
    Py_ssize_t n;
    const char *p = utf8_of(name, &n);
    if (!p) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a name must be valid UTF-8");
        return NULL;
    }
    if (n > INT32_MAX) { /* a COPY field's length is an int32 */
        PyErr_SetString(PyExc_ValueError, "a name must be shorter than 2**31 bytes");
        return NULL;
    }
    Py_hash_t h = hash_of(p, n);
    Py_ssize_t s = find_hashed(a, p, n, h);
    if (s < 0 && (s = arena_add(a, p, n, h)) < 0) return NULL;
    return PyLong_FromSsize_t(s);
}

static PyObject *NameArena_get(NameArena *a, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(name, default=-1)");
        return NULL;
    }
    Py_ssize_t n;
    const char *p = utf8_of(args[0], &n);
    Py_ssize_t s = -1;
    if (p) s = arena_find(a, p, n);
    else if (PyErr_Occurred()) return NULL;
    if (s >= 0) return PyLong_FromSsize_t(s);
    if (nargs == 2) return Py_NewRef(args[1]);
    return PyLong_FromLong(-1);
}

static int NameArena_contains(NameArena *a, PyObject *name) {
    Py_ssize_t n;
    const char *p = utf8_of(name, &n);
    if (!p) return PyErr_Occurred() ? -1 : 0;
    return arena_find(a, p, n) >= 0;
}

static Py_ssize_t NameArena_length(NameArena *a) { return a->n; }

static int cmp_desc(const void *x, const void *y) {
    int32_t a = *(const int32_t *)x, b = *(const int32_t *)y;
    return (a < b) - (a > b);
}

static int cmp_asc(const void *x, const void *y) {
    int32_t a = *(const int32_t *)x, b = *(const int32_t *)y;
    return (a > b) - (a < b);
}

/* All or nothing: every slot is converted first (which may run Python code), then checked
 * (in range, in use, distinct) and released with no Python code in between. */
static PyObject *NameArena_release(NameArena *a, PyObject *slots) {
    PyObject *seq = PySequence_Tuple(slots); /* our own: __index__ cannot change it */
    if (!seq) return NULL;
    Py_ssize_t k = PyTuple_GET_SIZE(seq);
    int32_t *want = PyMem_Malloc((size_t)(k ? k : 1) * sizeof(int32_t));
    if (!want) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t j = 0; j < k; j++) {
        Py_ssize_t s = PyNumber_AsSsize_t(PyTuple_GET_ITEM(seq, j), PyExc_OverflowError);
        if (s == -1 && PyErr_Occurred()) goto fail;
        if (s < 0 || s > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "slot %zd holds no name", s);
            goto fail;
        }
        want[j] = (int32_t)s;
    }
    qsort(want, (size_t)k, sizeof(int32_t), cmp_asc);
    for (Py_ssize_t j = 0; j < k; j++) {
        if (want[j] >= a->n || a->len[want[j]] < 0) {
            PyErr_Format(PyExc_ValueError, "slot %d holds no name", want[j]);
            goto fail;
        }
        if (j && want[j] == want[j - 1]) {
            PyErr_Format(PyExc_ValueError, "slot %d given twice", want[j]);
            goto fail;
        }
    }
    if (grow(&a->free_, &a->free_cap, a->n_free + k, sizeof(int32_t))) goto fail;
    for (Py_ssize_t j = 0; j < k; j++) {
        int32_t s = want[j];
        table_remove(a, s);
        a->dead += a->len[s];
        a->len[s] = -1;
        a->free_[a->n_free++] = s;
    }
    PyMem_Free(want);
    Py_DECREF(seq);
    qsort(a->free_, (size_t)a->n_free, sizeof(int32_t), cmp_desc);
    if (a->dead > MIN_DEAD && a->dead > a->buf_len - a->dead) compact(a);
    Py_RETURN_NONE;
fail:
    PyMem_Free(want);
    Py_DECREF(seq);
    return NULL;
}

static PyObject *NameArena_held(NameArena *a, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromSsize_t(a->live);
}

static PyObject *list_of(const int32_t *v, Py_ssize_t k) {
    PyObject *out = PyList_New(k);
    if (!out) return NULL;
    for (Py_ssize_t j = 0; j < k; j++) {
        PyObject *x = PyLong_FromLong(v[j]);
        if (!x) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, j, x);
    }
    return out;
}

static PyObject *NameArena_free_slots(NameArena *a, PyObject *Py_UNUSED(ignored)) {
    return list_of(a->free_, a->n_free);
}

static PyObject *NameArena_take_reused(NameArena *a, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = list_of(a->reused, a->n_reused);
    if (out) a->n_reused = 0;
    return out;
}

static PyObject *NameArena_nbytes(NameArena *a, PyObject *Py_UNUSED(ignored)) {
    /* Bytes held by the arrays: capacity, not use. */
    size_t b = (size_t)a->buf_cap + (size_t)a->cap * (sizeof(int64_t) + sizeof(int32_t) +
                                                      sizeof(Py_hash_t)) +
               (a->mask + 1) * sizeof(int32_t) +
               (size_t)(a->free_cap + a->reused_cap) * sizeof(int32_t);
    return PyLong_FromSize_t(b);
}

/* The name of slot s ("" for a free slot) as str, or as its binary COPY field. */
static PyObject *item(NameArena *a, Py_ssize_t s, int field) {
    if (s < 0 || s >= a->n) {
        PyErr_SetString(PyExc_IndexError, "slot out of range");
        return NULL;
    }
    Py_ssize_t n = a->len[s] < 0 ? 0 : a->len[s];
    const char *p = a->buf + (n ? a->off[s] : 0);
    if (!field) return PyUnicode_DecodeUTF8(p, n, "strict");
    PyObject *out = PyBytes_FromStringAndSize(NULL, n + 4);
    if (!out) return NULL;
    unsigned char *q = (unsigned char *)PyBytes_AS_STRING(out);
    q[0] = (unsigned char)(n >> 24);
    q[1] = (unsigned char)(n >> 16);
    q[2] = (unsigned char)(n >> 8);
    q[3] = (unsigned char)n;
    memcpy(q + 4, p, (size_t)n);
    return out;
}

/* ------------------------------------------------------------ names / fields views */

typedef struct {
    PyObject_HEAD
    NameArena *arena;
    int field;
} View;

static void View_dealloc(View *v) {
    Py_XDECREF(v->arena);
    Py_TYPE(v)->tp_free((PyObject *)v);
}

static Py_ssize_t View_length(View *v) { return v->arena->n; }

static PyObject *View_item(View *v, Py_ssize_t s) { return item(v->arena, s, v->field); }

static PyObject *View_subscript(View *v, PyObject *key) {
    Py_ssize_t s = PyNumber_AsSsize_t(key, PyExc_IndexError);
    if (s == -1 && PyErr_Occurred()) return NULL;
    if (s < 0) s += v->arena->n;
    return item(v->arena, s, v->field);
}

static PySequenceMethods View_seq = {
    .sq_length = (lenfunc)View_length,
    .sq_item = (ssizeargfunc)View_item,
};

static PyMappingMethods View_map = {
    .mp_length = (lenfunc)View_length,
    .mp_subscript = (binaryfunc)View_subscript,
};

static PyTypeObject View_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "segs.intake._fastscan.NameArenaView",
    .tp_doc = "By slot: the arena's names (str) or their binary COPY fields (bytes).",
    .tp_basicsize = sizeof(View),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_SEQUENCE,
    .tp_dealloc = (destructor)View_dealloc,
    .tp_as_sequence = &View_seq,
    .tp_as_mapping = &View_map,
};

static PyObject *view_of(NameArena *a, int field) {
    View *v = PyObject_New(View, &View_Type);
    if (!v) return NULL;
    v->arena = (NameArena *)Py_NewRef(a);
    v->field = field;
    return (PyObject *)v;
}

static PyObject *NameArena_names(NameArena *a, void *Py_UNUSED(c)) { return view_of(a, 0); }
static PyObject *NameArena_fields(NameArena *a, void *Py_UNUSED(c)) { return view_of(a, 1); }

static PyMethodDef NameArena_methods[] = {
    {"slot", (PyCFunction)NameArena_slot, METH_O,
     "slot(name) -> int: the slot of name, taking one on first sight (a released one first)."},
    {"get", (PyCFunction)(void (*)(void))NameArena_get, METH_FASTCALL,
     "get(name, default=-1): the slot of name, or default."},
    {"release", (PyCFunction)NameArena_release, METH_O,
     "release(slots): forget the names of these slots (in use, distinct)."},
    {"held", (PyCFunction)NameArena_held, METH_NOARGS, "held() -> int: names held."},
    {"free_slots", (PyCFunction)NameArena_free_slots, METH_NOARGS,
     "free_slots() -> list: released slots not taken again."},
    {"take_reused", (PyCFunction)NameArena_take_reused, METH_NOARGS,
     "take_reused() -> list: slots given to a new name since the last call."},
    {"nbytes", (PyCFunction)NameArena_nbytes, METH_NOARGS,
     "nbytes() -> int: bytes of the arena's arrays."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef NameArena_getset[] = {
    {"names", (getter)NameArena_names, NULL, "By slot: the name, \"\" for a free slot.", NULL},
    {"fields", (getter)NameArena_fields, NULL,
     "By slot: the name as a binary COPY field (4-byte big-endian length, UTF-8).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods NameArena_seq = {
    .sq_length = (lenfunc)NameArena_length,
    .sq_contains = (objobjproc)NameArena_contains,
};

PyTypeObject NameArena_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "segs.intake._fastscan.NameArena",
    .tp_doc = "Names interned to dense slots, stored in flat arrays (see _names.h).",
    .tp_basicsize = sizeof(NameArena),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = NameArena_new,
    .tp_dealloc = (destructor)NameArena_dealloc,
    .tp_methods = NameArena_methods,
    .tp_getset = NameArena_getset,
    .tp_as_sequence = &NameArena_seq,
};

int arena_add_types(PyObject *module) {
    if (PyType_Ready(&View_Type) < 0 || PyType_Ready(&NameArena_Type) < 0) return -1;
    Py_INCREF(&NameArena_Type);
    if (PyModule_AddObject(module, "NameArena", (PyObject *)&NameArena_Type) < 0) {
        Py_DECREF(&NameArena_Type);
        return -1;
    }
    return 0;
}
