/*
 * The plan (bn_plan.h): the one function that chooses each pass's layout, partition and
 * walk, with every threshold named and explained; the forced-walk switch for tests; the
 * streaming threshold.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif
#include "bnfast.h"
#include "bn_plan.h"

/* The last-level cache in bytes: Linux's sysfs entry for cpu0's level-3 cache (the
 * slice cpu0 shares), else sysconf's level-3 size (glibc), else 0 (unknown).  sysfs
 * first: on the AMD EPYC test machine (a VM), sysconf gives 320 MiB, the whole package's
 * L3, where cpu0 has a 32 MiB slice (lscpu: "32 MiB (1 instance)"). */
size_t bn_llc_bytes(void)
{
    long n = -1;
#ifdef __linux__
    FILE *f = fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
    if (f) {
        char unit = 0;
        long v = 0;
        const int got = fscanf(f, "%ld%c", &v, &unit);
        fclose(f);
        if (got >= 1 && v > 0)
            n = v * (unit == 'K' ? 1L << 10 : unit == 'M' ? 1L << 20 : 1L);
    }
#endif
#ifdef _SC_LEVEL3_CACHE_SIZE
    if (n <= 0) n = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return n > 0 ? (size_t)n : 0;
}

/* The default threshold: the last-level cache, so that a pass whose inputs and output
 * fit in it (and stay there between calls) stores normally; BN_STREAM_MIN_BYTES_DEFAULT
 * where the size is unknown.  Two threads, AVX2 / AVX-512, inputs and output 16 MiB
 * in all (the 32 MiB L3 of the test machine): inference of (4, 32, 16, 32, 32) and
 * (8, 64, 64, 64) float32, both layouts, 0.30 -> 0.20 ms with ordinary stores, training
 * forward 0.46 -> 0.35 ms (benchmarks/README.md). */
static size_t stream_min_default(void)
{
    const size_t llc = bn_llc_bytes();
    return llc ? llc : BN_STREAM_MIN_BYTES_DEFAULT;
}

static size_t bn_stream_min = 0;   /* 0 until first read or set */
static int bn_stream_min_set = 0;

size_t bn_get_stream_min_bytes(void)
{
    if (!bn_stream_min_set) {   /* bnfast._config reads it at import, before any kernel */
        bn_stream_min = stream_min_default();
        bn_stream_min_set = 1;
    }
    return bn_stream_min;
}

void bn_set_stream_min_bytes(size_t nbytes)
{
    bn_stream_min = nbytes;
    bn_stream_min_set = 1;
}

/* Whether the element-wise pass of op over tensors of `tensor_bytes` each streams its
 * stores under variant `isa`: the rule of bn_plan_make below, shared with bench_copy.c's
 * copy floor (a copy is a normalisation without arithmetic).  Every x86-64 variant,
 * the SSE2 baseline included (it did not stream before the tenth session: benchmarks/
 * README.md item 72); none elsewhere.
 *
 * - The backward's dx (dy and x read, dx written) streams when the three tensors reach
 *   the threshold T: it reads dy and x twice (its sums, then dx), and streaming dx keeps
 *   them cached for the second read.  Two threads, in-process A/B, medians: (11, 64, 64,
 *   64) float32 (33 MiB moved) 0.78-0.89 ms streaming against 0.94-1.10 without (avx512),
 *   0.86-0.89 against 0.91-0.92 (avx2); 14-16 MiB tensors the same way.
 * - The normalisation (x read, y written) streams when x alone reaches T (x and y move
 *   2 T): below that, ordinary stores keep part of both in the cache between calls.
 *   (65536, 64) float32 inference (16 MiB tensors, 32 MiB moved): 0.54 ms ordinary
 *   against 0.63 streaming (avx512), 0.59 against 0.67 (avx2, which the threshold T alone
 *   made slower than the baseline, which did not stream then); (32, 64, 56, 56) (24.5 MiB) in
 *   the benchmark's interleaved sampling 0.68-0.89 against 0.99-1.02 ms; 28 MiB tensors
 *   either way by turns; 32 MiB streaming as fast or faster (1.22-1.31 against
 *   1.32-1.69 ms).  benchmarks/README.md item 60. */
