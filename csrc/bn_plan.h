/*
 * The plan: which traversal each pass of an operation uses, and every threshold and block
 * size behind that choice.  bn_plan_make (plan.c) is the one function that decides; the
 * kernels only follow the plan it returns, and Python shows it (bnfast.explain).
 *
 * An operation has up to two passes over the data:
 *
 *   op         reduction pass                     element-wise pass
 *   moments    statistics (mean, M2)              -
 *   train      statistics                         normalize
 *   infer      -                                  normalize
 *   backward   backward sums (sum g, sum g(x-m))  dx
 *
 * Both passes see the data as (N, C, S) and use the same LAYOUT:
 *   BN_LAYOUT_ROWS     each (n, c) row of S contiguous elements is a unit (channels-first
 *                      with a large spatial size);
 *   BN_LAYOUT_COLUMNS  the data is a matrix of N rows and Cp = C * S columns, each column
 *                      one (c, s) pair (channels-last, 2-D, small spatial sizes).
 * The layout and the partitions below depend on the shape only; they fix the order of
 * every addition, hence the bits.  The WALKS (the traversal inside a partition) only
 * change the speed: every walk of a pass performs the same additions in the same order,
 * so forcing one (bn_plan_force) gives the same bits.  Forcing the layout changes the
 * partition, hence the bits (still the same for any thread count and every variant).
 */
#ifndef BN_PLAN_H
#define BN_PLAN_H
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- thresholds and block sizes (all depend on the shape only, never on threads) ---- */
#define BN_ROW_MIN_S 64        /* S >= this: rows layout; else columns of (N, C*S) ... */
#define BN_ROW_MIN_S_PER_N 2   /* ... unless S >= this * N (few rows): rows layout too */
#define BN_PAR_MIN 32768       /* elements below which a call stays on one thread */
#define BN_SEG 2048            /* rows layout: contiguous segment per two-pass block */
#define BN_ROW_RUN 16384       /* rows layout: elements an item reads contiguously (per n) */
#define BN_ROW_CHUNK 256       /* rows layout: most channels per work item */
#define BN_MAX_GROUPS_ROW 16   /* rows layout: most row groups (partial results) */
#define BN_TILE 256            /* columns layout: columns per tile */
#define BN_BLOCK_ELEMS 32768   /* columns layout: elements per two-pass block (tile x rows) */
#define BN_MAX_GROUPS_COL 64   /* columns layout: most row groups */
#define BN_SPAN 16384          /* element-wise passes: elements per work item (about) */
#define BN_EW_TILE 256         /* columns dx: columns per tile (parameters stay in L1) */
#define BN_PERIOD_MIN 64       /* columns element-wise: shortest period (elements) */
#define BN_EW_ROW_MIN_S 8      /* columns element-wise: rows walk for S >= this (below,
                                  a row does not fill one vector) ... */
#define BN_EW_ROW_MIN_S_F32 16      /* columns normalize of float32 data in float32: rows
                                  walk for S >= this ... */
#define BN_EW_ROW_MIN_COLS_F32 1024 /* ... and Cp >= this, in every variant */
#define BN_EW_TILE_MIN_COLS 2048   /* columns normalize: tiles walk for Cp >= this (a
                                  period's parameters leave L1; few periods per item) */
#define BN_EW_TILE_MAX_ROWS 256    /* ... and N <= this (an item is a tile down all rows) */
#define BN_EW_ROW_MIN_PARAM_BYTES ((double)(512 << 10))   /* ... and a period's expanded
                                  parameters of at least this many bytes (half of L2) */
#define BN_REG_MAX_COLS 64     /* register walks: most columns one strip keeps in registers */
#define BN_REG_SSE2_STATS_COLS 16  /* ... and the baseline (SSE2) statistics' strips while
                                  cache-resident (plan.c) */
#define BN_SHIFT_COND 16.0     /* one-pass block statistics while mean(x-K)^2 <= this * var */
#define BN_FUSE_MIN_ROW_BYTES ((double)(32 << 10))   /* fused training forward and backward
                                  (plan.fused): rows of at least this many bytes, ... */
#define BN_FUSE_MAX_SHARE_BYTES ((double)(4 << 20))   /* ... at most this many of each
                                  channel's input (x; dy and x) per thread, ... */
