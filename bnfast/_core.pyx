# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython layer over the C kernels.

Two kinds of entry point:

* ``moments``, ``train_forward``, ``infer_forward``, ``backward``: called by the general
  path of ``bnfast._api`` after its checks and conversions (arrays C-contiguous, native,
  of the right dtype and size, vectors detached from the output).  They unpack pointers,
  release the GIL around the kernels and turn status codes into exceptions.
* ``fast_*``: called first by every public function.  Each returns None unless its
  arguments are, on cheap C-level checks, a case that the general path accepts and that
  needs no conversion; then it computes the result.  A fast path never raises for bad
  input and never accepts anything the general path would reject: ``bnfast._api`` owns
  every rule and every error message, and tests/api/test_fastpath.py checks the equivalence
  call by call (same result bits or the same exception).

The thread count is passed in with every call (``bnfast._threads`` is the only place it
is stored).
"""
import numpy as np
from bnfast cimport _npy as cnp   # NumPy's C API without its headers (bnfast/_npy_abi.h)
from libc.stdlib cimport malloc, free

cnp.import_array()

cdef extern from "bnfast.h" nogil:
    enum:
        BN_OK
        BN_ENOMEM
        BN_EINVAL
        BN_ENOISA
        BN_DECLINED
        BN_EVAR
        BN_ISA_COUNT
        BN_FLAG_RELU
        BN_FLAG_EVAL

    ctypedef int (*bn_moments_fn)(const void *x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                                  double *mean, double *var, int nthreads)
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
    ctypedef int (*bn_backward_coeffs_fn)(Py_ssize_t C, const double *sd, const double *sx,
                                          const double *invstd, const double *weight,
                                          double cnt, int training, double *dweight,
                                          double *kx, double *k0)
    ctypedef void (*bn_widen_fn)(const float *src, double *dst, Py_ssize_t n)
    enum:
        BN_PAR_MEAN
        BN_PAR_VAR
        BN_PAR_WEIGHT
        BN_PAR_BIAS
    ctypedef int (*bn_infer_fn)(const void *x, void *y, Py_ssize_t N, Py_ssize_t C,
                                Py_ssize_t S, const void *mean, const void *var,
                                const void *weight, const void *bias, int f32, double eps,
                                int flags, int nthreads)
    ctypedef int (*bn_backward_fused_fn)(const void *dy, const void *x, void *dx, Py_ssize_t N,
                                         Py_ssize_t C, Py_ssize_t S, const double *mean,
                                         const double *invstd, const double *weight,
                                         const double *bias, double *sum_dy,
                                         double *sum_dyxmu, double *dweight, double *k_x,
                                         double *k_0, int flags, int nthreads,
                                         int *degenerate)
    ctypedef struct bn_kernel_table:
        const char *name
        bn_moments_fn moments[2]
        bn_infer_fn infer[2]
        bn_backward_reduce_fn backward_reduce[2]
        bn_backward_dx_fn backward_dx[2]
        bn_train_forward_fn train_forward[2]
        bn_backward_coeffs_fn backward_coeffs[2]
        bn_widen_fn widen_f32
        bn_backward_fused_fn backward_fused[2]

    int bn_isa_compiled(int isa)
    int bn_isa_supported(int isa)
    int bn_isa_default()
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



cdef extern from "bn_vectors.h" nogil:
    void bn_scale_shift(const double *invstd, const double *weight, const double *bias,
                        double *a, double *shift, Py_ssize_t n)


cdef extern from "bn_plan.h" nogil:
    enum:
        BN_OP_COUNT
        BN_WALK_COUNT
        BN_LAYOUT_ROWS
        BN_WALK_REGISTER
        BN_F32_MIN_PER_CHANNEL
    int bn_plan_parallel(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S)
    ctypedef struct bn_colpart:
        Py_ssize_t R, Cp, tile, ntiles, rb, nblocks, bpg, ngroups
    ctypedef struct bn_plan:
        int op, isa, itemsize
        Py_ssize_t N, C, S
        int nthreads, layout, reduce_walk, strip_cols, resident
        Py_ssize_t row_groups, rows_per_group, row_chunk, row_items
        bn_colpart col
        Py_ssize_t col_items
        int ew_walk
        Py_ssize_t period, ew_units, ew_per_item, ew_items
        int stream, ew_f32, ew_f32_relu, fused
    int bn_plan_make(bn_plan *p, int op, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                     int itemsize, int isa, int nthreads)
    int bn_plan_force(int layout, int stats_walk, int backward_walk, int ew_walk)
    void bn_plan_forced(int *layout, int *stats_walk, int *backward_walk, int *ew_walk)
    int bn_plan_force_arith(int arith)
    int bn_plan_forced_arith()
    int bn_plan_force_fused(int fused)
    int bn_plan_forced_fused()
    const char *bn_walk_name(int walk)
    const char *bn_layout_name(int layout)
    const char *bn_op_name(int op)
    size_t bn_get_stream_min_bytes()
    size_t bn_llc_bytes()
    void bn_set_stream_min_bytes(size_t nbytes)


ISA_NAMES = tuple([bn_isa_name(i).decode() for i in range(BN_ISA_COUNT)])
OP_NAMES = tuple([bn_op_name(i).decode() for i in range(BN_OP_COUNT)])
WALK_NAMES = tuple([bn_walk_name(i).decode() for i in range(BN_WALK_COUNT)])
LAYOUT_NAMES = tuple([bn_layout_name(i).decode() for i in range(2)])   # rows, columns
# float32 data's element-wise passes run in float32 where a channel has at least this many
# elements (N * S), else in double (csrc/plan.c; the GPU backend follows the same rule)
F32_MIN_PER_CHANNEL = BN_F32_MIN_PER_CHANNEL


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

def isa_default():
    """The default variant's index (csrc/dispatch.c chooses it)."""
    return bn_isa_default()

