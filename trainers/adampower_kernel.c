/*
 * Fused AdamW step on the GradPower gradient phi_p(g) = sign(g) * |g|**p, for
 * contiguous float32 tensors on the CPU.
 *
 * trainers/power_kernel.py compiles this file with the system C compiler
 * (-O3 -march=native -fopenmp) into a shared library and calls it through
 * ctypes. It includes no torch headers. Where the compiler targets AVX-512 the
 * loops use its intrinsics, otherwise they are plain C that the compiler
 * vectorizes. The build must not use -ffast-math, because the portable
 * version rounds with an add-and-subtract trick that needs IEEE addition.
 *
 * |g|**p is computed as 2**(p * log2|g|) in float32 with two polynomials
 * fitted for this file by weighted least squares on 4000 Chebyshev nodes,
 * refined toward minimax by Lawson iterations, with coefficients rounded to
 * float32:
 *   - log2(m) for m in [0.75, 1.5), as f times a polynomial of degree 8 in
 *     f = m - 1, maximum absolute error 7.4e-9 in float64;
 *   - 2**r for r in [-0.52, 0.52], degree 6, maximum relative error 2.4e-9.
 * p * log2|g| is split into p * e for the exponent e and p * log2(m), so that
 * the fraction of a sum of magnitude up to about 150 keeps float32 precision
 * (see power_signed). tests/trainers/test_power_kernel.py measures the
 * maximum relative error of |g|**p against float64.
 *
 * NOTE: the portable version runs several times more instructions per element
 * than the AVX-512 one. benchmarks/power_step.py has timed only the AVX-512
 * build.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Elements per work item. A multiple of every vector width, so that only the
 * last chunk of a tensor has a remainder. 16384 float32 elements are 64 KiB
 * per array. */
#define CHUNK_NUMEL 16384

/* Largest power the kernel takes. For p below 2**22 / 150 every |p * e| stays
 * below 2**22, where float32 still represents the fraction of p * log2|g|. */
#define MAX_POWER 1024.0

/* log2(1 + f) = f * (c[0] + c[1] * f + ... + c[8] * f**8) for the array c. */
#define LOG2_DEGREE 8
static const double LOG2_COEFFICIENTS[LOG2_DEGREE + 1] = {
    1.442695022e+00, -7.213494182e-01, 4.809019566e-01,
    -3.605296910e-01, 2.881631553e-01,  -2.433645427e-01,
    2.171212286e-01, -1.718991399e-01, 7.444588840e-02,
};

/* 2**r = EXP2_C0 + EXP2_C1 * r + ... + EXP2_C6 * r**6. */
#define EXP2_C0 1.0f
#define EXP2_C1 6.931472421e-01f
#define EXP2_C2 2.402264625e-01f
#define EXP2_C3 5.550314859e-02f
#define EXP2_C4 9.618549608e-03f
#define EXP2_C5 1.340531628e-03f
#define EXP2_C6 1.534110634e-04f

/* Constants of one power p. */
struct power_constants {
    /* p times the log2 coefficients, so that the polynomial yields
     * p * log2(m) directly. */
    float scaled_log2[LOG2_DEGREE + 1];
    float power_high; /* p rounded to 12 significant bits */
    float power_low;  /* p - power_high, rounded to float32 */
};

/* Coefficients of one tensor's AdamW update. */
struct adamw_constants {
    float decay; /* 1 - lr * weight_decay */
    float one_minus_beta1;
    float beta2;
    float one_minus_beta2;
    float inverse_bias_correction2_sqrt; /* 1 / sqrt(1 - beta2**step) */
    float eps;
    float step_size; /* lr / (1 - beta1**step) */
};