#define BN_FUSE_CHUNK 1024      /* ... normalising (or writing dx for) this many elements,
                                  then reading as many of the next channel's (a multiple of
                                  16: seg_sums) */
#define BN_F32_MIN_PER_CHANNEL 8   /* float32 element-wise arithmetic where a channel has at
                                  least this many elements (N * S); below, double */

enum { BN_OP_MOMENTS = 0, BN_OP_TRAIN = 1, BN_OP_INFER = 2, BN_OP_BACKWARD = 3,
       BN_OP_COUNT = 4 };

enum { BN_LAYOUT_ROWS = 0, BN_LAYOUT_COLUMNS = 1 };

/* Walks of the columns layout (the rows layout has one walk per pass).  Statistics:
 * REGISTER or MEMORY.  Backward sums: REGISTER, MEMORY or BLOCKS.  Normalize: ROWS, TILES,
 * SPANS, PERIOD64 or (inference only) DIRECT.  dx: ROWS or SPANS (in column tiles of
 * BN_EW_TILE); TILES forced.  An element-wise walk
 * computes every element with the same operations whatever the partition, so the
 * columns layout's element-wise pass may walk rows (the reduction keeps its columns). */
enum {
    BN_WALK_NONE = 0,      /* the pass does not run, or the rows layout */
    BN_WALK_REGISTER = 1,  /* strips of up to strip_cols columns down a block (statistics)
                              or a group's rows (backward), sums in registers */
    BN_WALK_MEMORY = 2,    /* row by row, vectors across the row, column sums in memory (L1) */
    BN_WALK_BLOCKS = 3,    /* backward: block by block, strips of 8 columns in registers */
    BN_WALK_SPANS = 4,     /* element-wise: each period as a span, parameters from memory */
    BN_WALK_PERIOD64 = 5,  /* normalize: a period of 64 with its parameters in registers */
    BN_WALK_ROWS = 6,      /* element-wise: each (n, c) row of S elements with its channel's
                              scalar parameters, as the rows layout does */
    BN_WALK_TILES = 7,     /* element-wise: items of column tiles (BN_EW_TILE) down all N
                              rows, so a tile's parameters stay in L1 */
    BN_WALK_DIRECT = 8,    /* inference of one element per channel (N = S = 1) in double:
                              each channel's coefficients and its element in one loop over
                              the channels, with no per-channel arrays (bn_train.h:
                              infer_direct) */
    BN_WALK_COUNT = 9
};

/* Column partition (shape only): tile width, rows per block, blocks per group. */
typedef struct {
    ptrdiff_t R, Cp, tile, ntiles, rb, nblocks, bpg, ngroups;
} bn_colpart;

typedef struct {
    int op, isa, itemsize;
    ptrdiff_t N, C, S;
    int nthreads;            /* threads the passes use (1 below BN_PAR_MIN elements) */
    int layout;              /* BN_LAYOUT_* (both passes) */
    /* reduction pass */
    int reduce_walk;         /* statistics or backward sums: BN_WALK_* (columns layout) */
    int strip_cols;          /* register walks: columns per strip (multiple of 8) */
    int resident;            /* its inputs fit the cache (below the streaming threshold) */
    ptrdiff_t row_groups, rows_per_group, row_chunk, row_items;   /* rows layout */
    bn_colpart col;                                               /* columns layout */
    ptrdiff_t col_items;
    /* element-wise pass */
    int ew_walk;             /* BN_WALK_ROWS, TILES, SPANS, PERIOD64 or DIRECT (columns
                                layout) */
    ptrdiff_t period;        /* elements per unit: S (rows layout or ROWS walk), 1 (DIRECT),
                                else a period of the columns layout (a multiple of Cp) */
    ptrdiff_t ew_units;      /* rows (rows layout or ROWS walk), column tiles (TILES walk),
                                channels (DIRECT) or whole periods */
    ptrdiff_t ew_per_item;   /* units per work item */
    ptrdiff_t ew_items;
    int stream;              /* streaming stores, if the output is 16-byte aligned */
    int ew_f32;              /* the element-wise pass of float32 data in float32 arithmetic
                                (bn_elementwise.h: ew_f32), else in double */
    int ew_f32_relu;         /* the same with the fused ReLU (normalize only: the backward's
                                ReLU mask is the double y's, as the twin's) */
    int fused;               /* training forward and backward, rows layout: both passes
                                channel by channel, each thread normalising a channel (or
                                writing its dx) while it reads the next one's statistics
                                (sums) (bn_train.h: train_fused, backward_fused); the same
                                segments, merges and element formulas, so the same bits */
} bn_plan;

