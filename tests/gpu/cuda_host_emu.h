/*
 * Run bnfast's CUDA kernels (csrc/cuda) on the CPU, for tests without a GPU
 * (tests/gpu/test_cuda_launch.py): the CUDA keywords become plain C++, each block of a
 * launch runs on blockDim OS threads, __shared__ arrays are static (blocks run one after
 * another) and __syncthreads() is a std::barrier of the block's threads.  So the kernels'
 * own code -- shared-memory trees, barriers, the two-pass decision, the merges, the
 * fixup, every index -- executes as written; only the GPU's memory system and scheduling
 * are not reproduced.  Built with -ffp-contract=off like the NVRTC module's -fmad=false.
 */
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

struct emu_dim3 {
    unsigned x = 1, y = 1, z = 1;
};
thread_local emu_dim3 threadIdx, blockIdx;
static emu_dim3 blockDim, gridDim;
static std::barrier<> *emu_barrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__ __restrict

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

inline double __longlong_as_double(long long v)
{
    double d;
    std::memcpy(&d, &v, sizeof d);
    return d;
}

inline long long __double_as_longlong(double d)
{
    long long v;
    std::memcpy(&v, &d, sizeof v);
    return v;
}

inline float __int_as_float(int v)
{
    float f;
    std::memcpy(&f, &v, sizeof f);
    return f;
}

inline int __float_as_int(float f)
{
    int v;
    std::memcpy(&v, &f, sizeof v);
    return v;
}

inline double __dsqrt_rn(double v) { return std::sqrt(v); }


/* Run body() as a launch of `grid` blocks of (bx, by, bz) threads: the same OS threads take
 * the blocks one after another, all of a block's threads finishing it (a barrier) before
 * the next one starts, so the static __shared__ arrays serve one block at a time.  The
 * kernels' barriers are uniform within a block, as CUDA requires. */
template <class F>
void emu_launch(unsigned grid, unsigned bx, unsigned by, unsigned bz, F body)
{
    gridDim = {grid, 1, 1};
    blockDim = {bx, by, bz};
    const unsigned nt = bx * by * bz;
    std::barrier<> bar(nt);
    emu_barrier = &bar;
    std::vector<std::thread> threads;
    threads.reserve(nt);
    for (unsigned t = 0; t < nt; t++)
        threads.emplace_back([&, t] {
            threadIdx = {t % bx, (t / bx) % by, t / (bx * by)};
            for (unsigned b = 0; b < grid; b++) {
                blockIdx = {b, 0, 0};
                body();
                bar.arrive_and_wait();       /* the block is done in every thread */
            }
        });
    for (auto &th : threads) th.join();
}