static struct power_constants make_power_constants(double power) {
    struct power_constants constants;
    int exponent;
    /* Keep the top 12 bits of the significand, so that power_high * e is exact
     * in float32 for any integer |e| < 2**12. */
    double significand = frexp(power, &exponent);
    double high = ldexp(floor(ldexp(significand, 12)), exponent - 12);
    for (int k = 0; k <= LOG2_DEGREE; k++) {
        constants.scaled_log2[k] = (float)(power * LOG2_COEFFICIENTS[k]);
    }
    constants.power_high = (float)high;
    constants.power_low = (float)(power - high);
    return constants;
}

static struct adamw_constants make_adamw_constants(double step, double lr,
                                                   double beta1, double beta2,
                                                   double eps,
                                                   double weight_decay) {
    struct adamw_constants constants;
    double bias_correction1 = 1.0 - pow(beta1, step);
    double bias_correction2 = 1.0 - pow(beta2, step);
    constants.decay = (float)(1.0 - lr * weight_decay);
    constants.one_minus_beta1 = (float)(1.0 - beta1);
    constants.beta2 = (float)beta2;
    constants.one_minus_beta2 = (float)(1.0 - beta2);
    constants.inverse_bias_correction2_sqrt = (float)(1.0 / sqrt(bias_correction2));
    constants.eps = (float)eps;
    constants.step_size = (float)(lr / bias_correction1);
    return constants;
}

#if defined(__AVX512F__)

#include <immintrin.h>

#define LANES 16

/* Return the name of the compiled implementation. */
const char *gradpower_kernel_variant(void) { return "avx512"; }

/*
 * Return sign(g) * |g|**p for 16 lanes. Zeros and infinities give themselves
 * and NaN stays NaN, like exp(p * log|g|) * sign(g) in float32, except that
 * -0.0 stays -0.0. Results beyond float32's range become inf, or round to a
 * subnormal or zero. Requires 0 < p <= MAX_POWER.
 */
static inline __m512 power_signed(__m512 g, const struct power_constants *c) {
    /* |g| = 2**e * m with m in [0.75, 1.5). getexp and getmant ignore the sign
     * and normalize subnormal inputs. getexp returns the exponent for a
     * mantissa in [1, 2), one less than e where m < 1. */
    __m512 e = _mm512_getexp_ps(g);
    __m512 m = _mm512_getmant_ps(g, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_zero);
    __mmask16 halved = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.0f), _CMP_LT_OQ);
    e = _mm512_mask_add_ps(e, halved, e, _mm512_set1_ps(1.0f));

    __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
    __m512 q = _mm512_set1_ps(c->scaled_log2[8]);
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(c->scaled_log2[7]));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(c->scaled_log2[6]));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(c->scaled_log2[5]));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(c->scaled_log2[4]));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(c->scaled_log2[3]));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(c->scaled_log2[2]));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(c->scaled_log2[1]));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(c->scaled_log2[0]));
    __m512 mantissa_part = _mm512_mul_ps(f, q); /* p * log2(m) */

    /* p * log2|g| = power_high * e + (power_low * e + p * log2(m)). The
     * product power_high * e is exact, so n, the integer nearest to the sum,
     * is subtracted from it without rounding, and the fraction r keeps float32
     * precision even where |p * e| is about 150. */
    __m512 power_high = _mm512_set1_ps(c->power_high);
    __m512 rest = _mm512_fmadd_ps(_mm512_set1_ps(c->power_low), e, mantissa_part);
    __m512 y = _mm512_fmadd_ps(power_high, e, rest);
    __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_add_ps(_mm512_fmsub_ps(power_high, e, n), rest);

    __m512 power_of_r = _mm512_set1_ps(EXP2_C6);
    power_of_r = _mm512_fmadd_ps(power_of_r, r, _mm512_set1_ps(EXP2_C5));
    power_of_r = _mm512_fmadd_ps(power_of_r, r, _mm512_set1_ps(EXP2_C4));
    power_of_r = _mm512_fmadd_ps(power_of_r, r, _mm512_set1_ps(EXP2_C3));
    power_of_r = _mm512_fmadd_ps(power_of_r, r, _mm512_set1_ps(EXP2_C2));
    power_of_r = _mm512_fmadd_ps(power_of_r, r, _mm512_set1_ps(EXP2_C1));
    power_of_r = _mm512_fmadd_ps(power_of_r, r, _mm512_set1_ps(EXP2_C0));
    /* scalef multiplies by 2**n with one rounding, to inf or a subnormal
     * where needed. */
    __m512 result = _mm512_scalef_ps(power_of_r, n);

    /* Zeros, infinities and NaN give themselves (fpclass categories QNaN, +0,
     * -0, +inf, -inf and SNaN). */
    __mmask16 special = _mm512_fpclass_ps_mask(g, 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x80);
    result = _mm512_mask_mov_ps(result, special, g);
    /* Bitwise select (truth table 0xca): where the first operand has a 1 take
     * result, else g, so the magnitude comes from result and the sign from g. */
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(
        _mm512_set1_epi32(0x7fffffff), _mm512_castps_si512(result),
        _mm512_castps_si512(g), 0xca));
}