/* The plan of operation op on (N, C, S) elements of itemsize bytes (4 or 8) with kernel
 * variant isa and up to nthreads threads; the streaming threshold and any forced walks
 * are read from their settings.  Returns BN_OK or BN_EINVAL. */
int bn_plan_make(bn_plan *p, int op, ptrdiff_t N, ptrdiff_t C, ptrdiff_t S, int itemsize,
                 int isa, int nthreads);

/* Whether a plan of N * C * S elements may run more than one thread (bn_plan.nthreads: it
 * has BN_PAR_MIN elements or more); the bindings ask bnfast's thread setting only then. */
int bn_plan_parallel(ptrdiff_t N, ptrdiff_t C, ptrdiff_t S);

/* Tests: force a layout (BN_LAYOUT_*, -1 = the plan's choice), a reduction walk and an
 * element-wise walk (BN_WALK_*, -1 = the plan's choice) for every later call; a walk that
 * does not apply to a pass (a backward walk for statistics, PERIOD64 for a period other
 * than 64) leaves that pass's choice alone.  Returns BN_OK or BN_EINVAL. */
int bn_plan_force(int layout, int stats_walk, int backward_walk, int ew_walk);
void bn_plan_forced(int *layout, int *stats_walk, int *backward_walk, int *ew_walk);
/* Tests and benchmarks: the element-wise arithmetic of float32 data for every later call:
 * BN_ARITH_F64 (double), BN_ARITH_F32 (float32 where the plan has a float32 path: the
 * normalisation, and dx without the ReLU), -1 = the plan's choice.  Unlike a walk, this changes the bits (the same
 * in every variant and thread count either way).  Returns BN_OK or BN_EINVAL. */
enum { BN_ARITH_F64 = 0, BN_ARITH_F32 = 1 };
int bn_plan_force_arith(int arith);
int bn_plan_forced_arith(void);
/* Tests: the fused training forward and backward (plan.fused) on (1) or off (0) wherever
 * they can run (rows layout, some data), -1 = the plan's choice.  It never changes a
 * bit.  Returns BN_OK or BN_EINVAL. */
int bn_plan_force_fused(int fused);
int bn_plan_forced_fused(void);

const char *bn_walk_name(int walk);
const char *bn_layout_name(int layout);
const char *bn_op_name(int op);

/* The streaming threshold T: the backward's dx pass writes with non-temporal stores when
 * its inputs and output together move at least T bytes, the normalisation when its input
 * alone is T (AVX2 and AVX-512 variants, aligned outputs; bn_plan_streams); a reduction's
 * inputs below T are cache-resident.  The default is the last-level cache's size
 * (bn_llc_bytes), BN_STREAM_MIN_BYTES_DEFAULT where that is unknown;
 * bn_set_stream_min_bytes (BNFAST_STREAM_MIN_BYTES) overrides. */
#define BN_STREAM_MIN_BYTES_DEFAULT ((size_t)16 << 20)
size_t bn_llc_bytes(void);   /* the last-level cache in bytes, 0 if unknown */
size_t bn_get_stream_min_bytes(void);
void bn_set_stream_min_bytes(size_t nbytes);
int bn_plan_streams(int isa, int op, double tensor_bytes);   /* the rule (plan.c) */

/* Streaming stores to out are not used when an input lies 1 to this many bytes before
 * out modulo 4 KiB: the loads that follow the stores then match their addresses in the
 * low 12 bits and wait for them (benchmarks/README.md). */
#define BN_STREAM_ALIAS_BYTES 256
/* Whether in0 or in1 (either may be NULL) lies 1 to BN_STREAM_ALIAS_BYTES bytes before
 * out modulo 4 KiB, so that out must not be written with streaming stores (plan.c; the
 * element-wise kernels and bench_copy.c ask). */
int bn_stream_alias(const void *out, const void *in0, const void *in1);

#ifdef __cplusplus
}
#endif
#endif /* BN_PLAN_H */
