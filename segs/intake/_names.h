/* segs.intake._fastscan.NameArena: meter ids interned to dense slots, in a few flat arrays.
 *
 * A dict of str -> int costs about 190 bytes a name once the str, the dict entry, the int
 * and the encoded COPY field are counted; here a name costs its UTF-8 bytes plus 24 bytes
 * of per-slot arrays and 8-16 bytes of hash table. Python sees the same interface as
 * segs.intake.readings.Interner (slot, get, release, held, take_reused, names), so the
 * two are interchangeable and a property test holds them equal.
 *
 * Layout: every name's bytes in one buffer (buf), a slot's at off[slot] for len[slot]
 * bytes (len -1: the slot is free). An open-addressing table of slots, linear probing,
 * power-of-two size at most half full, deletion by backward shift (no tombstones). The
 * hash is CPython's keyed bytes hash, so ids chosen by an upstream cannot flood one chain.
 * Released names leave dead bytes in buf; it is compacted when they outweigh the live.
 *
 * No method releases the GIL: a view read from another thread sees one state or the next.
 */
#ifndef SEGS_NAMES_H
#define SEGS_NAMES_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef struct {
    PyObject_HEAD
    char *buf;
    Py_ssize_t buf_len, buf_cap, dead;
    int64_t *off;
    int32_t *len;
    Py_hash_t *hash;
    Py_ssize_t n, cap;      /* slots ever allocated; room in the per-slot arrays */
    int32_t *table;
    size_t mask;            /* table size - 1 */
    Py_ssize_t live;        /* names in the table */
    int32_t *free_;         /* released slots, the lowest last */
    Py_ssize_t n_free, free_cap;
    int32_t *reused;        /* slots given to a new name since take_reused() */
    Py_ssize_t n_reused, reused_cap;
} NameArena;

extern PyTypeObject NameArena_Type;

/* The slot of the name of n bytes at p, or -1. */
Py_ssize_t arena_find(NameArena *a, const char *p, Py_ssize_t n);

/* Adds NameArena (and its views) to the module; -1 on error. */
int arena_add_types(PyObject *module);

#endif