def set_isa(int isa):
    _check(bn_set_isa(isa))

def get_isa():
    return bn_get_isa()

def compiler():
    return bn_compiler().decode()

def openmp_version():
    return bn_openmp_version()

def get_stream_min_bytes():
    return bn_get_stream_min_bytes()

def set_stream_min_bytes(size_t nbytes):
    bn_set_stream_min_bytes(nbytes)

def llc_bytes():
    return bn_llc_bytes()

def omp_max_threads():
    return bn_omp_max_threads()


# ---------------------------------------------------------------- the plan
# Thin accessors; bnfast/_plan.py builds the plan's dict and parses the forcing (cold code,
# kept out of this file: it is compiled on every install).

def plan_fields(int op, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int itemsize, int isa,
                int nthreads):
    """bn_plan_make's plan for op (an index of OP_NAMES) as a dict of its C fields."""
    cdef bn_plan p
    _check(bn_plan_make(&p, op, N, C, S, itemsize, isa, nthreads))
    return p


def plan_force(int layout, int statistics, int backward_sums, int elementwise):
    """bn_plan_force: indices (layout: LAYOUT_NAMES, walks: WALK_NAMES), -1 = not forced."""
    _check(bn_plan_force(layout, statistics, backward_sums, elementwise))


def plan_forced():
    """bn_plan_forced: the forced (layout, statistics, backward_sums, elementwise) indices."""
    cdef int l, s, b, e
    bn_plan_forced(&l, &s, &b, &e)
    return (l, s, b, e)


def plan_force_arith(int arith):
    """bn_plan_force_arith: 0 float64, 1 float32, -1 the plan's choice."""
    _check(bn_plan_force_arith(arith))


def plan_forced_arith():
    """bn_plan_forced_arith: the forced arithmetic (0, 1), -1 = not forced."""
    return bn_plan_forced_arith()


def plan_force_fused(int fused):
    """bn_plan_force_fused: 0 off, 1 on (where it can run), -1 the plan's choice."""
    _check(bn_plan_force_fused(fused))


def plan_forced_fused():
    """bn_plan_forced_fused: the forced fusion (0, 1), -1 = not forced."""
    return bn_plan_forced_fused()


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

def _npy_view(cnp.ndarray a):
    """What bnfast/_npy_abi.h reads of an array (for tests/packaging/test_npy_abi.py):
    (address, ndim, shape, strides, type number, item size, bytes, C-contiguous,
    aligned, writeable, native byte order), and an empty array made like it."""
    cdef int i
    # list comprehensions, not generator expressions: no generator machinery in _core.c
    shape = tuple([cnp.PyArray_DIM(a, i) for i in range(cnp.PyArray_NDIM(a))])
    strides = tuple([cnp.PyArray_STRIDE(a, i) for i in range(cnp.PyArray_NDIM(a))])
    return ((<size_t> cnp.PyArray_DATA(a), cnp.PyArray_NDIM(a), shape, strides,
             cnp.PyArray_TYPE(a), cnp.PyArray_ITEMSIZE(a), cnp.PyArray_NBYTES(a),
             cnp.PyArray_IS_C_CONTIGUOUS(a), cnp.PyArray_ISALIGNED(a),
             cnp.PyArray_ISWRITEABLE(a), cnp.PyArray_ISNOTSWAPPED(a)),
            cnp.PyArray_EMPTY(cnp.PyArray_NDIM(a), cnp.PyArray_DIMS(a), cnp.PyArray_TYPE(a), 0))



