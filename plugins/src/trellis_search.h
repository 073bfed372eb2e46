/* Viterbi search of the trellis codec (plugins/_trellis.py documents the contract): x, w are
 * (steps, n) row-major float32, start n states or NULL, table 256 float32, out (steps, n) states.
 * Returns 0, 1 for bad arguments, 2 when out of memory. */
int rbe_trellis_search(const float *x, const float *w, int64_t steps, int64_t n, int bits,
                       const uint8_t *start, const float *table, uint8_t *out);
/* The windows of streams (plugins/_trellis.py's `windows`): rows streams of nbytes bytes each,
 * length windows of 8 bits from bit t * bits into out (rows, length); bytes past a stream read
 * as zero. */
void rbe_trellis_windows(const uint8_t *streams, int64_t rows, int64_t nbytes, int64_t length, int bits,
                         uint8_t *out);