int bn_plan_streams(int isa, int op, double tensor_bytes)
{
    (void)isa;
#if defined(__SSE2__) || defined(_M_X64)
    const double T = (double)bn_get_stream_min_bytes();
    return op == BN_OP_BACKWARD ? 3.0 * tensor_bytes >= T : tensor_bytes >= T;
#else
    (void)op;
    (void)tensor_bytes;
    return 0;   /* streaming stores are x86's (bn_isa.h: BN_CAN_STREAM) */
#endif
}

/* The distance from an input to the output modulo 4 KiB, in 1..BN_STREAM_ALIAS_BYTES:
 * every load of the input then follows, by that distance, the streaming store of the
 * same address bits 0-11, and waits for it, the longer the wider the load (AVX-512's
 * 32-byte float32 loads against 16-byte streaming stores).  Measured (one thread, float32
 * inference of (4, 32, 16, 32, 32), out - in = 0 / 32 / 64 / 128 / 192 / 256 / 384 bytes
 * modulo 4 KiB): AVX-512 0.44 / 2.27 / 1.45 / 0.86 / 0.61 / 0.50 / 0.45 ms, AVX2 0.45 /
 * 0.58-1.6 / 0.52-0.89 / 0.49-0.58 / 0.47 / 0.41 / 0.40, ordinary stores 0.39-0.46 at
 * every distance; two threads, (32, 64, 96, 96) from DRAM: AVX-512 3.0 / 10.1 / 6.7 /
 * 3.8 ms (0, 32, 64, 128) against 3.7-4.0 with ordinary stores. */
static int stream_alias1(const void *out, const void *in)
{
    if (!in) return 0;
    const size_t d = ((uintptr_t)out - (uintptr_t)in) & 4095;
    return d >= 1 && d <= BN_STREAM_ALIAS_BYTES;
}

int bn_stream_alias(const void *out, const void *in0, const void *in1)
{
    return stream_alias1(out, in0) || stream_alias1(out, in1);
}

/* Forced choices (tests): -1 = the plan's own choice. */
static int force_layout = -1, force_stats = -1, force_backward = -1, force_ew = -1;

static int walk_ok(int w, int a, int b, int c)
{
    return w == -1 || w == a || w == b || w == c;
}

int bn_plan_force(int layout, int stats_walk, int backward_walk, int ew_walk)
{
    if (!(layout == -1 || layout == BN_LAYOUT_ROWS || layout == BN_LAYOUT_COLUMNS) ||
        !walk_ok(stats_walk, BN_WALK_REGISTER, BN_WALK_MEMORY, BN_WALK_MEMORY) ||
        !walk_ok(backward_walk, BN_WALK_REGISTER, BN_WALK_MEMORY, BN_WALK_BLOCKS) ||
        !(walk_ok(ew_walk, BN_WALK_SPANS, BN_WALK_PERIOD64, BN_WALK_ROWS) ||
          ew_walk == BN_WALK_TILES || ew_walk == BN_WALK_DIRECT))
        return BN_EINVAL;
    force_layout = layout;
    force_stats = stats_walk;
    force_backward = backward_walk;
    force_ew = ew_walk;
    return BN_OK;
}

void bn_plan_forced(int *layout, int *stats_walk, int *backward_walk, int *ew_walk)
{
    *layout = force_layout;
    *stats_walk = force_stats;
    *backward_walk = force_backward;
    *ew_walk = force_ew;
}

static int force_arith = -1;

int bn_plan_force_arith(int arith)
{
    if (!(arith == -1 || arith == BN_ARITH_F64 || arith == BN_ARITH_F32)) return BN_EINVAL;
    force_arith = arith;
    return BN_OK;
}

int bn_plan_forced_arith(void) { return force_arith; }

static int force_fused = -1;

int bn_plan_force_fused(int fused)
{
    if (!(fused == -1 || fused == 0 || fused == 1)) return BN_EINVAL;
    force_fused = fused;
    return BN_OK;
}

int bn_plan_forced_fused(void) { return force_fused; }

const char *bn_walk_name(int walk)
{
    static const char *names[BN_WALK_COUNT] = {"none",  "register", "memory", "blocks",
                                               "spans", "period64", "rows",   "tiles",
                                               "direct"};
    return walk >= 0 && walk < BN_WALK_COUNT ? names[walk] : "unknown";
}

const char *bn_layout_name(int layout)
{
    return layout == BN_LAYOUT_ROWS ? "rows" : layout == BN_LAYOUT_COLUMNS ? "columns"
                                                                           : "unknown";
}