cdef inline int _dt(cnp.ndarray a):
    # 0 for float32, 1 for float64 (callers guarantee one of them)
    return 0 if cnp.PyArray_ITEMSIZE(a) == 4 else 1

cdef _update_running(cnp.ndarray rm, cnp.ndarray rv, double *mean, double *var,
                     Py_ssize_t C, double count, double momentum):
    # Callers pass native arrays whose strides are whole elements (bnfast._api copies
    # anything else into a temporary); the check guards the pointer arithmetic.
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(rm)
    if (cnp.PyArray_STRIDE(rm, 0) % isz != 0 or cnp.PyArray_STRIDE(rv, 0) % isz != 0
            or not cnp.PyArray_ISNOTSWAPPED(rm) or not cnp.PyArray_ISNOTSWAPPED(rv)):
        raise ValueError("bnfast: running statistics reached the kernel with a stride that "
                         "is not a whole number of elements; please report this bug")
    cdef Py_ssize_t sm = cnp.PyArray_STRIDE(rm, 0) // isz
    cdef Py_ssize_t sv = cnp.PyArray_STRIDE(rv, 0) // isz
    if rm.dtype != rv.dtype:
        raise TypeError("running_mean and running_var must have the same dtype")
    if cnp.PyArray_ITEMSIZE(rm) == 4:
        bn_update_running_f32(<float *> cnp.PyArray_DATA(rm), <float *> cnp.PyArray_DATA(rv),
                              sm, sv, mean, var, C, count, momentum)
    else:
        bn_update_running_f64(<double *> cnp.PyArray_DATA(rm), <double *> cnp.PyArray_DATA(rv),
                              sm, sv, mean, var, C, count, momentum)


# ---------------------------------------------------------------- kernels

cdef class _Vec:
    # A per-channel vector as double*: borrowed when float64, converted when float32.
    cdef double *ptr
    cdef double *own
    def __dealloc__(self):
        if self.own != NULL:
            free(self.own)

cdef _Vec _vec(object v, Py_ssize_t C):
    cdef _Vec r = _Vec.__new__(_Vec)
    cdef cnp.ndarray a
    if v is None:
        return r
    a = <cnp.ndarray> v
    if cnp.PyArray_TYPE(a) == cnp.NPY_DOUBLE:
        r.ptr = <double *> cnp.PyArray_DATA(a)
    else:
        r.own = <double *> malloc(sizeof(double) * (C if C > 0 else 1))
        if r.own == NULL:
            raise MemoryError()
        bn_active().widen_f32(<float *> cnp.PyArray_DATA(a), r.own, C)
        r.ptr = r.own
    return r

cdef inline cnp.ndarray _empty_like(cnp.ndarray x):
    return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), cnp.PyArray_TYPE(x), 0)

cdef inline cnp.ndarray _empty_c(Py_ssize_t C):
    cdef cnp.npy_intp n = C
    return cnp.PyArray_EMPTY(1, &n, cnp.NPY_DOUBLE, 0)


# Each operation has one cdef implementation that calls its kernel; the general path
# (bnfast._api, after its checks and conversions) and the fast paths below both use it.
# Per-channel vectors may be None, or 1-D contiguous float32/float64 arrays of length C.

cdef tuple _moments(cnp.ndarray x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int nt):
    cdef cnp.ndarray mean = _empty_c(C), var = _empty_c(C)
    cdef const bn_kernel_table *t = bn_active()
    cdef int dt = _dt(x), st
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef double *mp = <double *> cnp.PyArray_DATA(mean)
    cdef double *vp = <double *> cnp.PyArray_DATA(var)
    with nogil:
        st = t.moments[dt](xp, N, C, S, mp, vp, nt)
    _check(st)
    return mean, var


cdef tuple _train(cnp.ndarray x, cnp.ndarray y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                  object weight, object bias, double eps, bint relu, object running_mean,
                  object running_var, double momentum, int nt):
    cdef _Vec w = _vec(weight, C), b = _vec(bias, C)
    cdef cnp.ndarray mean = _empty_c(C), invstd = _empty_c(C), var = _empty_c(C)
    cdef const bn_kernel_table *t = bn_active()
    cdef int dt = _dt(x), st, flags = BN_FLAG_RELU if relu else 0
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *yp = cnp.PyArray_DATA(y)
    cdef double *mp = <double *> cnp.PyArray_DATA(mean)
    cdef double *ip = <double *> cnp.PyArray_DATA(invstd)
    cdef double *vp = <double *> cnp.PyArray_DATA(var)
    with nogil:
        st = t.train_forward[dt](xp, yp, N, C, S, w.ptr, b.ptr, eps, mp, vp, ip, flags, nt)
    _check(st)
    if running_mean is not None:
        _update_running(running_mean, running_var, mp, vp, C, <double> N * <double> S,
                        momentum)
    return mean, invstd