/* Constants of the AdamW update, broadcast to 16 lanes. */
struct adamw_vectors {
    __m512 decay;
    __m512 one_minus_beta1;
    __m512 beta2;
    __m512 one_minus_beta2;
    __m512 inverse_bias_correction2_sqrt;
    __m512 eps;
    __m512 step_size;
};

/* Update the lanes of mask at index i of one tensor. Full vectors pass the
 * constant mask 0xffff, which GCC 12 folds into unmasked loads and stores. On
 * the AMD EPYC (Zen 4) of docs/benchmarks.md a loop with masked loads and
 * stores on every vector took three times as long. */
static inline void adamw_vector(float *param, float *grad, float *exp_avg,
                                float *exp_avg_sq, int64_t i, __mmask16 mask,
                                int write_powered_grad,
                                const struct power_constants *power,
                                const struct adamw_vectors *adamw) {
    __m512 phi = power_signed(_mm512_maskz_loadu_ps(mask, grad + i), power);
    __m512 m = _mm512_maskz_loadu_ps(mask, exp_avg + i);
    __m512 v = _mm512_maskz_loadu_ps(mask, exp_avg_sq + i);
    __m512 p = _mm512_maskz_loadu_ps(mask, param + i);
    m = _mm512_fmadd_ps(adamw->one_minus_beta1, _mm512_sub_ps(phi, m), m);
    v = _mm512_fmadd_ps(_mm512_mul_ps(adamw->one_minus_beta2, phi), phi,
                        _mm512_mul_ps(adamw->beta2, v));
    __m512 denom = _mm512_fmadd_ps(_mm512_sqrt_ps(v),
                                   adamw->inverse_bias_correction2_sqrt, adamw->eps);
    p = _mm512_fnmadd_ps(adamw->step_size, _mm512_div_ps(m, denom),
                         _mm512_mul_ps(p, adamw->decay));
    _mm512_mask_storeu_ps(param + i, mask, p);
    _mm512_mask_storeu_ps(exp_avg + i, mask, m);
    _mm512_mask_storeu_ps(exp_avg_sq + i, mask, v);
    if (write_powered_grad) {
        _mm512_mask_storeu_ps(grad + i, mask, phi);
    }
}

/*
 * Update count elements of one tensor. With write_powered_grad set, grad is
 * overwritten with phi_p(grad), else it is only read.
 */
