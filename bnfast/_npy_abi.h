/* The part of NumPy's C ABI that bnfast's Cython layer uses, declared here so that the
 * build needs no NumPy (pip's isolated build environment then installs setuptools and
 * Cython only: NumPy was 2.5-3 s of every `pip install .`).
 *
 * The same technique as pybind11's numpy.h: a proxy of the array object's leading fields
 * and the entries of NumPy's C-API table (the `_ARRAY_API` capsule), by their index.  Both
 * are NumPy's stable ABI: the field order of PyArrayObject_fields and the table's indices
 * have not changed since NumPy 1.7 and are the same in NumPy 2.x (the indices are fixed in
 * numpy/_core/code_generators/numpy_api.py; NumPy's own headers read these fields as
 * below).  The one difference between NumPy 1.x and 2.x that matters here, the offset of
 * a dtype's element size, is resolved at run time from the C-API feature version, as
 * NumPy 2's npy_2_compat.h does.  tests/packaging/test_npy_abi.py compares every accessor
 * with NumPy's Python-level answers.
 *
 * Only what _core.pyx uses is here; nothing else of NumPy's API is available.
 */
#ifndef BNFAST_NPY_ABI_H
#define BNFAST_NPY_ABI_H

#include <Python.h>
#include <stdint.h>

typedef Py_ssize_t bnpy_intp;

/* PyArray_Descr up to type_num: identical in NumPy 1.x and 2.x. */
typedef struct {
    PyObject_HEAD
    PyTypeObject *typeobj;
    char kind;
    char type;
    char byteorder;
    char flags_or_unused;   /* 1.x: flags; 2.x: _former_flags */
    int type_num;
} bnpy_descr;

/* What follows type_num: in 1.x the element size (int); in 2.x an npy_uint64 of flags
 * and then the element size (npy_intp). */
typedef struct { bnpy_descr head; int elsize; } bnpy_descr_v1;
typedef struct { bnpy_descr head; uint64_t flags; bnpy_intp elsize; } bnpy_descr_v2;

/* PyArrayObject_fields, the leading fields (NumPy's public headers' layout). */
typedef struct {
    PyObject_HEAD
    char *data;
    int nd;
    bnpy_intp *dimensions;
    bnpy_intp *strides;
    PyObject *base;
    bnpy_descr *descr;
    int flags;
} bnpy_array;

enum {
    BNPY_FLOAT = 11,               /* NPY_FLOAT */
    BNPY_DOUBLE = 12,              /* NPY_DOUBLE */
    BNPY_C_CONTIGUOUS = 0x0001,    /* NPY_ARRAY_C_CONTIGUOUS */
    BNPY_ALIGNED = 0x0100,         /* NPY_ARRAY_ALIGNED */
    BNPY_WRITEABLE = 0x0400,       /* NPY_ARRAY_WRITEABLE */
    BNPY_API_VERSION_2_0 = 0x12,   /* NPY_2_0_API_VERSION: the C-API feature version */
    /* indices in the C-API table (numpy_api.py) */
    BNPY_IX_GetNDArrayCVersion = 0,
    BNPY_IX_DescrFromType = 45,
    BNPY_IX_Empty = 184,
    BNPY_IX_GetNDArrayCFeatureVersion = 211,
};

static void **bnpy_api = NULL;
static int bnpy_feature_version = 0;