cdef inline const void *_par(object v, int bit, int *f32):
    # a per-channel vector's data (NULL for None); its BN_PAR_* bit set in *f32 if float32
    if v is None:
        return NULL
    if cnp.PyArray_TYPE(<cnp.ndarray> v) != cnp.NPY_DOUBLE:
        f32[0] |= bit
    return cnp.PyArray_DATA(<cnp.ndarray> v)

cdef bint _infer(cnp.ndarray x, cnp.ndarray y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                 object mean, object var, object weight, object bias, double eps, bint relu,
                 int nt) except -1:
    # The inference in one kernel call (infer: the coefficients from the vectors as given,
    # float32 or float64, with the check of var, and the normalisation).  Returns False,
    # having written nothing to y, if var has a negative or NaN value, or a zero one with
    # eps 0.
    cdef const bn_kernel_table *t = bn_active()
    cdef int dt = _dt(x), st, flags = BN_FLAG_RELU if relu else 0, f32 = 0
    cdef const void *mp = _par(mean, BN_PAR_MEAN, &f32)
    cdef const void *vp = _par(var, BN_PAR_VAR, &f32)
    cdef const void *wp = _par(weight, BN_PAR_WEIGHT, &f32)
    cdef const void *bp = _par(bias, BN_PAR_BIAS, &f32)
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *yp = cnp.PyArray_DATA(y)
    with nogil:
        st = t.infer[dt](xp, yp, N, C, S, mp, vp, wp, bp, f32, eps, flags, nt)
    if st == BN_EVAR:
        return False
    _check(st)
    return True


# The training/eval backward in two kernel passes: the per-channel reduction, the
# coefficients (_bwd_coeffs), then dx.  Between the two,
# the caller can look at the sums: channels with a non-finite weight, invstd or sum are
# "degenerate" (bnfast._api recomputes them; see _backward_degenerate there), and
# synchronized batch norm replaces the sums by those of every process.

cdef int _bwd_reduce(cnp.ndarray dy, cnp.ndarray x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                     _Vec m, _Vec inv, _Vec w, _Vec b, bint relu, double *sd, double *sx,
                     int nt) except -1:
    cdef const bn_kernel_table *t = bn_active()
    cdef int dt = _dt(x), st, flags = BN_FLAG_RELU if relu else 0
    cdef double *sc = <double *> malloc(sizeof(double) * 2 * (C if C > 0 else 1))
    if sc == NULL:
        raise MemoryError()
    cdef double *sh = sc + C
    cdef void *dyp = cnp.PyArray_DATA(dy)
    cdef void *xp = cnp.PyArray_DATA(x)
    with nogil:
        # scale a = weight * invstd and shift = bias, as the C kernels' backward computes them
        bn_scale_shift(inv.ptr, w.ptr, b.ptr, sc, sh, C)
        st = t.backward_reduce[dt](dyp, xp, N, C, S, m.ptr, sc, sh, sd, sx, flags, nt)
    free(sc)
    _check(st)
    return 0


cdef int _bwd_apply(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t N,
                    Py_ssize_t C, Py_ssize_t S, _Vec m, _Vec inv, _Vec w, _Vec b,
                    const double *kx, const double *k0, bint relu, bint training,
                    int nt) except -1:
    cdef const bn_kernel_table *t = bn_active()
    cdef int dt = _dt(x), st
    cdef int flags = (BN_FLAG_RELU if relu else 0) | (0 if training else BN_FLAG_EVAL)
    cdef double *sc = <double *> malloc(sizeof(double) * 2 * (C if C > 0 else 1))
    if sc == NULL:
        raise MemoryError()
    cdef double *sh = sc + C
    cdef void *dyp = cnp.PyArray_DATA(dy)
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *dxp = cnp.PyArray_DATA(dx)
    with nogil:
        bn_scale_shift(inv.ptr, w.ptr, b.ptr, sc, sh, C)
        st = t.backward_dx[dt](dyp, xp, dxp, N, C, S, m.ptr, sc, sh, sc, kx, k0, flags, nt)
    free(sc)
    _check(st)
    return 0