const char *bn_op_name(int op)
{
    static const char *names[BN_OP_COUNT] = {"moments", "train", "infer", "backward"};
    return op >= 0 && op < BN_OP_COUNT ? names[op] : "unknown";
}

/* ---- partitions (shape only) ---- */

/* Rows layout: number of row groups, each producing partial results merged in order. */
static ptrdiff_t groups_row(ptrdiff_t N, ptrdiff_t S)
{
    ptrdiff_t g = (ptrdiff_t)(((double)N * (double)S) / 65536.0);
    if (g > BN_MAX_GROUPS_ROW) g = BN_MAX_GROUPS_ROW;
    if (g > N) g = N;
    if (g < 1) g = 1;
    return g;
}

/*
 * Rows layout: channels per work item.  An item covers channels [c0, c0 + chunk) of a group
 * of rows and walks them in memory order (for each n, its channels one after another), so
 * it reads runs of chunk * S contiguous elements that the hardware prefetchers can follow.
 * Each channel still merges its rows in order, so the chunking does not change any result.
 */
static ptrdiff_t chunk_row(ptrdiff_t C, ptrdiff_t S)
{
    ptrdiff_t cc = (BN_ROW_RUN + S - 1) / (S > 0 ? S : 1);
    const ptrdiff_t par = (C + 7) / 8;   /* at least about 8 items per row group */
    if (cc > par) cc = par;
    if (cc > BN_ROW_CHUNK) cc = BN_ROW_CHUNK;
    if (cc < 1) cc = 1;
    return cc;
}

/* Columns layout: tiles of columns, blocks of rows, groups of blocks. */
static bn_colpart colpart_make(ptrdiff_t R, ptrdiff_t Cp)
{
    bn_colpart p;
    p.R = R;
    p.Cp = Cp;
    p.tile = Cp < BN_TILE ? Cp : BN_TILE;
    if (p.tile < 1) p.tile = 1;
    p.ntiles = (Cp + p.tile - 1) / p.tile;
    p.rb = BN_BLOCK_ELEMS / p.tile;
    if (p.rb < 8) p.rb = 8;
    p.nblocks = (R + p.rb - 1) / p.rb;
    if (p.nblocks < 1) p.nblocks = 1;
    ptrdiff_t g = p.nblocks;
    if (g > BN_MAX_GROUPS_COL) g = BN_MAX_GROUPS_COL;
    ptrdiff_t lim = (ptrdiff_t)1 << 20;
    lim = lim / (Cp > 0 ? Cp : 1);
    if (lim < 1) lim = 1;
    if (g > lim) g = lim;
    ptrdiff_t work = (ptrdiff_t)(((double)R * (double)Cp) / 65536.0);
    if (work < 1) work = 1;
    if (g > work) g = work;
    if (g < 1) g = 1;
    p.bpg = (p.nblocks + g - 1) / g;
    p.ngroups = (p.nblocks + p.bpg - 1) / p.bpg;
    return p;
}

/*
 * Columns layout, element-wise passes: the period is Cp itself when Cp >= 64 (any length),
 * else the smallest multiple of Cp of at least 64 elements that is a multiple of 8, so
 * narrow rows still fill whole vectors.
 */
static ptrdiff_t period_of(ptrdiff_t Cp)
{
    if (Cp < 1) return 1;   /* empty data: nothing to walk */
    if (Cp >= BN_PERIOD_MIN) return Cp;
    ptrdiff_t k = 1;
    while (k * Cp < BN_PERIOD_MIN || (k * Cp) % 8 != 0) k++;
    return k * Cp;
}

int bn_plan_parallel(ptrdiff_t N, ptrdiff_t C, ptrdiff_t S)
{
    /* A call below BN_PAR_MIN elements stays on one thread (waking the others costs more
     * than it saves).  The partitions never depend on the thread count. */
    return (double)N * (double)C * (double)S >= BN_PAR_MIN;
}

