/* When the kernels use the thread team (torch's OpenMP threads), and how a block of a few rows shares it. */
#ifndef DSV3_TEAM_H
#define DSV3_TEAM_H
#include <omp.h>

/* A team pays for one product only when one thread would take well beyond its start and barrier: 256K
 * multiply-adds (a 256 KiB int8 weight) take a core ~5 us. Smaller products (a tiny model's, an MTP draft's)
 * stay on the calling thread: on a shared 2-vCPU VM the barrier waited for a descheduled sibling, and the team
 * made a 2-token verify of the default model cost 1.3x a 1-token step instead of 1.15x (min of 60 blocks). */
#define DSV3_TEAM_WORK 262144L

/* Whether a block (an MLA or MoE block) over t > 1 rows gives each thread its own rows, the whole block for them,
 * instead of running its products one after the other on one thread: row_work, the largest product (or pass of
 * products) a single row makes, is below DSV3_TEAM_WORK, so no product of the block would use the team. Each row's
 * sums are those it gets among the others (the kernels sum per row), and the block pays one team entry instead of
 * running its rows one after the other: a 2-token MTP verification of the default model then costs close to one
 * token's step. Products big enough for the team keep splitting each product's weight between the threads, so a
 * memory-bound weight is still read once for all rows. */
static inline int dsv3_split_rows(long t, long row_work) {
    return t > 1 && row_work < DSV3_TEAM_WORK && omp_get_max_threads() > 1;
}

/* Thread id's share [*r0, *r1) of n rows, out of `threads`. */
static inline void dsv3_share(long n, long id, long threads, long *r0, long *r1) {
    *r0 = n * id / threads;
    *r1 = n * (id + 1) / threads;
}

#endif