cdef bint _bwd_coeffs(Py_ssize_t C, const double *sd, const double *sx, _Vec inv, _Vec w,
                      double cnt, bint training, double *dweight, double *kx,
                      double *k0) noexcept:
    """From the sums sd = sum(g), sx = sum(g * (x - mean)) over cnt values per channel:
    dweight = sx * invstd, and the coefficients of dx = a*g + kx*(x - mean) + k0 with
    a = weight * invstd (kx = k0 = 0 in eval mode).  Returns whether a channel is
    degenerate (a non-finite weight, invstd or sum).  These formulas are in one place: the
    kernel backward_coeffs (csrc/bn_train.h), 8 channels per vector; its inputs and outputs
    are float64 whatever the data's dtype, so the float32 slot [0] serves both (the two
    slots are the same function compiled twice)."""
    return bn_active().backward_coeffs[0](C, sd, sx, inv.ptr, w.ptr, cnt, training,
                                          dweight, kx, k0) != 0


cdef tuple _backward_reduce(cnp.ndarray dy, cnp.ndarray x, Py_ssize_t N, Py_ssize_t C,
                            Py_ssize_t S, _Vec m, _Vec inv, _Vec w, _Vec b, bint relu,
                            bint training, int nt):
    """(dweight, dbias, k_x, k_0, degenerate): float64 arrays and a flag."""
    cdef cnp.ndarray sx = _empty_c(C), dbias = _empty_c(C), dweight = _empty_c(C)
    cdef cnp.ndarray kxa = _empty_c(C), k0a = _empty_c(C)
    cdef double *dbp = <double *> cnp.PyArray_DATA(dbias)
    cdef double *sxp = <double *> cnp.PyArray_DATA(sx)
    _bwd_reduce(dy, x, N, C, S, m, inv, w, b, relu, dbp, sxp, nt)   # dbias = sum(g)
    degenerate = _bwd_coeffs(C, dbp, sxp, inv, w, <double> N * <double> S, training,
                             <double *> cnp.PyArray_DATA(dweight),
                             <double *> cnp.PyArray_DATA(kxa),
                             <double *> cnp.PyArray_DATA(k0a))
    return dweight, dbias, kxa, k0a, degenerate


cdef object _backward_fused(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t N,
                            Py_ssize_t C, Py_ssize_t S, _Vec m, _Vec inv, _Vec w, _Vec b,
                            bint relu, bint training, int nt):
    """_backward_reduce and _bwd_apply in one kernel call where the plan fuses them:
    (dweight, dbias, degenerate), dx written (not to be used if degenerate); None if the
    kernel declined (nothing written)."""
    cdef cnp.ndarray sx = _empty_c(C), dbias = _empty_c(C), dweight = _empty_c(C)
    cdef cnp.ndarray kxa = _empty_c(C), k0a = _empty_c(C)
    cdef const bn_kernel_table *t = bn_active()
    cdef int dt = _dt(x), st, degenerate = 0
    cdef int flags = (BN_FLAG_RELU if relu else 0) | (0 if training else BN_FLAG_EVAL)
    cdef void *dyp = cnp.PyArray_DATA(dy)
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *dxp = cnp.PyArray_DATA(dx)
    cdef double *dbp = <double *> cnp.PyArray_DATA(dbias)
    cdef double *sxp = <double *> cnp.PyArray_DATA(sx)
    cdef double *dwp = <double *> cnp.PyArray_DATA(dweight)
    cdef double *kxp = <double *> cnp.PyArray_DATA(kxa)
    cdef double *k0p = <double *> cnp.PyArray_DATA(k0a)
    with nogil:
        st = t.backward_fused[dt](dyp, xp, dxp, N, C, S, m.ptr, inv.ptr, w.ptr, b.ptr, dbp,
                                  sxp, dwp, kxp, k0p, flags, nt, &degenerate)
    if st == BN_DECLINED:
        return None
    _check(st)
    return dweight, dbias, degenerate != 0


def backward_coefficients(cnp.ndarray sum_dy, cnp.ndarray sum_dyxmu, object invstd,
                          object weight, double count, bint training):
    """(dweight, k_x, k_0, degenerate) from per-channel float64 sums over `count` values
    (for sums taken over several processes: bnfast.distributed)."""
    cdef Py_ssize_t C = cnp.PyArray_DIM(sum_dy, 0)
    cdef cnp.ndarray dweight = _empty_c(C), kxa = _empty_c(C), k0a = _empty_c(C)
    degenerate = _bwd_coeffs(C, <double *> cnp.PyArray_DATA(sum_dy),
                             <double *> cnp.PyArray_DATA(sum_dyxmu), _vec(invstd, C),
                             _vec(weight, C), count, training,
                             <double *> cnp.PyArray_DATA(dweight),
                             <double *> cnp.PyArray_DATA(kxa),
                             <double *> cnp.PyArray_DATA(k0a))
    return dweight, kxa, k0a, degenerate


