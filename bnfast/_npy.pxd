# The part of NumPy's C API that bnfast/_core.pyx uses, without NumPy's headers (so the
# build does not need NumPy): declared in bnfast/_npy_abi.h, which explains why and how.
# The names are NumPy's, so that _core.pyx reads as with `cimport numpy`.

cdef extern from "_npy_abi.h":
    ctypedef Py_ssize_t npy_intp "bnpy_intp"

    ctypedef class numpy.ndarray [object bnpy_array, check_size ignore]:
        pass

    enum:
        NPY_FLOAT "BNPY_FLOAT"
        NPY_DOUBLE "BNPY_DOUBLE"

    int import_array "bnpy_import" () except -1
    void *PyArray_DATA "bnpy_DATA" (ndarray a)
    int PyArray_NDIM "bnpy_NDIM" (ndarray a)
    npy_intp *PyArray_DIMS "bnpy_DIMS" (ndarray a)
    npy_intp PyArray_DIM "bnpy_DIM" (ndarray a, int i)
    npy_intp PyArray_STRIDE "bnpy_STRIDE" (ndarray a, int i)
    int PyArray_TYPE "bnpy_TYPE" (ndarray a)
    bint PyArray_IS_C_CONTIGUOUS "bnpy_IS_C_CONTIGUOUS" (ndarray a)
    bint PyArray_ISALIGNED "bnpy_ISALIGNED" (ndarray a)
    bint PyArray_ISWRITEABLE "bnpy_ISWRITEABLE" (ndarray a)
    bint PyArray_ISNOTSWAPPED "bnpy_ISNOTSWAPPED" (ndarray a)
    npy_intp PyArray_ITEMSIZE "bnpy_ITEMSIZE" (ndarray a)
    npy_intp PyArray_NBYTES "bnpy_NBYTES" (ndarray a)
    object PyArray_EMPTY "bnpy_EMPTY" (int nd, npy_intp *dims, int type_num, int fortran)
