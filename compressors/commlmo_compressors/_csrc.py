r"""C source of the optional kernels (built and loaded by :mod:`commlmo_compressors._native`).

One translation unit, plain C11 + OpenMP, with AVX2/AVX-512 paths where the
compiler enables them (``-march=native``) and portable loops otherwise.  Each
exported function has an eager torch twin in its calling module; the tests
compare the two bit for bit (or to float rounding, for the matrix products).

* signs: ``pack_signs_f32``, ``pack_signs_16``, ``add_signs_f32`` (:mod:`.bits`);
* ``abs_sum_f32`` (scaled sign, :mod:`.sign`);
* ``natural_f32``, ``natural_decode_f32`` (:mod:`.natural`);
* ``topk_abs_f32`` (:mod:`.topk`);
* ``xq_f32``, ``xtp_f32``, ``xq_xtp_f32`` (PowerSGD's skinny products, :mod:`.rankk`);
* ``vote_words_i64`` (the bit-sliced majority vote, ``commlmo_aggregators.vote``).
"""

SOURCE = r"""#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <stdint.h>
#include <string.h>

/* lowbias32 (C. Wellons' hash-prospector), both multipliers < 2^31 so the eager
   torch twin can use int64 arithmetic without overflow */
static inline uint32_t mix32(uint32_t h) {
    h ^= h >> 16; h *= 0x21f0aaadu; h ^= h >> 15; h *= 0x735a2d97u; h ^= h >> 15; return h;
}
#ifdef __AVX2__
static inline __m256i mix32v(__m256i h) {
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x21f0aaad));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x735a2d97));
    return _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
}
#endif
/* 32 random bits for entry idx under key (k1, k2): a counter-based generator */
static inline uint32_t counter_hash(int64_t idx, uint32_t k1, uint32_t k2) {
    return mix32(mix32((uint32_t)idx ^ k1) + k2);
}

/* bit for exact zeros: mode 1 -> 0 (positive), mode 2 -> top bit of the counter hash */
static inline uint32_t zero_bits(uint32_t b, uint32_t zmask, int64_t base, int mode, uint32_t k1, uint32_t k2) {
    b &= ~zmask;
    if (mode == 2)
        for (int j = 0; j < 8; j++)
            if ((zmask >> j) & 1u) b |= (counter_hash(base + j, k1, k2) >> 31) << j;
    return b;
}

/* sign, zero and non-finite masks of 8 float32 bit patterns */
static inline void masks8(const uint32_t* w, uint32_t* b, uint32_t* z, uint32_t* f) {
#ifdef __AVX2__
    __m256i v = _mm256_loadu_si256((const __m256i*)w);
    __m256i m = _mm256_and_si256(v, _mm256_set1_epi32(0x7fffffff));
    *b = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(v));
    *z = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(m, _mm256_setzero_si256())));
    *f = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(m, _mm256_set1_epi32(0x7f7fffff))));
#else
    uint32_t bb = 0, zz = 0, ff = 0;
    for (int j = 0; j < 8; j++) {
        uint32_t m = w[j] & 0x7fffffffu;
        bb |= (w[j] >> 31) << j; zz |= (uint32_t)(m == 0) << j; ff |= (uint32_t)(m >= 0x7f800000u) << j;
    }
    *b = bb; *z = zz; *f = ff;
#endif
}

/* out[i] bit j = sign bit of x[8i+j] (little-endian within the byte), zeros per mode;
   *zeros = number of exact zeros; returns the number of non-finite entries */
int64_t pack_signs_f32(const uint32_t* restrict x, int64_t n, uint8_t* restrict out,
                       int mode, uint32_t k1, uint32_t k2, int64_t* zeros, int nt) {
    int64_t nb = n / 8, bad = 0, nz = 0;
    #pragma omp parallel for num_threads(nt) reduction(+:bad, nz) schedule(static)
    for (int64_t i = 0; i < nb; i++) {
        uint32_t b, z, f;
        masks8(x + 8 * i, &b, &z, &f);
        if (z) { b = zero_bits(b, z, 8 * i, mode, k1, k2); nz += __builtin_popcount(z); }
        out[i] = (uint8_t)b; bad += __builtin_popcount(f);
    }
    if (n % 8) {
        uint32_t w[8] = {1, 1, 1, 1, 1, 1, 1, 1}, b, z, f;  /* pad with a tiny positive float */
        memcpy(w, x + 8 * nb, (size_t)(n % 8) * 4);
        masks8(w, &b, &z, &f);
        if (z) { b = zero_bits(b, z, 8 * nb, mode, k1, k2); nz += __builtin_popcount(z); }
        out[nb] = (uint8_t)b; bad += __builtin_popcount(f);
    }
    *zeros = nz;
    return bad;
}

/* the same for 16-bit floats; inf = bit pattern of +inf (0x7f80 bfloat16, 0x7c00 float16) */
int64_t pack_signs_16(const uint16_t* restrict x, int64_t n, uint8_t* restrict out, uint16_t inf,
                      int mode, uint32_t k1, uint32_t k2, int64_t* zeros, int nt) {
    int64_t nb = (n + 7) / 8, bad = 0, nz = 0;
    #pragma omp parallel for num_threads(nt) reduction(+:bad, nz) schedule(static)
    for (int64_t i = 0; i < nb; i++) {
        uint32_t b = 0, z = 0, s = 0;
        int64_t end = 8 * i + 8 < n ? 8 * i + 8 : n;
        for (int64_t q = 8 * i; q < end; q++) {
            uint32_t w = x[q], m = w & 0x7fffu;
            b |= (w >> 15) << (q - 8 * i); z |= (uint32_t)(m == 0) << (q - 8 * i); s += m >= inf;
        }
        if (z) { b = zero_bits(b, z, 8 * i, mode, k1, k2); nz += __builtin_popcount(z); }
        out[i] = (uint8_t)b; bad += s;
    }
    *zeros = nz;
    return bad;
}

/* t[8i+j] += bit ? -c : c  for nbytes whole bytes: the sign flip is an xor on c's sign bit */
void add_signs_f32(float* restrict t, const uint8_t* restrict p, int64_t nbytes, float c, int nt) {
    uint32_t cb; memcpy(&cb, &c, 4);
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < nbytes; i++) {
        uint32_t b = p[i];
        float* tt = t + 8 * i;
        for (int j = 0; j < 8; j++) {
            uint32_t v = cb ^ (((b >> j) & 1u) << 31);
            float f; memcpy(&f, &v, 4);
            tt[j] += f;
        }
    }
}

/* natural compression of 8 float32 bit patterns at entries base..base+7: codes and the sign byte */
static inline uint32_t natural8(const uint32_t* w, int64_t base, uint32_t k1, uint32_t k2, uint32_t maxcode,
                                uint8_t* code, uint32_t* bad) {
#ifdef __AVX2__
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i v = _mm256_loadu_si256((const __m256i*)w);
    __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int32_t)(uint32_t)base), iota);
    __m256i h = mix32v(_mm256_xor_si256(idx, _mm256_set1_epi32((int32_t)k1)));
    h = mix32v(_mm256_add_epi32(h, _mm256_set1_epi32((int32_t)k2)));
    __m256i u = _mm256_srli_epi32(h, 9);
    __m256i e = _mm256_and_si256(_mm256_srli_epi32(v, 23), _mm256_set1_epi32(0xff));
    __m256i m = _mm256_and_si256(v, _mm256_set1_epi32(0x7fffff));
    __m256i c = _mm256_sub_epi32(e, _mm256_cmpgt_epi32(m, u));          /* e + [u < m] */
    c = _mm256_min_epu32(c, _mm256_set1_epi32((int32_t)maxcode));
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    __m256i bytes = _mm256_shuffle_epi8(c, pick);
    uint64_t packed = (uint64_t)(uint32_t)_mm256_extract_epi32(bytes, 0)
                    | ((uint64_t)(uint32_t)_mm256_extract_epi32(bytes, 4) << 32);
    memcpy(code, &packed, 8);
    __m256i inf = _mm256_cmpeq_epi32(e, _mm256_set1_epi32(0xff));
    *bad += (uint32_t)__builtin_popcount((uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(inf)));
    return (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(v));
#else
    uint32_t b = 0;
    for (int j = 0; j < 8; j++) {
        uint32_t e = (w[j] >> 23) & 0xffu, m = w[j] & 0x7fffffu;
        uint32_t c = e + ((counter_hash(base + j, k1, k2) >> 9) < m);
        code[j] = (uint8_t)(c > maxcode ? maxcode : c);
        b |= (w[j] >> 31) << j; *bad += e == 0xffu;
    }
    return b;
#endif
}

/* natural compression of float32 bit patterns: code = exponent + [u < mantissa],
   u = 23 random bits from the counter hash keyed by (k1, k2); returns #non-finite */
int64_t natural_f32(const uint32_t* restrict x, int64_t n, uint32_t k1, uint32_t k2, uint32_t maxcode,
                    uint8_t* restrict code, uint8_t* restrict sgn, int nt) {
    int64_t nb = n / 8, bad = 0;
    #pragma omp parallel for num_threads(nt) reduction(+:bad) schedule(static)
    for (int64_t i = 0; i < nb; i++) {
        uint32_t b = 0;
        sgn[i] = (uint8_t)natural8(x + 8 * i, 8 * i, k1, k2, maxcode, code + 8 * i, &b);
        bad += b;
    }
    if (n % 8) {
        uint32_t w[8] = {0}, b = 0;
        uint8_t c[8];
        memcpy(w, x + 8 * nb, (size_t)(n % 8) * 4);
        sgn[nb] = (uint8_t)(natural8(w, 8 * nb, k1, k2, maxcode, c, &b) & ((1u << (n % 8)) - 1u));
        memcpy(code + 8 * nb, c, (size_t)(n % 8));
        bad += b;
    }
    return bad;
}

/* sum of |x| in double precision (the scale of scaled sign; float32 sums lose digits at 16 M) */
double abs_sum_f32(const float* restrict x, int64_t n, int nt) {
    double total = 0;
    #pragma omp parallel for num_threads(nt) reduction(+:total) schedule(static)
    for (int64_t c = 0; c < (n + 4095) / 4096; c++) {
        int64_t lo = c * 4096, hi = lo + 4096 < n ? lo + 4096 : n;
        float acc[16] = {0};  /* 16 lanes of at most 256 terms each: float is exact enough here */
        int64_t i = lo;
        for (; i + 16 <= hi; i += 16)
            for (int l = 0; l < 16; l++) acc[l] += x[i + l] < 0 ? -x[i + l] : x[i + l];
        double s = 0;
        for (int l = 0; l < 16; l++) s += acc[l];
        for (; i < hi; i++) s += x[i] < 0 ? -x[i] : x[i];
        total += s;
    }
    return total;
}

/* decoded natural compression: +-2^(code - 127) as float32 bits (code 0 is zero) */
void natural_decode_f32(const uint8_t* restrict code, const uint8_t* restrict sgn, int64_t n,
                        uint32_t* restrict out, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < (n + 7) / 8; i++) {
        uint32_t b = sgn[i];
        int64_t end = 8 * i + 8 < n ? 8 * i + 8 : n;
        for (int64_t q = 8 * i; q < end; q++) out[q] = ((uint32_t)code[q] << 23) | (((b >> (q - 8 * i)) & 1u) << 31);
    }
}

/* Exact top-k by magnitude above a threshold (a lower bound on the k-th largest |x|, from a
   sample).  Thread r scans the r-th of nt chunks and keeps (index, |x| bits) of entries with
   |x| >= t, at most cap of them, at cidx/ckey + r*cap; counts[r] = how many it found.  If no
   entry is NaN/Inf (*bad = 0), all counts fit and k are found, a radix select on the candidates
   finds the k-th largest and the k winners go to oidx/oval in index order (ties: lowest index).
   Returns the number of candidates. */
int64_t topk_abs_f32(const uint32_t* restrict x, int64_t n, float t, int64_t k,
                     int64_t* restrict cidx, uint32_t* restrict ckey, int64_t cap, int64_t* restrict counts,
                     int64_t* restrict oidx, uint32_t* restrict oval, int64_t* bad_out, int nt) {
    int64_t bad = 0;
    uint32_t tb; memcpy(&tb, &t, 4);
    #pragma omp parallel num_threads(nt) reduction(+:bad)
    {
#ifdef _OPENMP
        int r = omp_get_thread_num(), size = omp_get_num_threads();
#else
        int r = 0, size = 1;
#endif
        int64_t lo = n * r / size, hi = n * (r + 1) / size, c = 0, b = 0, i = lo;
        int64_t* oi = cidx + r * cap;
        uint32_t* ok = ckey + r * cap;
#ifdef __AVX2__
        const __m256i absmask = _mm256_set1_epi32(0x7fffffff), below = _mm256_set1_epi32((int32_t)tb - 1);
        const __m256i maxfin = _mm256_set1_epi32(0x7f7fffff);
        for (; i + 8 <= hi; i += 8) {
            __m256i a = _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(x + i)), absmask);
            uint32_t hit = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(a, below)));
            b += __builtin_popcount((uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(a, maxfin))));
            while (hit) {
                int j = __builtin_ctz(hit);
                hit &= hit - 1;
                if (c < cap) { oi[c] = i + j; ok[c] = x[i + j] & 0x7fffffffu; }
                c++;
            }
        }
#endif
        for (; i < hi; i++) {
            uint32_t a = x[i] & 0x7fffffffu;
            if (a >= tb) { if (c < cap) { oi[c] = i; ok[c] = a; } c++; }
            b += a >= 0x7f800000u;
        }
        counts[r] = c; bad += b;
        for (int q = size; r == 0 && q < nt; q++) counts[q] = 0;
    }
    *bad_out = bad;
    int64_t total = 0, fits = 1;
    for (int q = 0; q < nt; q++) { total += counts[q]; fits &= counts[q] <= cap; }
    if (bad || !fits || total < k) return total;
    int64_t c = 0;
    for (int q = 0; q < nt; q++) {  /* close the gaps between the threads' segments */
        memmove(cidx + c, cidx + q * cap, sizeof(int64_t) * (size_t)counts[q]);
        memmove(ckey + c, ckey + q * cap, sizeof(uint32_t) * (size_t)counts[q]);
        c += counts[q];
    }
    /* radix select, most significant byte first: key of the k-th largest and how many equal
       to it are still needed */
    uint32_t prefix = 0, mask = 0;
    int64_t need = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        int64_t hist[256] = {0};
        for (int64_t q = 0; q < c; q++)
            if ((ckey[q] & mask) == prefix) hist[(ckey[q] >> shift) & 255u]++;
        for (int d = 255; d >= 0; d--) {
            if (hist[d] >= need) { prefix |= (uint32_t)d << shift; break; }
            need -= hist[d];
        }
        mask |= 255u << shift;
    }
    int64_t o = 0;
    for (int64_t q = 0; q < c && o < k; q++) {
        uint32_t key = ckey[q];
        if (key > prefix || (key == prefix && need-- > 0)) { oidx[o] = cidx[q]; oval[o] = x[cidx[q]]; o++; }
    }
    return total;
}

/* Skinny products for PowerSGD: BLAS runs X (m x n) times an n x r matrix, r <= 16, at a
   fraction of memory speed here; these stay close to one read of X.  GCC vector types: 16
   floats, one zmm with AVX-512, two ymm with AVX2, scalar code elsewhere. */
typedef float v16f __attribute__((vector_size(64)));
static inline v16f ld16(const float* p) { v16f v; memcpy(&v, p, 64); return v; }
static inline void st16(float* p, v16f v) { memcpy(p, &v, 64); }
static inline float hsum16(v16f v) { float s = 0; for (int l = 0; l < 16; l++) s += v[l]; return s; }
#ifdef __AVX512F__
#define XQ_ROWS 4  /* 16 accumulators + 4 columns of Q + 1 row fit in 32 zmm registers */
#else
#define XQ_ROWS 2
#endif

/* P rows [lo, hi) (hi - lo <= XQ_ROWS) of X Qt^T: XQ_ROWS rows x 4 columns of Q per sweep, so
   each row is read once and each Q column once per XQ_ROWS rows */
static void xq_rows(const float* restrict X, int64_t lo, int64_t hi, int64_t n, const float* restrict Qt,
                    int r, float* restrict P) {
    const float* x[XQ_ROWS];
    for (int t = 0; t < XQ_ROWS; t++) x[t] = X + (lo + t < hi ? lo + t : lo) * n;
    for (int k0 = 0; k0 < r; k0 += 4) {
        const float* q[4];
        for (int k = 0; k < 4; k++) q[k] = Qt + (int64_t)(k0 + k < r ? k0 + k : k0) * n;
        v16f a[XQ_ROWS][4];
        memset(a, 0, sizeof a);
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) {
            v16f c0 = ld16(q[0] + j), c1 = ld16(q[1] + j), c2 = ld16(q[2] + j), c3 = ld16(q[3] + j);
            for (int t = 0; t < XQ_ROWS; t++) {
                v16f u = ld16(x[t] + j);
                a[t][0] += u * c0; a[t][1] += u * c1; a[t][2] += u * c2; a[t][3] += u * c3;
            }
        }
        for (int t = 0; t < XQ_ROWS && lo + t < hi; t++)
            for (int k = 0; k < 4 && k0 + k < r; k++) {
                float s = hsum16(a[t][k]);
                for (int64_t jj = j; jj < n; jj++) s += x[t][jj] * q[k][jj];
                P[(lo + t) * r + k0 + k] = s;
            }
    }
}

/* P = X Qt^T (Qt: r x n, P: m x r) */
void xq_f32(const float* restrict X, int64_t m, int64_t n, const float* restrict Qt, int r,
            float* restrict P, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < m; i += XQ_ROWS) xq_rows(X, i, i + XQ_ROWS < m ? i + XQ_ROWS : m, n, Qt, r, P);
}

/* acc (r x n) += (X[lo:hi]^T P[lo:hi])^T, eight rows at a time per load/store of acc */
static void xtp_rows(const float* restrict X, int64_t lo, int64_t hi, int64_t n, const float* restrict P,
                     int r, float* restrict acc) {
    int64_t vl = n / 16 * 16, i = lo;
    for (; i + 8 <= hi; i += 8) {
        const float* x = X + i * n;
        const float* p = P + i * r;
        for (int64_t l = 0; l < vl; l += 16) {
            v16f u[8];
            for (int s = 0; s < 8; s++) u[s] = ld16(x + s * n + l);
            for (int k = 0; k < r; k++) {
                v16f v = ld16(acc + (int64_t)k * n + l);
                for (int s = 0; s < 8; s++) v += u[s] * p[s * r + k];
                st16(acc + (int64_t)k * n + l, v);
            }
        }
        for (int64_t l = vl; l < n; l++)
            for (int k = 0; k < r; k++)
                for (int s = 0; s < 8; s++) acc[(int64_t)k * n + l] += x[s * n + l] * p[s * r + k];
    }
    for (; i < hi; i++)
        for (int k = 0; k < r; k++)
            for (int64_t l = 0; l < n; l++) acc[(int64_t)k * n + l] += X[i * n + l] * P[i * r + k];
}

/* parts[t] = (X_t^T P_t)^T for thread t's share of the rows (parts: nt x r x n, zeroed by the
   caller; the sum over t is X^T P) */
void xtp_f32(const float* restrict X, int64_t m, int64_t n, const float* restrict P, int r,
             float* restrict parts, int nt) {
    #pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        int t = omp_get_thread_num(), size = omp_get_num_threads();
#else
        int t = 0, size = 1;
#endif
        xtp_rows(X, m * t / size, m * (t + 1) / size, n, P, r, parts + (int64_t)t * r * n);
    }
}

/* One pass for PowerSGD's tall case: P = X Qt^T and parts[t] = (X_t^T P_t)^T, i.e. X^T X Q,
   eight rows at a time -- the rows come from memory for P, then from cache for X^T P.
   Exact math with the QR of P taken afterwards: X^T orth(P) = (X^T P) R^-1. */
void xq_xtp_f32(const float* restrict X, int64_t m, int64_t n, const float* restrict Qt, int r,
                float* restrict P, float* restrict parts, int nt) {
    #pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        int t = omp_get_thread_num(), size = omp_get_num_threads();
#else
        int t = 0, size = 1;
#endif
        int64_t lo = m * t / size, hi = m * (t + 1) / size;
        for (int64_t i0 = lo; i0 < hi; i0 += 8) {
            int64_t rows = hi - i0 < 8 ? hi - i0 : 8;
            for (int64_t s = 0; s < rows; s += XQ_ROWS) {
                int64_t e = s + XQ_ROWS < rows ? s + XQ_ROWS : rows;
                xq_rows(X, i0 + s, i0 + e, n, Qt, r, P);
            }
            xtp_rows(X, i0, i0 + rows, n, P, r, parts + (int64_t)t * r * n);
        }
    }
}
/* Bit-sliced majority vote: rows is m x w words (row-major); for every bit position, out = 1 where more
   than m/2 rows have a 1.  A ripple-carry counter kept as bit planes counts the ones of 64 words at
   once (planes[k][j] = bit k of the count), then a comparison against m/2 from the top plane down.
   Ties (even m, exactly m/2 ones): with ties given, the tie mask goes there and out has 0 at ties;
   otherwise out takes tie's bit (tie must then be given).  Same operations, in the same order, as the torch twin. */
#define VOTE_BLOCK 64
void vote_words_i64(const uint64_t* restrict rows, int64_t m, int64_t w, const uint64_t* restrict tie,
                    uint64_t* restrict out, uint64_t* restrict ties, int nt) {
    int np = 0;
    while ((m >> np) != 0) np++;  /* bit length of m: planes enough to count to m */
    uint64_t half = (uint64_t)m / 2;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b0 = 0; b0 < w; b0 += VOTE_BLOCK) {
        int64_t bn = w - b0 < VOTE_BLOCK ? w - b0 : VOTE_BLOCK;
        uint64_t planes[64][VOTE_BLOCK], carry[VOTE_BLOCK];
        for (int k = 0; k < np; k++) memset(planes[k], 0, sizeof planes[k]);
        for (int64_t r = 0; r < m; r++) {
            memcpy(carry, rows + r * w + b0, (size_t)bn * 8);
            for (int k = 0; k < np; k++)
                for (int64_t j = 0; j < bn; j++) {
                    uint64_t p = planes[k][j];
                    planes[k][j] = p ^ carry[j];
                    carry[j] = p & carry[j];
                }
        }
        for (int64_t j = 0; j < bn; j++) {
            uint64_t gt = 0, eq = ~(uint64_t)0;
            for (int k = np - 1; k >= 0; k--) {
                uint64_t c = planes[k][j];
                if ((half >> k) & 1u) eq &= c;
                else { gt |= eq & c; eq &= ~c; }
            }
            if (m % 2 == 0) {
                if (ties) ties[b0 + j] = eq;
                else gt |= eq & tie[b0 + j];
            }
            out[b0 + j] = gt;
        }
    }
}
"""