def backward_sums(cnp.ndarray dy, cnp.ndarray x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                  object mean, object invstd, object weight, object bias, bint relu,
                  int nthreads):
    """The backward pass's per-channel reductions: (sum(g), sum(g * (x - mean))) in
    float64, g = dy masked by the fused ReLU's forward output when relu."""
    cdef cnp.ndarray sd = _empty_c(C), sx = _empty_c(C)
    _bwd_reduce(dy, x, N, C, S, _vec(mean, C), _vec(invstd, C), _vec(weight, C),
                _vec(bias, C), relu, <double *> cnp.PyArray_DATA(sd),
                <double *> cnp.PyArray_DATA(sx), nthreads)
    return sd, sx


def backward_dx(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t N, Py_ssize_t C,
                Py_ssize_t S, object mean, object invstd, object weight, object bias,
                cnp.ndarray k_x, cnp.ndarray k_0, bint relu, bint training, int nthreads):
    """dx = a * g + k_x * (x - mean) + k_0 per channel (a * g in eval mode), a = weight *
    invstd: the backward's element-wise pass with the caller's float64 coefficients."""
    _bwd_apply(dy, x, dx, N, C, S, _vec(mean, C), _vec(invstd, C), _vec(weight, C),
               _vec(bias, C), <double *> cnp.PyArray_DATA(k_x),
               <double *> cnp.PyArray_DATA(k_0), relu, training, nthreads)


def moments(cnp.ndarray x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int nthreads):
    """Per-channel (mean, biased var) as float64 arrays of length C."""
    return _moments(x, N, C, S, nthreads)


def train_forward(cnp.ndarray x, cnp.ndarray y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                  object weight, object bias, double eps, bint relu,
                  object running_mean, object running_var, double momentum, int nthreads):
    """Training forward: returns (mean, invstd) float64; updates running stats if given."""
    return _train(x, y, N, C, S, weight, bias, eps, relu, running_mean, running_var,
                  momentum, nthreads)


def infer_forward(cnp.ndarray x, cnp.ndarray y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                  cnp.ndarray mean, cnp.ndarray var, object weight, object bias, double eps,
                  bint relu, int nthreads):
    """Inference forward with given mean/var (var checked by the caller)."""
    if not _infer(x, y, N, C, S, mean, var, weight, bias, eps, relu, nthreads):
        raise ValueError("bnfast: a var that the checks accepted reached the kernel as "
                         "negative, NaN or zero with eps 0; please report this bug")


def backward_reduce(cnp.ndarray dy, cnp.ndarray x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                    cnp.ndarray mean, cnp.ndarray invstd, object weight, object bias,
                    bint relu, bint training, int nthreads):
    """The backward's reduction: (dweight, dbias, k_x, k_0, degenerate), float64 arrays
    and whether a channel has a non-finite weight, invstd or sum; backward_dx with k_x and
    k_0 then writes dx."""
    return _backward_reduce(dy, x, N, C, S, _vec(mean, C), _vec(invstd, C), _vec(weight, C),
                            _vec(bias, C), relu, training, nthreads)


# ---------------------------------------------------------------- fast paths
#
# The public functions (bnfast._api) call these first.  Each returns None unless its
# arguments are, on cheap C-level checks, obviously valid and in the kernels' native form
# (aligned C-contiguous native float32/float64 arrays of exact type ndarray, channel axis
# an int in range, scalars plain floats/ints in range, flags True/False, vectors that are 1-D
# contiguous float arrays of the right length, no overlap of out with a vector or a
# partial one with the inputs, running statistics apart from x and out).  Anything else
# goes through the general path in Python, which owns every error message; a fast path
# never raises for bad input.  `nthreads` is a thread count, or a callable that returns one
# (bnfast.get_num_threads), called only where the plan could use more than one thread.


cdef int _threads_for(object nthreads, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S) except -1:
    # Below BN_PAR_MIN elements every plan runs one thread, so the setting is not asked
    # (bnfast.get_num_threads from Python took 0.3 us of a 5 us inference).
    if type(nthreads) is int:
        return nthreads
    if not bn_plan_parallel(N, C, S):
        return 1
    return nthreads()

cdef inline bint _is_data(object a):
    if type(a) is not cnp.ndarray:
        return False
    cdef cnp.ndarray arr = <cnp.ndarray> a
    cdef int tn = cnp.PyArray_TYPE(arr)
    return ((tn == cnp.NPY_FLOAT or tn == cnp.NPY_DOUBLE) and cnp.PyArray_ISNOTSWAPPED(arr)
            and cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr))

