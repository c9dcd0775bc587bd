// All-reduce between tensor-parallel ranks on one host, through a shared memory region.
//
// gloo's all-reduce took ~1 ms per call for a decode step's few KB here (loopback sockets and
// thread hand-offs), against a step of a few ms: two all-reduces per layer made tensor
// parallelism on the CPU several times slower than one process. Ranks on one host can instead
// meet in memory: each writes its partial sum into its own slot, publishes a generation
// counter, waits for every peer's counter to reach it, then sums all slots itself.
//
// Region layout: `size` counters, one per 64-byte line, then two banks of `size` slots of
// `slot_bytes` each. Every collective (all-reduce here, broadcast in engine/distributed.py) is
// one generation g, uses bank g % 2, and before writing into it waits until every rank has
// published g - 1: a rank publishes g - 1 only after it has finished reading g - 2, the last
// generation to use the same bank. Every rank adds the slots in rank order in fp32 and rounds
// once, so all ranks hold bit-identical results.

#include <stdint.h>
#include <string.h>
#include <time.h>
#include <sched.h>

#define LINE 64

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = { f };
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);  // NaN stays NaN
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);  // round to nearest even
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline volatile int64_t *counter(char *region, int64_t rank) {
    return (volatile int64_t *)(region + rank * LINE);
}

// Wait until rank `who` (every rank if -1) has published `generation`. Returns 0, or -1 if a
// peer did not arrive within timeout_s (it has most likely died).
int pilot_shm_wait(void *region_ptr, int64_t size, int64_t who, int64_t generation, double timeout_s) {
    char *region = (char *)region_ptr;
    for (int64_t r = who < 0 ? 0 : who; r < (who < 0 ? size : who + 1); r++) {
        int64_t spins = 0;
        double start = 0.0;
        while (__atomic_load_n(counter(region, r), __ATOMIC_ACQUIRE) < generation) {
            if (++spins == 4096) start = now_s();
            if (spins > 4096) {
                sched_yield();  // more ranks than free cores: let the peer run
                if ((spins & 1023) == 0 && now_s() - start > timeout_s) return -1;
            }
        }
    }
    return 0;
}

void pilot_shm_publish(void *region, int64_t rank, int64_t generation) {
    __atomic_store_n(counter((char *)region, rank), generation, __ATOMIC_RELEASE);
}

// x: n elements (fp32, or bf16 when is_bf16), summed over ranks in place. `generation` is this
// call's first generation number; the call uses one per slot-sized chunk and returns the next.
int64_t pilot_shm_allreduce(void *x, int64_t n, int is_bf16, void *region_ptr, int64_t rank,
                            int64_t size, int64_t slot_bytes, int64_t generation, double timeout_s) {
    char *region = (char *)region_ptr;
    char *slots = region + ((size * LINE + 4095) / 4096) * 4096;
    int64_t elem = is_bf16 ? 2 : 4;
    int64_t per_chunk = slot_bytes / elem;
    for (int64_t first = 0; first < n; first += per_chunk, generation++) {
        int64_t count = n - first < per_chunk ? n - first : per_chunk;
        char *bank = slots + (generation % 2) * size * slot_bytes;
        char *mine = (char *)x + first * elem;
        if (pilot_shm_wait(region, size, -1, generation - 1, timeout_s) != 0) return -1;
        memcpy(bank + rank * slot_bytes, mine, (size_t)(count * elem));
        pilot_shm_publish(region, rank, generation);
        if (pilot_shm_wait(region, size, -1, generation, timeout_s) != 0) return -1;
        if (is_bf16) {
            uint16_t *out = (uint16_t *)mine;
            for (int64_t i = 0; i < count; i++) {
                float acc = 0.0f;
                for (int64_t r = 0; r < size; r++)
                    acc += bf16_to_f32(((const uint16_t *)(bank + r * slot_bytes))[i]);
                out[i] = f32_to_bf16(acc);
            }
        } else {
            float *out = (float *)mine;
            for (int64_t i = 0; i < count; i++) {
                float acc = 0.0f;
                for (int64_t r = 0; r < size; r++) acc += ((const float *)(bank + r * slot_bytes))[i];
                out[i] = acc;
            }
        }
    }
    return generation;
}
