/* cuda_ops.cuh — the kernel entry points each .cu file defines, gathered into the backend table by
 * backend_cuda.cu. Signatures are exactly those of struct st_backend (kernels/kernels.h). */
#ifndef ST_CUDA_OPS_CUH
#define ST_CUDA_OPS_CUH

#include "kernels/cuda/cuda_common.cuh"

/* norms.cu */
void st_cu_layernorm_fwd(float *out, float *mean, float *rstd, const float *x, const float *w, const float *b,
                         int n, int c, float eps);
void st_cu_layernorm_bwd(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w,
                         const float *mean, const float *rstd, int n, int c);
void st_cu_rmsnorm_fwd(float *out, float *rstd, const float *x, const float *w, int n, int c, float eps);
void st_cu_rmsnorm_bwd(float *dx, float *dw, const float *dout, const float *x, const float *w, const float *rstd,
                       int n, int c);

/* attention.cu */
void st_cu_rope_fwd(float *qkv, const float *cos, const float *sin, int b, int t, int h, int kvh, int hd);
void st_cu_rope_bwd(float *dqkv, const float *cos, const float *sin, int b, int t, int h, int kvh, int hd);
void st_cu_attention_window_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd,
                                int window);
void st_cu_attention_window_bwd(float *dqkv, const float *dout, const float *qkv, const float *out,
                                const float *lse, int b, int t, int h, int kvh, int hd, int window);
void st_cu_head_rmsnorm_fwd(float *qkv, float *xs, float *rstd, const float *wq, const float *wk, int n, int h,
                            int kvh, int hd, float eps);
void st_cu_head_rmsnorm_bwd(float *dqkv, float *dwq, float *dwk, const float *xs, const float *rstd,
                            const float *wq, const float *wk, int n, int h, int kvh, int hd);
void st_cu_attention_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd);
void st_cu_attention_bwd(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                         int b, int t, int h, int kvh, int hd);

/* attention_docs.cu: document-packed sequences (kernels.h attention_docs_*, rope_pos_*, embedding_pos_*) */
void st_cu_attention_docs_fwd(float *out, float *lse, const float *qkv, const int32_t *pos, int b, int t, int h,
                              int kvh, int hd, int window);
void st_cu_attention_docs_bwd(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                              const int32_t *pos, int b, int t, int h, int kvh, int hd, int window);
void st_cu_rope_pos_fwd(float *qkv, const float *cos, const float *sin, const int32_t *pos, int b, int t, int h,
                        int kvh, int hd);
void st_cu_rope_pos_bwd(float *dqkv, const float *cos, const float *sin, const int32_t *pos, int b, int t, int h,
                        int kvh, int hd);
void st_cu_embedding_pos_fwd(float *out, const int32_t *tokens, const float *wte, const float *wpe,
                             const int32_t *pos, int b, int t, int c);
void st_cu_embedding_pos_bwd(float *dwpe, const float *dout, const int32_t *pos, int b, int t, int c);

/* attention_tc.cu: the table's attention (tensor-core kernels when SHARDTUNE_CUDA_ATTN=tc, else the above) */
void st_cu_attention_fwd_any(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd);
void st_cu_attention_bwd_any(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                             int b, int t, int h, int kvh, int hd);

/* pointwise.cu */
void st_cu_gelu_fwd(float *out, const float *x, size_t n);
void st_cu_gelu_bwd(float *dx, const float *dout, const float *x, size_t n);
void st_cu_swiglu_fwd(float *out, const float *gu, int n, int f);
void st_cu_swiglu_bwd(float *dgu, const float *dout, const float *gu, int n, int f);
void st_cu_embedding_fwd(float *out, const int32_t *tokens, const float *wte, const float *wpe, int b, int t,
                         int c);
void st_cu_embedding_bwd(float *dwte, float *dwpe, const float *dout, const int32_t *tokens, int b, int t, int c);
void st_cu_adamw(float *param, const float *grad, float *m, float *v, size_t n, float lr, float beta1, float beta2,
                 float eps, float weight_decay, float grad_scale, int step);
void st_cu_adamw_multi(const st_adamw_range *ranges, int count, float beta1, float beta2, float eps,
                       float grad_scale);
void st_cu_dequant_int8(float *out, const int8_t *q, const float *scale, size_t n, int block);
void st_cu_dequant_nf4(float *out, const uint8_t *packed, const float *absmax, size_t n, int block);

/* int8.cu: the int8 forward matmul of a distillation teacher (kernels.h w8_*, matmul_w8a8) */
size_t st_cu_w8_bytes(int out, int in);
size_t st_cu_w8_scratch_bytes(int m, int in);
void st_cu_w8_pack(void *packed, const float *w, int out, int in);
void st_cu_matmul_w8a8(float *c, const float *a, const void *packed, const float *bias, int m, int out, int in,
                       float beta, void *scratch);
/* qmatmul.cu */
void st_cu_qmatmul(float *c, st_mm_in x, const st_qweight *w, int m, int trans, int bf16, float beta, float *scratch,
                   size_t scratch_floats);

/* cross_entropy.cu */
double st_cu_cross_entropy(float *logits, float *loss, const int32_t *target, const float *weight, int n, int v);
void st_cu_cross_entropy_acc(float *logits, uint16_t *dlogits_bf16, float *loss, const int32_t *target,
                             const float *weight, int n, int v, double *total);
void st_cu_kd_loss(float *s_logits, uint16_t *dlogits_bf16, const float *t_logits, float *loss, const int32_t *target,
                   const float *weight, int n, int v, float temperature, float alpha, double *total, double *parts);
void st_cu_xent_block_stats(const float *logits, float *stats, const int32_t *target, const float *weight, int n,
                            int nv, int j0);
void st_cu_xent_block_loss(const float *stats, float *loss, const int32_t *target, const float *weight, int n, int v,
                           double *total);
void st_cu_xent_block_grad(float *logits, uint16_t *dlogits_bf16, const float *stats, const int32_t *target,
                           const float *weight, int n, int nv, int j0);

/* decode.cu */
void st_cu_kv_store(float *kcache, float *vcache, const float *qkv, const int32_t *row_seq, const int32_t *row_pos,
                    int rows, int h, int kvh, int hd, int max_t);
void st_cu_attention_cached(float *out, const float *qkv, const float *kcache, const float *vcache,
                            const int32_t *row_seq, const int32_t *row_pos, int rows, int h, int kvh, int hd,
                            int max_t, int window);
void st_cu_decode_mm(float *y, const float *x, const float *w, const uint16_t *w16, int rows, int out, int in,
                     float beta);

#endif