cdef inline bint _is_vec(object v, Py_ssize_t C):
    # None, or a 1-D contiguous native float32/float64 array of length C
    if v is None:
        return True
    if not _is_data(v):
        return False
    cdef cnp.ndarray a = <cnp.ndarray> v
    return cnp.PyArray_NDIM(a) == 1 and cnp.PyArray_DIM(a, 0) == C

cdef inline bint _is_real(object v, double lo, double hi):
    # A float or int in [lo, hi]; compared as Python objects, so a huge int is just False.
    if type(v) is float or type(v) is int:
        return lo <= v <= hi
    return False

cdef inline bint _is_flag(object v):
    return v is True or v is False

cdef inline bint _disjoint(cnp.ndarray a, cnp.ndarray b):
    cdef char *pa = <char *> cnp.PyArray_DATA(a)
    cdef char *pb = <char *> cnp.PyArray_DATA(b)
    return pa + cnp.PyArray_NBYTES(a) <= pb or pb + cnp.PyArray_NBYTES(b) <= pa

cdef inline bint _apart(object v, object out):
    # v and out are not both arrays, or they do not overlap; anything but None or an
    # exact ndarray is declined (False), to be judged by the general path
    if v is None or out is None:
        return True
    if type(v) is not cnp.ndarray or type(out) is not cnp.ndarray:
        return False
    return _disjoint(<cnp.ndarray> v, <cnp.ndarray> out)

cdef inline bint _ok_out(object out, cnp.ndarray x, tuple inputs):
    # out is None, or a writeable array shaped and typed like x that is exactly one of
    # the inputs or overlaps none of them
    if out is None:
        return True
    if not _is_data(out):
        return False
    cdef cnp.ndarray o = <cnp.ndarray> out
    if cnp.PyArray_TYPE(o) != cnp.PyArray_TYPE(x) or not cnp.PyArray_ISWRITEABLE(o):
        return False
    if cnp.PyArray_NDIM(o) != cnp.PyArray_NDIM(x):
        return False
    cdef int i
    for i in range(cnp.PyArray_NDIM(x)):
        if cnp.PyArray_DIM(o, i) != cnp.PyArray_DIM(x, i):
            return False
    cdef cnp.ndarray a
    for a in inputs:
        if cnp.PyArray_DATA(a) != cnp.PyArray_DATA(o) and not _disjoint(a, o):
            return False
    return True

cdef inline bint _split(cnp.ndarray x, object axis, Py_ssize_t *N, Py_ssize_t *C,
                        Py_ssize_t *S):
    if type(axis) is not int:
        return False
    cdef int nd = cnp.PyArray_NDIM(x), ax, i
    if nd < 2 or not (-nd <= axis < nd):
        return False
    ax = axis
    if ax < 0:
        ax += nd
    if ax < 0 or ax >= nd:
        return False
    N[0] = 1
    S[0] = 1
    for i in range(ax):
        N[0] *= cnp.PyArray_DIM(x, i)
    for i in range(ax + 1, nd):
        S[0] *= cnp.PyArray_DIM(x, i)
    C[0] = cnp.PyArray_DIM(x, ax)
    return True

def fast_train(x, weight, bias, eps, axis, running_mean, running_var, momentum, out,
               relu, nthreads):
    cdef Py_ssize_t N = 0, C = 0, S = 0
    if not _is_data(x) or not _split(<cnp.ndarray> x, axis, &N, &C, &S):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray> x
    # eps == 0 takes the general path (it checks for zero-variance channels first)
    if N * S <= 1 or not _is_real(eps, 5e-324, 1e308) or not _is_real(momentum, 0.0, 1.0):
        return None
    if not _is_flag(relu):
        return None
    if not _is_vec(weight, C) or not _is_vec(bias, C):
        return None
    if (running_mean is None) != (running_var is None):
        return None
    if running_mean is not None:
        if not (_is_vec(running_mean, C) and _is_vec(running_var, C)):
            return None
        if (cnp.PyArray_TYPE(<cnp.ndarray> running_mean)
                != cnp.PyArray_TYPE(<cnp.ndarray> running_var)):
            return None
        if not (cnp.PyArray_ISWRITEABLE(<cnp.ndarray> running_mean)
                and cnp.PyArray_ISWRITEABLE(<cnp.ndarray> running_var)):
            return None
        if not _disjoint(<cnp.ndarray> running_mean, <cnp.ndarray> running_var):
            return None
        if not (_apart(running_mean, x) and _apart(running_var, x)
                and _apart(running_mean, out) and _apart(running_var, out)):
            return None
    if not _ok_out(out, xa, (xa,)) or not (_apart(weight, out) and _apart(bias, out)):
        return None
    cdef cnp.ndarray y = _empty_like(xa) if out is None else <cnp.ndarray> out
    mean, invstd = _train(xa, y, N, C, S, weight, bias, eps, relu, running_mean,
                          running_var, momentum, _threads_for(nthreads, N, C, S))
    return y, mean, invstd


