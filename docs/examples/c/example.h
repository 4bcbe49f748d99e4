/* What producer.c sends and consumer.c checks: frames of HEIGHT x WIDTH uint8 whose bytes
 * are a function of the frame's index, so that a frame that is torn, stale or out of order
 * does not pass. The Python tests (tests/python/test_c_library.py) use the same formula. */
#ifndef FRAMESHM_EXAMPLE_H
#define FRAMESHM_EXAMPLE_H

#include <stddef.h>
#include <stdint.h>

#define EXAMPLE_HEIGHT 48
#define EXAMPLE_WIDTH 64
#define EXAMPLE_BYTES ((size_t)EXAMPLE_HEIGHT * EXAMPLE_WIDTH)

static inline uint8_t example_byte(uint64_t frame, size_t i)
{
    return (uint8_t)(frame * 7 + i * 13 + (i >> 8));
}

#endif