static void adamw_range(float *param, float *grad, float *exp_avg,
                        float *exp_avg_sq, int64_t count, int write_powered_grad,
                        const struct power_constants *power,
                        const struct adamw_constants *adamw) {
    /* Local copies, so that the stores through the tensor pointers cannot
     * alias the constants. */
    const struct power_constants power_copy = *power;
    const struct adamw_vectors vectors = {
        _mm512_set1_ps(adamw->decay),
        _mm512_set1_ps(adamw->one_minus_beta1),
        _mm512_set1_ps(adamw->beta2),
        _mm512_set1_ps(adamw->one_minus_beta2),
        _mm512_set1_ps(adamw->inverse_bias_correction2_sqrt),
        _mm512_set1_ps(adamw->eps),
        _mm512_set1_ps(adamw->step_size),
    };
    int64_t i = 0;
    for (; i + LANES <= count; i += LANES) {
        adamw_vector(param, grad, exp_avg, exp_avg_sq, i, (__mmask16)0xffff,
                     write_powered_grad, &power_copy, &vectors);
    }
    if (i < count) {
        __mmask16 tail = (__mmask16)((1u << (count - i)) - 1u);
        adamw_vector(param, grad, exp_avg, exp_avg_sq, i, tail, write_powered_grad,
                     &power_copy, &vectors);
    }
}

/* input and output must not overlap. */
static void power_range(const float *input, float *output, int64_t count,
                        const struct power_constants *power) {
    const struct power_constants power_copy = *power;
    int64_t i = 0;
    for (; i + LANES <= count; i += LANES) {
        __m512 values = _mm512_loadu_ps(input + i);
        _mm512_storeu_ps(output + i, power_signed(values, &power_copy));
    }
    if (i < count) {
        __mmask16 tail = (__mmask16)((1u << (count - i)) - 1u);
        __m512 values = _mm512_maskz_loadu_ps(tail, input + i);
        _mm512_mask_storeu_ps(output + i, tail, power_signed(values, &power_copy));
    }
}

#else /* portable C, vectorized by the compiler */

/* Bit pattern of float32 0.75, the lower end of the mantissa range. */
#define THREE_QUARTERS_BITS 0x3f400000
/* 1.5 * 2**23: adding and subtracting it rounds a float32 of magnitude below
 * 2**22 to the nearest integer. */
#define ROUNDING_CONSTANT 12582912.0f

/* Return the name of the compiled implementation. */
const char *gradpower_kernel_variant(void) { return "portable"; }

static inline uint32_t float_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