int bn_plan_make(bn_plan *p, int op, ptrdiff_t N, ptrdiff_t C, ptrdiff_t S, int itemsize,
                 int isa, int nthreads)
{
    if (N < 0 || C < 0 || S < 0 || op < 0 || op >= BN_OP_COUNT ||
        (itemsize != 4 && itemsize != 8) || isa < 0 || isa >= BN_ISA_COUNT)
        return BN_EINVAL;
    const double count = (double)N * (double)C * (double)S;
    const int has_reduce = op != BN_OP_INFER, has_ew = op != BN_OP_MOMENTS;
    p->op = op;
    p->isa = isa;
    p->itemsize = itemsize;
    p->N = N;
    p->C = C;
    p->S = S;

    p->nthreads = nthreads < 1 || !bn_plan_parallel(N, C, S) ? 1 : nthreads;

    /* Layout: rows of S >= 64 contiguous elements fill whole vectors with little tail
     * work; shorter rows are better seen as columns of the (N, C*S) matrix, whose
     * bookkeeping (block statistics and merges per column) is paid per column, so with few
     * rows (S >= 2 N: batch-1 (1, 512, 7, 7) has 25,088 columns of one row) the rows
     * layout is cheaper again: moments of (1, 512, 7, 7) 171 -> 18 us, (16, 64, 7, 7)
     * 28 -> 18 us (AVX2, one thread); (32, 64, 7, 7) is faster as columns. */
    p->layout = S >= BN_ROW_MIN_S || (double)S >= BN_ROW_MIN_S_PER_N * (double)N
                    ? BN_LAYOUT_ROWS : BN_LAYOUT_COLUMNS;
    if (force_layout >= 0) p->layout = force_layout;
    const int rows = p->layout == BN_LAYOUT_ROWS;

    /* Partitions of both layouts (cheap; only the chosen one is used). */
    const ptrdiff_t Cp = C * S;
    ptrdiff_t G = groups_row(N, S);
    p->rows_per_group = (N + G - 1) / (G > 0 ? G : 1);
    if (p->rows_per_group < 1) p->rows_per_group = 1;
    p->row_groups = (N + p->rows_per_group - 1) / p->rows_per_group;
    p->row_chunk = chunk_row(C, S);
    p->row_items = p->row_groups * ((C + p->row_chunk - 1) / p->row_chunk);
    p->col = colpart_make(N, Cp);
    p->col_items = p->col.ngroups * p->col.ntiles;

    /* The reduction's inputs stay in the cache (one tensor for statistics, x and dy for
     * the backward sums) when they are below the streaming threshold.  Register strips
     * walk down a block column by column: fast from the cache, slower than the row-by-row
     * walk from DRAM on 2 threads (measured on AVX-512), whose single stream the
     * prefetchers follow.  The walks are chosen alike in every variant: with its sums in
     * native registers (bn_acc), the 64-column register strip is the fastest walk on AVX2
     * and for SSE2's backward sums too, even where it spills (strips of 16 or 32 columns
     * walk the rows more often and were slower: benchmarks/README.md).  SSE2's statistics
     * from the cache are the exception: with 16 registers of 2 doubles, a 64-column strip
     * keeps most of its 32 sums in memory, and 16-column strips were 0-12 % faster on all
     * 50 cache-resident training forwards of the benchmark that walk register strips
     * (geometric mean 7 %; 32 columns less, 8 slower); from DRAM they were slower
     * ((64, 28, 28, 256) channels-last 1.32x), and AVX2's statistics gained about 1 % (32
     * columns) -- benchmarks/README.md item 84.  The sums of each column are added in the
     * same order whatever the strip, so the bits do not depend on it. */
    const double in_bytes = count * (double)itemsize * (op == BN_OP_BACKWARD ? 2.0 : 1.0);
    p->resident = in_bytes < (double)bn_get_stream_min_bytes();
    p->reduce_walk = BN_WALK_NONE;
    const ptrdiff_t tile = p->col.tile, tile8 = tile & ~(ptrdiff_t)7;
    /* (Only where the tile is wider than one 16-column strip: narrower, both walk alike,
     * and the plan reads the same as the other variants'.) */
    p->strip_cols = isa == BN_ISA_BASELINE && op != BN_OP_BACKWARD && p->resident &&
                            tile8 > BN_REG_SSE2_STATS_COLS
                        ? BN_REG_SSE2_STATS_COLS : BN_REG_MAX_COLS;
    if (has_reduce && !rows) {
        if (op == BN_OP_BACKWARD) {
            /* Backward sums: whole rows of 8 to 71 columns (one stream), or wide
             * cache-resident tiles, in register strips; otherwise row by row for tiles
             * of 32 columns or more (measured: faster than strips for 64+ columns) and
             * block by block in strips of 8 columns below that. */
            if ((Cp == tile && tile >= 8 && tile < BN_REG_MAX_COLS + 8) ||
                (tile >= BN_REG_MAX_COLS + 8 && p->resident))
                p->reduce_walk = BN_WALK_REGISTER;
            else if (tile >= 32)
                p->reduce_walk = BN_WALK_MEMORY;
            else
                p->reduce_walk = BN_WALK_BLOCKS;
            if (force_backward >= 0) p->reduce_walk = force_backward;
        } else {
            /* Statistics: register strips for tiles of up to 64 columns, and for wider
             * tiles while cache-resident; else row by row with sums in memory -- on
             * AVX-512 only: from DRAM (2 threads, 49 and 64 MiB, the test machine's L3 is
             * 32 MiB) the memory walk took 1.7 / 4.7 ms against 2.5 / 4.9 for strips on
             * AVX-512, but 3.5 / 6.3 against 2.7 / 5.5 on AVX2 (SSE2: 4.1 / 6.9 against
             * 3.3 / 6.8), whose memory walk moves every sum through L1 in pieces. */
            if (tile8 <= BN_REG_MAX_COLS || p->resident || isa != BN_ISA_AVX512)
                p->reduce_walk = BN_WALK_REGISTER;
            else
                p->reduce_walk = BN_WALK_MEMORY;
            if (force_stats >= 0) p->reduce_walk = force_stats;
        }
    }

    /* Element-wise pass.  The columns layout walks rows of S >= BN_EW_ROW_MIN_S elements
     * with their channel's scalar parameters, as the rows layout does, when a period's
     * expanded parameters -- three (normalize) or six (dx) doubles per column -- reach
     * BN_EW_ROW_MIN_PARAM_BYTES: read per element from beyond L2 they cost more than the
     * rows' short loops (one thread, AVX-512 / AVX2: inference of (32, 512, 7, 7), period
     * 25,088 (600 KB), 280 -> 190 / 288 -> 197 us; its dx (1.2 MB) 728 -> 559 / 751 ->
     * 716 us).  With smaller periods the periods are faster (dx of (32, 256, 5, 5), 300 KB:
     * 155 against 181 us; inference of (256, 64, 3, 3): 36 against 72 us).  Normalize's
     * rows end with an overlapping vector (norm_span_s); dx's do not (slower on AVX2). */
    /* The arithmetic of the element-wise pass (below, where it is explained); the walk of
     * float32 normalisations depends on it. */
    const int f32 = has_ew && itemsize == 4 && force_arith != BN_ARITH_F64 &&
                    (force_arith == BN_ARITH_F32 || count >= (double)BN_F32_MIN_PER_CHANNEL * C);
    p->ew_walk = BN_WALK_NONE;
    if (has_ew && !rows) {
        /* Normalize: a period of 64 keeps its 3 x 8 parameter vectors in registers
         * (24 of AVX-512's 32 registers; AVX2 and SSE2 reload some, and it is still
         * 5-15% faster than spans there).  Periods of Cp >= BN_EW_TILE_MIN_COLS columns
         * (a few per item: their 3 parameter arrays of 48 KiB or more would be read from
         * L2 for every row) walk tiles of 256 columns down all rows instead (one thread,
         * AVX-512 / AVX2: inference of (32, 8192) 97 -> 77 / 97 -> 77 us, training 167 ->
         * 150 / 173 -> 156 us; (64, 8192, 2, 2) inference 798 -> 610 / 748 -> 588 us;
         * (256, 1024) stays spans: tiles 70 against 64 us).  From 2 rows (one row shares
         * nothing: batch-1 (1, 2048) stays spans) up to BN_EW_TILE_MAX_ROWS
         * rows: an item is a tile down all rows, and more rows would make too few items
         * for many threads.  dx (six parameter arrays)
         * walks spans in column tiles within its periods (the tiles walk was no faster:
         * (32, 8192) 437 against 432 us). */
        const int p64_ok = op != BN_OP_BACKWARD && period_of(Cp) == 64;
        /* The rows and tiles walks on AVX2 and AVX-512 only: the SSE2 baseline is bound
         * by its arithmetic (four 2-double pieces per vector), not by reading parameters,
         * and there the periods were as fast or faster (one thread, spans against rows or
         * tiles: inference of (32, 8192) 140 / 150 us, (64, 8192, 2, 2) 1399 / 1461,
         * (256, 64, 7, 7) 382 / 417; backward of (32, 512, 7, 7) 1052 / 1163). */
        const int wide = isa != BN_ISA_BASELINE;
        const double param_bytes = (op == BN_OP_BACKWARD ? 6.0 : 3.0) * 8.0 * (double)Cp;
        /* The float32 normalisation walks rows in every variant from periods of
         * BN_EW_ROW_MIN_COLS_F32 columns: its rows loop (f32_rows_fast) takes three scalar
         * parameters per row and one load per vector, the periods three parameter loads
         * per vector (inference, 2 threads, medians of 11, rows / the plan before:
         * (32, 256, 5, 5) 0.56 AVX-512, 0.53 AVX2, 0.50 SSE2; (32, 256, 4, 4) 0.52 / 0.49 /
         * 0.50; (128, 64, 4, 4) 0.74 / 0.65 / 0.70; (32, 512, 7, 7) SSE2 0.31; with
         * periods under 1024 columns the periods stay faster: (256, 64, 3, 4) 1.26 / - /
         * 1.31, (512, 32, 4, 4) 1.07 on AVX-512; rows of 9, (64, 256, 3, 3), made the
         * training forward 5-10 % slower: benchmarks/README.md item 66).  The backward
         * keeps its rule: its dx with the ReLU (double) was slower by rows. */
        const int f32_rows = f32 && op != BN_OP_BACKWARD && S >= BN_EW_ROW_MIN_S_F32 &&
                             Cp >= BN_EW_ROW_MIN_COLS_F32;
        /* One element per channel (N = S = 1: a batch-1 fully connected layer, whose
         * arithmetic is double, BN_F32_MIN_PER_CHANNEL): the inference computes each
         * channel's coefficients where it normalises its element, in one loop over the
         * channels (every variant).  Through per-channel arrays -- the float32 vectors
         * widened, the coefficients stored, then read again by the spans walk -- the
         * kernels of (1, 2048) with float32 parameters took 4.1 + 1.0 us on Zen 3 (AVX2),
         * of which the divider (sqrt and division of 2,048 doubles) needs 2.3
         * (benchmarks/README.md item 78). */
        const int direct_ok = op == BN_OP_INFER && N == 1 && S == 1 && !f32;
        p->ew_walk = direct_ok ? BN_WALK_DIRECT
                     : f32_rows || (wide && S >= BN_EW_ROW_MIN_S &&
                                  param_bytes >= BN_EW_ROW_MIN_PARAM_BYTES)
                         ? BN_WALK_ROWS
                     : wide && op != BN_OP_BACKWARD && Cp >= BN_EW_TILE_MIN_COLS && N >= 2 &&
                               N <= BN_EW_TILE_MAX_ROWS ? BN_WALK_TILES
                     : p64_ok ? BN_WALK_PERIOD64 : BN_WALK_SPANS;
        if (force_ew == BN_WALK_SPANS || force_ew == BN_WALK_ROWS ||
            force_ew == BN_WALK_TILES || (force_ew == BN_WALK_PERIOD64 && p64_ok) ||
            (force_ew == BN_WALK_DIRECT && direct_ok))
            p->ew_walk = force_ew;
    }
    const int ew_rows = rows || p->ew_walk == BN_WALK_ROWS;
    const int ew_tiles = !rows && p->ew_walk == BN_WALK_TILES;
    const int ew_direct = !rows && p->ew_walk == BN_WALK_DIRECT;
    /* tiles: rows of Cp; direct: channels one by one */
    p->period = ew_rows ? S : ew_tiles ? Cp : ew_direct ? 1 : period_of(Cp);
    if (p->period < 1) p->period = 1;
    p->ew_per_item = BN_SPAN / p->period;
    if (ew_tiles)   /* a tile down all rows: about BN_SPAN elements per item */
        p->ew_per_item = BN_SPAN / (BN_EW_TILE * (N > 0 ? N : 1));
    if (p->ew_per_item < 1) p->ew_per_item = 1;
    const ptrdiff_t units = ew_rows    ? N * C
                            : ew_tiles ? (N > 0 ? (Cp + BN_EW_TILE - 1) / BN_EW_TILE : 0)
                            : ew_direct ? C
                                       : (Cp > 0 ? (N * Cp) / p->period : 0);
    p->ew_units = units;
    p->ew_items = (units + p->ew_per_item - 1) / p->ew_per_item;
    p->stream = 0;
    if (has_ew) {
        /* Streaming stores: only where bn_plan_streams says so (the normalisation's input
         * alone reaches the threshold, or the backward's dy, x and dx together), and every
         * store is a whole 16-byte piece: each row (rows layout) or
         * period (columns) starts where the previous ended, so its length in bytes must be
         * a multiple of 16.  Mixing ordinary and non-temporal stores on one cache line is
         * very slow, so it is all or nothing; the kernel also checks the output's
         * alignment and its distance from the inputs (bn_stream_alias). */
        p->stream = ((size_t)p->period * (size_t)itemsize) % 16 == 0 &&
                    bn_plan_streams(isa, op, count * (double)itemsize);
    }
    /* Arithmetic: the element-wise passes of float32 data run in float32 (bn_elementwise.h,
     * ew_f32: error at most 2 float32 ulps of the channel's terms plus a second-order term,
     * docs/user_guide/semantics.md; elements that float32 cannot carry computed in double)
     * in every variant.  The normalisation, from L2, one
     * thread: 3.0 -> 8.5 G elements/s on SSE2, 5.9 -> 13.3-14.3 on AVX2, 6.6-7.0 ->
     * 13.3-14.2 (memcpy's rate) on AVX-512 (benchmarks/loops_f32.c, benchmarks/README.md
     * item 47).  dx: measured in item 57.  The backward with the fused ReLU stays in double:
     * its mask is the sign of the double y, as the twin's, and a float32 y may round to the
     * other side of zero.  Channels of fewer than BN_F32_MIN_PER_CHANNEL elements (N * S:
     * batch-1 fully connected layers) stay in double: the float32 path's per-channel
     * parameters (f32_params, one more pass and allocation) then cost more than they save
     * (inference of (1, 2048), one thread, medians: 5.17 -> 4.44 us AVX-512, 5.51 -> 4.79
     * AVX2, 8.26 -> 7.11 SSE2; (2, 2048) 5.40 -> 4.86; from (4, 2048) on float32 is as
     * fast or faster: benchmarks/README.md item 64).  Forcing float32 (tests) overrides
     * this; the GPU backend follows the same rule (bnfast/cuda/_backend.py). */
    p->ew_f32 = f32;
    p->ew_f32_relu = p->ew_f32 && op != BN_OP_BACKWARD;

    /* Fused training forward and backward: beyond the streaming threshold the two passes
     * read x (and dy) twice from DRAM.  Channel by channel instead, the threads sharing
     * each channel by row groups, a thread normalises (writes dx for) its rows of a channel
     * while it reads its rows of the next channel for their statistics (sums): its share
     * of the channel is still in its L2 when it is normalised, and its reads overlap its
     * writes (bn_train.h: train_fused, backward_fused).  Measured (float32, 2 threads,
     * AVX-512, fused / two passes in one process, medians; benchmarks/README.md item 71):
     * (32, 64, 96, 96) 0.94-0.98 training forward, 0.68-0.76 backward; (16, 32, 256, 256)
     * 0.76 / 0.70; (64, 64, 96, 96) 0.83 / 0.72; (128, 64, 112, 112) 0.86 / 0.95 (its
     * dy and x take 6 MiB a thread); but with rows of 16 KiB 1.06 / 1.00 ((32, 128, 64,
     * 64)) and of 12 KiB 1.56 / 1.14 ((128, 64, 56, 56)): a channel is then many short
     * runs, which the prefetchers follow worse than the two passes' one stream.  Hence
     * rows of BN_FUSE_MIN_ROW_BYTES, at most BN_FUSE_MAX_SHARE_BYTES of a channel's input
     * per thread, and a row group per thread (threads without rows would wait).  Every
     * element and every channel's statistics or sums are computed as in the two passes:
     * the choice never changes a bit (tests force it either way). */
    const int can_fuse = (op == BN_OP_TRAIN || op == BN_OP_BACKWARD) && rows && N > 0 &&
                         C > 0 && S > 0;
    const double row_bytes = (double)S * (double)itemsize;
    const double share = (double)N * row_bytes * (op == BN_OP_BACKWARD ? 2.0 : 1.0) /
                         (double)p->nthreads;
    p->fused = can_fuse && !p->resident && row_bytes >= BN_FUSE_MIN_ROW_BYTES &&
               share <= BN_FUSE_MAX_SHARE_BYTES && p->row_groups >= p->nthreads;
    if (can_fuse && force_fused >= 0) p->fused = force_fused;
    return BN_OK;
}
