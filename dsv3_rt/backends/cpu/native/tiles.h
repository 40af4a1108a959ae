/* The shape both tiled weight formats share (int8_tiles.c, int4_tiles.c). */
#ifndef DSV3_TILES_H
#define DSV3_TILES_H

/* Weight rows per block: a product's unit of work, on any thread. An int8 matrix's last block may hold fewer (n % 16,
 * see int8_tiles.c's tail_block); int4 matrices are whole blocks. */
#define DSV3_BLOCK_ROWS 16

#endif