static inline float bits_float(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/*
 * Return sign(g) * |g|**p, with the polynomials, special values and range
 * handling of the AVX-512 version. Requires 0 < p <= MAX_POWER.
 */
static inline float power_signed(float g, const struct power_constants *c) {
    uint32_t bits = float_bits(g);
    uint32_t sign = bits & 0x80000000u;
    uint32_t abs_bits = bits & 0x7fffffffu;

    /* Scale subnormals by 2**23 so that their exponent field is valid. */
    int subnormal = abs_bits < 0x00800000u;
    float normal = subnormal ? bits_float(abs_bits) * 0x1p23f : bits_float(abs_bits);
    int32_t exponent_offset = subnormal ? -23 : 0;

    /* |g| = 2**e * m with m in [0.75, 1.5). Subtracting the bits of 0.75
     * moves the exponent boundary there. */
    int32_t shifted = (int32_t)float_bits(normal) - THREE_QUARTERS_BITS;
    int32_t e = (shifted >> 23) + exponent_offset;
    float m = bits_float(((uint32_t)shifted & 0x007fffffu) + THREE_QUARTERS_BITS);

    float f = m - 1.0f;
    float q = c->scaled_log2[8];
    for (int k = LOG2_DEGREE - 1; k >= 0; k--) {
        q = q * f + c->scaled_log2[k];
    }
    float mantissa_part = f * q; /* p * log2(m) */

    /* See the AVX-512 version for the split of p * log2|g|. */
    float e_float = (float)e;
    float exact_part = c->power_high * e_float;
    float rest = c->power_low * e_float + mantissa_part;
    float y = exact_part + rest;
    /* Beyond this range the result is 0 or inf whatever r is. The clamp keeps
     * n within the range of the rounding trick and of the scaling below. */
    y = y < -251.0f ? -251.0f : y;
    y = y > 254.0f ? 254.0f : y;
    float n = (y + ROUNDING_CONSTANT) - ROUNDING_CONSTANT;
    float r = (exact_part - n) + rest;
    r = r < -1.0f ? -1.0f : r;
    r = r > 1.0f ? 1.0f : r;

    float power_of_r = EXP2_C6;
    power_of_r = power_of_r * r + EXP2_C5;
    power_of_r = power_of_r * r + EXP2_C4;
    power_of_r = power_of_r * r + EXP2_C3;
    power_of_r = power_of_r * r + EXP2_C2;
    power_of_r = power_of_r * r + EXP2_C1;
    power_of_r = power_of_r * r + EXP2_C0;

    /* Scale by 2**n in two steps. The first keeps a normal number, so only the
     * second one rounds when the result is subnormal. */
    int32_t n_int = (int32_t)n;
    int32_t n_first = n_int < -125 ? -125 : n_int;
    n_first = n_first > 127 ? 127 : n_first;
    int32_t n_second = n_int - n_first;
    float result = power_of_r * bits_float((uint32_t)(n_first + 127) << 23);
    result = result * bits_float((uint32_t)(n_second + 127) << 23);

    /* Zeros, infinities and NaN give themselves. */
    result = abs_bits == 0 || abs_bits >= 0x7f800000u ? bits_float(abs_bits) : result;
    return bits_float(float_bits(result) | sign);
}

/*
 * Update count elements of one tensor. With write_powered_grad set, grad is
 * overwritten with phi_p(grad), else it is only read.
 */
static void adamw_range(float *restrict param, float *restrict grad,
                        float *restrict exp_avg, float *restrict exp_avg_sq,
                        int64_t count, int write_powered_grad,
                        const struct power_constants *power,
                        const struct adamw_constants *adamw) {
    const struct power_constants pc = *power;
    const struct adamw_constants ac = *adamw;
    /* Two copies of the loop, so that neither has a branch inside. */
    if (write_powered_grad) {
        for (int64_t i = 0; i < count; i++) {
            float phi = power_signed(grad[i], &pc);
            float m = exp_avg[i] + ac.one_minus_beta1 * (phi - exp_avg[i]);
            float v = ac.one_minus_beta2 * phi * phi + ac.beta2 * exp_avg_sq[i];
            float denom = sqrtf(v) * ac.inverse_bias_correction2_sqrt + ac.eps;
            param[i] = param[i] * ac.decay - ac.step_size * (m / denom);
            exp_avg[i] = m;
            exp_avg_sq[i] = v;
            grad[i] = phi;
        }
    } else {
        for (int64_t i = 0; i < count; i++) {
            float phi = power_signed(grad[i], &pc);
            float m = exp_avg[i] + ac.one_minus_beta1 * (phi - exp_avg[i]);
            float v = ac.one_minus_beta2 * phi * phi + ac.beta2 * exp_avg_sq[i];
            float denom = sqrtf(v) * ac.inverse_bias_correction2_sqrt + ac.eps;
            param[i] = param[i] * ac.decay - ac.step_size * (m / denom);
            exp_avg[i] = m;
            exp_avg_sq[i] = v;
        }
    }
}

/* input and output must not overlap. */
static void power_range(const float *restrict input, float *restrict output,
                        int64_t count, const struct power_constants *power) {
    const struct power_constants pc = *power;
    for (int64_t i = 0; i < count; i++) {
        output[i] = power_signed(input[i], &pc);
    }
}

#endif

/* Return the index of the tensor that contains chunk, given chunk_starts[t], the
 * first chunk of tensor t, for t in [0, tensor_count]. */
static int64_t find_tensor(const int64_t *chunk_starts, int64_t tensor_count,
                           int64_t chunk) {
    int64_t low = 0;
    int64_t high = tensor_count - 1;
    while (low < high) {
        int64_t middle = low + (high - low + 1) / 2;
        if (chunk_starts[middle] <= chunk) {
            low = middle;
        } else {
            high = middle - 1;
        }
    }
    return low;
}

/*
 * Take one AdamW step with decoupled weight decay on tensor_count float32
 * tensors of one param group, feeding both moments phi_p(grad):
 *   param *= 1 - lr * weight_decay
 *   exp_avg += (1 - beta1) * (phi - exp_avg)
 *   exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * phi**2
 *   param -= lr / (1 - beta1**step) * exp_avg
 *            / (sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps)
 * steps[t] is tensor t's step count after this step's increment. With
 * write_powered_grads nonzero, each grad is overwritten with phi_p(grad), else
 * the gradients are only read. Work is split into chunks over num_threads OpenMP
 * threads. Returns 0, -1 when memory for the chunk table is not available, or
 * -2 when power is not in (0, MAX_POWER].
 */
int gradpower_adamw_step(int64_t tensor_count, float *const *params,
                         float *const *grads, float *const *exp_avgs,
                         float *const *exp_avg_sqs, int write_powered_grads,
                         const int64_t *numels, const double *steps, double lr,
                         double beta1, double beta2, double eps,
                         double weight_decay, double power, int num_threads) {
    if (!(power > 0.0 && power <= MAX_POWER)) {
        return -2;
    }
    if (tensor_count <= 0) {
        return 0;
    }
    struct adamw_constants *constants =
        malloc((size_t)tensor_count * sizeof *constants);
    int64_t *chunk_starts = malloc((size_t)(tensor_count + 1) * sizeof *chunk_starts);
    if (constants == NULL || chunk_starts == NULL) {
        free(constants);
        free(chunk_starts);
        return -1;
    }
    chunk_starts[0] = 0;
    for (int64_t t = 0; t < tensor_count; t++) {
        constants[t] =
            make_adamw_constants(steps[t], lr, beta1, beta2, eps, weight_decay);
        chunk_starts[t + 1] =
            chunk_starts[t] + (numels[t] + CHUNK_NUMEL - 1) / CHUNK_NUMEL;
    }
    const struct power_constants power_constants = make_power_constants(power);
    const int64_t chunk_count = chunk_starts[tensor_count];

#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t chunk = 0; chunk < chunk_count; chunk++) {
        int64_t t = find_tensor(chunk_starts, tensor_count, chunk);
        int64_t begin = (chunk - chunk_starts[t]) * CHUNK_NUMEL;
        int64_t count = numels[t] - begin;
        if (count > CHUNK_NUMEL) {
            count = CHUNK_NUMEL;
        }
        adamw_range(params[t] + begin, grads[t] + begin, exp_avgs[t] + begin,
                    exp_avg_sqs[t] + begin, count, write_powered_grads,
                    &power_constants, &constants[t]);
    }

    free(constants);
    free(chunk_starts);
    return 0;
}

/* Write sign(x) * |x|**power of count float32 values from input to output,
 * which must not overlap. Returns 0, or -2 when power is not in
 * (0, MAX_POWER]. */
int gradpower_power(const float *input, float *output, int64_t count,
                    double power, int num_threads) {
    if (!(power > 0.0 && power <= MAX_POWER)) {
        return -2;
    }
    const struct power_constants power_constants = make_power_constants(power);
    const int64_t chunk_count = (count + CHUNK_NUMEL - 1) / CHUNK_NUMEL;

#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t chunk = 0; chunk < chunk_count; chunk++) {
        int64_t begin = chunk * CHUNK_NUMEL;
        int64_t size = count - begin < CHUNK_NUMEL ? count - begin : CHUNK_NUMEL;
        power_range(input + begin, output + begin, size, &power_constants);
    }
    return 0;
}

/* Return MAX_POWER, the largest power the kernel takes. */
double gradpower_max_power(void) { return MAX_POWER; }
