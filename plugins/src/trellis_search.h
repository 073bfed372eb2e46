/* Viterbi search of the trellis codec (plugins/_trellis.py documents the contract): x, w are
 * (steps, n) row-major float32, start n states or NULL, table 256 float32, out (steps, n) states.
 * Returns 0, 1 for bad arguments, 2 when out of memory. */
int rbe_trellis_search(const float *x, const float *w, int64_t steps, int64_t n, int bits,
                       const uint8_t *start, const float *table, uint8_t *out);