/* Load the C-API table of the NumPy that is installed; 0, or -1 with an exception set. */
static int bnpy_import(void)
{
    PyObject *mod = PyImport_ImportModule("numpy._core._multiarray_umath");
    if (mod == NULL && PyErr_ExceptionMatches(PyExc_ModuleNotFoundError)) {
        PyErr_Clear();
        mod = PyImport_ImportModule("numpy.core._multiarray_umath");   /* NumPy 1.x */
    }
    if (mod == NULL) return -1;
    PyObject *cap = PyObject_GetAttrString(mod, "_ARRAY_API");
    Py_DECREF(mod);
    if (cap == NULL) return -1;
    if (!PyCapsule_CheckExact(cap)) {
        Py_DECREF(cap);
        PyErr_SetString(PyExc_ImportError, "bnfast: numpy's _ARRAY_API is not a capsule");
        return -1;
    }
    bnpy_api = (void **)PyCapsule_GetPointer(cap, NULL);
    Py_DECREF(cap);
    if (bnpy_api == NULL) return -1;
    /* ABI 0x01000009 is NumPy 1.x, 0x02000000 NumPy 2.x: both have this layout. */
    unsigned int abi = ((unsigned int (*)(void))bnpy_api[BNPY_IX_GetNDArrayCVersion])();
    if (abi < 0x01000009u || abi > 0x02000000u) {
        PyErr_Format(PyExc_ImportError,
                     "bnfast: NumPy's C ABI version 0x%x is not one bnfast knows "
                     "(0x1000009 for NumPy 1.x, 0x2000000 for NumPy 2.x)", abi);
        bnpy_api = NULL;
        return -1;
    }
    bnpy_feature_version =
        (int)((unsigned int (*)(void))bnpy_api[BNPY_IX_GetNDArrayCFeatureVersion])();
    return 0;
}

static inline char *bnpy_DATA(bnpy_array *a) { return a->data; }
static inline int bnpy_NDIM(bnpy_array *a) { return a->nd; }
static inline bnpy_intp *bnpy_DIMS(bnpy_array *a) { return a->dimensions; }
static inline bnpy_intp bnpy_DIM(bnpy_array *a, int i) { return a->dimensions[i]; }
static inline bnpy_intp bnpy_STRIDE(bnpy_array *a, int i) { return a->strides[i]; }
static inline int bnpy_TYPE(bnpy_array *a) { return a->descr->type_num; }
static inline int bnpy_IS_C_CONTIGUOUS(bnpy_array *a)
{
    return (a->flags & BNPY_C_CONTIGUOUS) != 0;
}
static inline int bnpy_ISALIGNED(bnpy_array *a) { return (a->flags & BNPY_ALIGNED) != 0; }
static inline int bnpy_ISWRITEABLE(bnpy_array *a) { return (a->flags & BNPY_WRITEABLE) != 0; }
/* Native byte order: NumPy's PyArray_ISNBO (the opposite order's character is refused). */
static inline int bnpy_ISNOTSWAPPED(bnpy_array *a)
{
#if PY_BIG_ENDIAN
    return a->descr->byteorder != '<';
#else
    return a->descr->byteorder != '>';
#endif
}
static inline bnpy_intp bnpy_ITEMSIZE(bnpy_array *a)
{
    if (bnpy_feature_version >= BNPY_API_VERSION_2_0)
        return ((bnpy_descr_v2 *)a->descr)->elsize;
    return ((bnpy_descr_v1 *)a->descr)->elsize;
}
static inline bnpy_intp bnpy_SIZE(bnpy_array *a)
{
    bnpy_intp n = 1;
    for (int i = 0; i < a->nd; i++) n *= a->dimensions[i];
    return n;
}
static inline bnpy_intp bnpy_NBYTES(bnpy_array *a) { return bnpy_ITEMSIZE(a) * bnpy_SIZE(a); }

/* PyArray_EMPTY: a new C-ordered (fortran = 0) array of type_num; NULL with an exception
 * set on failure (PyArray_Empty steals the reference to the descriptor). */
static inline PyObject *bnpy_EMPTY(int nd, bnpy_intp *dims, int type_num, int fortran)
{
    PyObject *descr = ((PyObject * (*)(int))bnpy_api[BNPY_IX_DescrFromType])(type_num);
    if (descr == NULL) return NULL;
    return ((PyObject * (*)(int, const bnpy_intp *, PyObject *, int))bnpy_api[BNPY_IX_Empty])(
        nd, dims, descr, fortran);
}

#endif