def fast_infer(x, mean, var, weight, bias, eps, axis, out, relu, nthreads):
    cdef Py_ssize_t N = 0, C = 0, S = 0
    if not _is_data(x) or not _split(<cnp.ndarray> x, axis, &N, &C, &S):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray> x
    if mean is None or var is None or not _is_real(eps, 0.0, 1e308) or not _is_flag(relu):
        return None
    if not (_is_vec(mean, C) and _is_vec(var, C) and _is_vec(weight, C)
            and _is_vec(bias, C) and _ok_out(out, xa, (xa,))):
        return None
    if not (_apart(mean, out) and _apart(var, out) and _apart(weight, out)
            and _apart(bias, out)):
        return None
    cdef cnp.ndarray y = _empty_like(xa) if out is None else <cnp.ndarray> out
    if not _infer(xa, y, N, C, S, mean, var, weight, bias, eps, relu,
                  _threads_for(nthreads, N, C, S)):
        return None                # var negative, NaN or zero (with eps 0): the general path
    return y


def fast_backward(dy, x, mean, invstd, weight, bias, relu, training, axis, out,
                  nthreads):
    cdef Py_ssize_t N = 0, C = 0, S = 0, i
    cdef int nt
    if not (_is_data(x) and _is_data(dy)) or not _split(<cnp.ndarray> x, axis, &N, &C, &S):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray> x, da = <cnp.ndarray> dy
    if cnp.PyArray_TYPE(xa) != cnp.PyArray_TYPE(da) or cnp.PyArray_NDIM(xa) != cnp.PyArray_NDIM(da):
        return None
    for i in range(cnp.PyArray_NDIM(xa)):
        if cnp.PyArray_DIM(xa, i) != cnp.PyArray_DIM(da, i):
            return None
    if mean is None or invstd is None or not (_is_flag(relu) and _is_flag(training)):
        return None
    if relu is True and bias is None:
        return None                # the general path explains why the bias is needed
    if not (_is_vec(mean, C) and _is_vec(invstd, C) and _is_vec(weight, C)
            and _is_vec(bias, C) and _ok_out(out, xa, (xa, da))):
        return None
    if not (_apart(mean, out) and _apart(invstd, out) and _apart(weight, out)
            and _apart(bias, out)):
        return None
    cdef _Vec m = _vec(mean, C), inv = _vec(invstd, C), w = _vec(weight, C), b = _vec(bias, C)
    cdef cnp.ndarray dx = None
    nt = _threads_for(nthreads, N, C, S)
    # Large enough for the plan to fuse the two passes (plan.fused: dy and x not cache-
    # resident; the kernel asks the plan and declines otherwise), or the fusion forced
    # (tests): both in one kernel call
    cdef double nbytes = 2.0 * <double> cnp.PyArray_NBYTES(xa)
    fused = None
    if nbytes >= <double> bn_get_stream_min_bytes() or bn_plan_forced_fused() == 1:
        dx = _empty_like(xa) if out is None else <cnp.ndarray> out
        fused = _backward_fused(da, xa, dx, N, C, S, m, inv, w, b, relu, training, nt)
    if fused is not None:
        dweight, dbias, degenerate = fused
    else:
        dweight, dbias, kx, k0, degenerate = _backward_reduce(da, xa, N, C, S, m, inv, w, b,
                                                              relu, training, nt)
    if degenerate:
        return None                # the general path recomputes such channels
    if fused is None:
        if dx is None:
            dx = _empty_like(xa) if out is None else <cnp.ndarray> out
        _bwd_apply(da, xa, dx, N, C, S, m, inv, w, b, <double *> cnp.PyArray_DATA(kx),
                   <double *> cnp.PyArray_DATA(k0), relu, training, nt)
    if _dt(xa) == 0:
        return dx, dweight.astype(np.float32), dbias.astype(np.float32)
    return dx, dweight, dbias


def fast_moments(x, axis, nthreads):
    cdef Py_ssize_t N = 0, C = 0, S = 0
    if not _is_data(x) or not _split(<cnp.ndarray> x, axis, &N, &C, &S):
        return None
    if N * S == 0:
        return None
    return _moments(<cnp.ndarray> x, N, C, S, _threads_for(nthreads, N, C, S))
