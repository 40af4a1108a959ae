/* Three measurements of how the host runs a process's first two threads right now (bench/host_probe.py). */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RELAX() _mm_pause()
#else
#define RELAX() ((void)0)
#endif

/* Nanoseconds per round trip of one cache line handed back and forth between threads 0 and 1: ~30 ns between the two
 * hyperthreads of a core, ~60 ns between cores that share an L3, 300 ns and more across core complexes. */
double host_pingpong_ns(long rounds) {
    static volatile long turn __attribute__((aligned(128)));
    double ns = 0.0;
    turn = 0;
    #pragma omp parallel num_threads(2)
    {
        const long me = omp_get_thread_num();
        #pragma omp barrier
        const double t0 = omp_get_wtime();
        for (long i = 0; i < rounds; i++) {
            while (turn != 2 * i + me)
                RELAX();
            turn = 2 * i + me + 1;
        }
        if (me == 0)
            ns = (omp_get_wtime() - t0) * 1e9 / (double)rounds;
    }
    return ns;
}

/* Seconds of `n` rounds of eight independent multiply-add chains, all in registers. */
static double compute(long n) {
    double v[8] = { 1, 2, 3, 4, 5, 6, 7, 8 };
    const double t0 = omp_get_wtime();
    for (long i = 0; i < n; i++)
        for (int j = 0; j < 8; j++)
            v[j] = v[j] * 0.999999 + 0.5;
    const double t = omp_get_wtime() - t0;
    volatile double sink = v[0] + v[7];
    (void)sink;
    return t;
}

/* out[0], out[1]: threads 0 and 1's seconds for `compute(n)` run at once; out[2]: thread 0's alone. Where a thread's
 * time at once exceeds the lone one, its core did other work too (its sibling hyperthread, another guest). */
void host_compute_seconds(long n, double *out) {
    #pragma omp parallel num_threads(2)
    {
        #pragma omp barrier
        out[omp_get_thread_num()] = compute(n);
    }
    out[2] = compute(n);
}

#define STREAM_BYTES (4L << 20) /* per thread: beyond a core's L2, within the L3 */

/* Seconds of `passes` sums over buf, one 64-byte line at a time. */
static double stream(const long *buf, int passes) {
    long sum = 0;
    const double t0 = omp_get_wtime();
    for (int p = 0; p < passes; p++)
        for (long i = 0; i < STREAM_BYTES / (long)sizeof(long); i += 8)
            sum += buf[i];
    const double t = omp_get_wtime() - t0;
    volatile long sink = sum;
    (void)sink;
    return t;
}

/* As host_compute_seconds for reading a buffer of each thread's own (STREAM_BYTES) `passes` times: a thread slower
 * beside the other shares the way to memory with it, or with another guest. 0 where the buffers do not allocate. */
void host_stream_seconds(int passes, double *out) {
    static long *bufs[2];
    for (int i = 0; i < 2; i++)
        if (!bufs[i] && (bufs[i] = malloc(STREAM_BYTES)))
            memset(bufs[i], 1, STREAM_BYTES);
    out[0] = out[1] = out[2] = 0.0;
    if (!bufs[0] || !bufs[1])
        return;
    #pragma omp parallel num_threads(2)
    {
        const int me = omp_get_thread_num();
        stream(bufs[me], 1);  /* into this core's caches */
        #pragma omp barrier
        out[me] = stream(bufs[me], passes);
    }
    out[2] = stream(bufs[0], passes);
}
