# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Thin Cython layer over the C kernels.

Callers (``bnfast._api``) have already validated every argument: arrays are C-contiguous,
of the right dtype and size.  This module only unpacks pointers, releases the GIL around the
kernels, and turns status codes into exceptions.
"""
import numpy as np
cimport numpy as cnp
from libc.math cimport sqrt

cnp.import_array()

cdef extern from "bnfast.h" nogil:
    enum:
        BN_OK
        BN_ENOMEM
        BN_EINVAL
        BN_ENOISA
        BN_ISA_COUNT
        BN_FLAG_RELU
        BN_FLAG_EVAL

    ctypedef int (*bn_moments_fn)(const void *x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                                  double *mean, double *var, int nthreads)
    ctypedef int (*bn_normalize_fn)(const void *x, void *y, Py_ssize_t N, Py_ssize_t C,
                                    Py_ssize_t S, const double *mean, const double *scale,
                                    const double *shift, int flags, int nthreads)
    ctypedef int (*bn_backward_reduce_fn)(const void *dy, const void *x, Py_ssize_t N,
                                          Py_ssize_t C, Py_ssize_t S, const double *mean,
                                          const double *scale, const double *shift,
                                          double *sum_dy, double *sum_dyxmu, int flags,
                                          int nthreads)
    ctypedef int (*bn_backward_dx_fn)(const void *dy, const void *x, void *dx, Py_ssize_t N,
                                      Py_ssize_t C, Py_ssize_t S, const double *mean,
                                      const double *scale, const double *shift,
                                      const double *k_dy, const double *k_x,
                                      const double *k_0, int flags, int nthreads)
    ctypedef int (*bn_train_forward_fn)(const void *x, void *y, Py_ssize_t N, Py_ssize_t C,
                                        Py_ssize_t S, const double *weight,
                                        const double *bias, double eps, double *mean,
                                        double *var, double *invstd, int flags, int nthreads)
    ctypedef int (*bn_backward_fn)(const void *dy, const void *x, void *dx, Py_ssize_t N,
                                   Py_ssize_t C, Py_ssize_t S, const double *mean,
                                   const double *invstd, const double *weight,
                                   const double *bias, double *dweight, double *dbias,
                                   int flags, int nthreads)
    ctypedef struct bn_kernel_table:
        const char *name
        bn_moments_fn moments[2]
        bn_normalize_fn normalize[2]
        bn_backward_reduce_fn backward_reduce[2]
        bn_backward_dx_fn backward_dx[2]
        bn_train_forward_fn train_forward[2]
        bn_backward_fn backward[2]

    int bn_isa_compiled(int isa)
    int bn_isa_supported(int isa)
    int bn_isa_best()
    const char *bn_isa_name(int isa)
    int bn_set_isa(int isa)
    int bn_get_isa()
    const bn_kernel_table *bn_active()
    int bn_update_running_f32(float *rmean, float *rvar, Py_ssize_t rm_stride,
                              Py_ssize_t rv_stride, const double *mean, const double *var,
                              Py_ssize_t C, double count, double momentum)
    int bn_update_running_f64(double *rmean, double *rvar, Py_ssize_t rm_stride,
                              Py_ssize_t rv_stride, const double *mean, const double *var,
                              Py_ssize_t C, double count, double momentum)
    const char *bn_compiler()
    int bn_copy(const void *src, void *dst, size_t nbytes, int nthreads)
    int bn_openmp_version()
    int bn_omp_max_threads()


ISA_NAMES = tuple(bn_isa_name(i).decode() for i in range(BN_ISA_COUNT))
FLAG_RELU = BN_FLAG_RELU
FLAG_EVAL = BN_FLAG_EVAL


cdef int _check(int status) except -1:
    if status == BN_OK:
        return 0
    if status == BN_ENOMEM:
        raise MemoryError("bnfast: could not allocate kernel scratch memory")
    if status == BN_ENOISA:
        raise RuntimeError("bnfast: instruction set not supported by this CPU")
    raise ValueError(f"bnfast: kernel rejected its arguments (status {status}); "
                     "this is a bug in bnfast's argument checking, please report it")


# ---------------------------------------------------------------- configuration

def isa_compiled(int isa):
    return bool(bn_isa_compiled(isa))

def isa_supported(int isa):
    return bool(bn_isa_supported(isa))

def isa_best():
    return bn_isa_best()

def set_isa(int isa):
    _check(bn_set_isa(isa))

def get_isa():
    return bn_get_isa()

def compiler():
    return bn_compiler().decode()

def openmp_version():
    return bn_openmp_version()

def omp_max_threads():
    return bn_omp_max_threads()


def copy(cnp.ndarray src, cnp.ndarray dst, int nthreads):
    """Multithreaded copy of a C-contiguous array into another of the same size (bytes)."""
    cdef size_t n = <size_t> cnp.PyArray_NBYTES(src)
    cdef const void *sp = cnp.PyArray_DATA(src)
    cdef void *dp = cnp.PyArray_DATA(dst)
    if cnp.PyArray_NBYTES(dst) != cnp.PyArray_NBYTES(src):
        raise ValueError("copy: size mismatch")
    with nogil:
        bn_copy(sp, dp, n, nthreads)


# ---------------------------------------------------------------- helpers

cdef inline int _dt(cnp.ndarray a):
    # 0 for float32, 1 for float64 (callers guarantee one of them)
    return 0 if cnp.PyArray_ITEMSIZE(a) == 4 else 1

cdef inline double *_dp(object a):
    # data pointer of a float64 array, or NULL for None
    if a is None:
        return NULL
    return <double *> cnp.PyArray_DATA(<cnp.ndarray> a)


cdef _update_running(cnp.ndarray rm, cnp.ndarray rv, double *mean, double *var,
                     Py_ssize_t C, double count, double momentum):
    cdef Py_ssize_t sm = cnp.PyArray_STRIDE(rm, 0) // cnp.PyArray_ITEMSIZE(rm)
    cdef Py_ssize_t sv = cnp.PyArray_STRIDE(rv, 0) // cnp.PyArray_ITEMSIZE(rv)
    if rm.dtype != rv.dtype:
        raise TypeError("running_mean and running_var must have the same dtype")
    if cnp.PyArray_ITEMSIZE(rm) == 4:
        bn_update_running_f32(<float *> cnp.PyArray_DATA(rm), <float *> cnp.PyArray_DATA(rv),
                              sm, sv, mean, var, C, count, momentum)
    else:
        bn_update_running_f64(<double *> cnp.PyArray_DATA(rm), <double *> cnp.PyArray_DATA(rv),
                              sm, sv, mean, var, C, count, momentum)


# ---------------------------------------------------------------- kernels

def moments(cnp.ndarray x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int nthreads):
    """Per-channel (mean, biased var) as float64 arrays of length C."""
    cdef cnp.ndarray mean = np.empty(C, dtype=np.float64)
    cdef cnp.ndarray var = np.empty(C, dtype=np.float64)
    cdef const bn_kernel_table *t = bn_active()
    cdef int dt = _dt(x), st
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef double *mp = <double *> cnp.PyArray_DATA(mean)
    cdef double *vp = <double *> cnp.PyArray_DATA(var)
    with nogil:
        st = t.moments[dt](xp, N, C, S, mp, vp, nthreads)
    _check(st)
    return mean, var


def train_forward(cnp.ndarray x, cnp.ndarray y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                  object weight, object bias, double eps, bint relu,
                  object running_mean, object running_var, double momentum, int nthreads):
    """Training forward: returns (mean, invstd) float64; updates running stats if given."""
    cdef cnp.ndarray mean = np.empty(C, dtype=np.float64)
    cdef cnp.ndarray invstd = np.empty(C, dtype=np.float64)
    cdef cnp.ndarray var = np.empty(C, dtype=np.float64)
    cdef const bn_kernel_table *t = bn_active()
    cdef int dt = _dt(x), st, flags = BN_FLAG_RELU if relu else 0
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *yp = cnp.PyArray_DATA(y)
    cdef double *mp = <double *> cnp.PyArray_DATA(mean)
    cdef double *ip = <double *> cnp.PyArray_DATA(invstd)
    cdef double *vp = <double *> cnp.PyArray_DATA(var)
    cdef double *wp = _dp(weight)
    cdef double *bp = _dp(bias)
    with nogil:
        st = t.train_forward[dt](xp, yp, N, C, S, wp, bp, eps, mp, vp, ip, flags, nthreads)
    _check(st)
    if running_mean is not None:
        _update_running(running_mean, running_var, mp, vp, C, <double> N * <double> S,
                        momentum)
    return mean, invstd


def infer_forward(cnp.ndarray x, cnp.ndarray y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                  cnp.ndarray mean, cnp.ndarray var, object weight, object bias, double eps,
                  bint relu, int nthreads):
    """Inference forward with given float64 mean/var."""
    cdef cnp.ndarray work = np.empty(2 * C, dtype=np.float64)
    cdef const bn_kernel_table *t = bn_active()
    cdef int dt = _dt(x), st, flags = BN_FLAG_RELU if relu else 0
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *yp = cnp.PyArray_DATA(y)
    cdef double *mp = <double *> cnp.PyArray_DATA(mean)
    cdef double *vp = <double *> cnp.PyArray_DATA(var)
    cdef double *sc = <double *> cnp.PyArray_DATA(work)
    cdef double *sh = sc + C
    cdef double *wp = _dp(weight)
    cdef double *bp = _dp(bias)
    cdef double inv
    cdef Py_ssize_t c
    with nogil:
        for c in range(C):
            inv = 1.0 / sqrt(vp[c] + eps)
            sc[c] = inv * wp[c] if wp != NULL else inv
            sh[c] = bp[c] if bp != NULL else 0.0
        st = t.normalize[dt](xp, yp, N, C, S, mp, sc, sh, flags, nthreads)
    _check(st)


def backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t N, Py_ssize_t C,
             Py_ssize_t S, cnp.ndarray mean, cnp.ndarray invstd, object weight, object bias,
             bint relu, bint training, int nthreads):
    """Backward pass: writes dx, returns (dweight, dbias) as float64 arrays."""
    cdef cnp.ndarray dweight = np.empty(C, dtype=np.float64)
    cdef cnp.ndarray dbias = np.empty(C, dtype=np.float64)
    cdef const bn_kernel_table *t = bn_active()
    cdef int dt = _dt(x), st
    cdef int flags = (BN_FLAG_RELU if relu else 0) | (0 if training else BN_FLAG_EVAL)
    cdef void *dyp = cnp.PyArray_DATA(dy)
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *dxp = cnp.PyArray_DATA(dx)
    cdef double *mp = <double *> cnp.PyArray_DATA(mean)
    cdef double *ip = <double *> cnp.PyArray_DATA(invstd)
    cdef double *dwp = <double *> cnp.PyArray_DATA(dweight)
    cdef double *dbp = <double *> cnp.PyArray_DATA(dbias)
    cdef double *wp = _dp(weight)
    cdef double *bp = _dp(bias)
    with nogil:
        st = t.backward[dt](dyp, xp, dxp, N, C, S, mp, ip, wp, bp, dwp, dbp, flags, nthreads)
    _check(st)
    return dweight, dbias
