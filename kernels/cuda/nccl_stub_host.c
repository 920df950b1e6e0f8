/* nccl_stub_host.c — kernels/cuda/nccl_comm.h in a build without CUDA: every call fails with one line,
 * so worker/comm.c calls NCCL without #ifdef (it only does on a backend whose memory is device memory,
 * which such a build has only in tests: tests/tools/nccl_fake.c links its own implementation, and then
 * this file is never pulled from the archive). */
#ifndef ST_HAVE_CUDA
#include "kernels/cuda/nccl_comm.h"

#include "common/error.h"

static int no_nccl(void) {
    return st_fail(ST_EDEVICE, "device buffers need NCCL, but this shardtune was built without CUDA");
}

int st_nccl_get_unique_id(unsigned char id_out[ST_NCCL_ID_BYTES]) { (void)id_out; return no_nccl(); }
int st_nccl_init(st_nccl_comm **out, int rank, int world, const unsigned char id[ST_NCCL_ID_BYTES]) {
    (void)rank, (void)world, (void)id;
    *out = NULL;
    return no_nccl();
}
int st_nccl_all_reduce_sum(st_nccl_comm *c, float *buf, size_t n) { (void)c, (void)buf, (void)n; return no_nccl(); }
int st_nccl_reduce_scatter_sum(st_nccl_comm *c, float *recv, const float *send, size_t recv_n) {
    (void)c, (void)recv, (void)send, (void)recv_n;
    return no_nccl();
}
int st_nccl_reduce_parts_sum(st_nccl_comm *c, float *recv, const float *send, const size_t *parts) {
    (void)c, (void)recv, (void)send, (void)parts;
    return no_nccl();
}
int st_nccl_all_gather_parts(st_nccl_comm *c, float *buf, const size_t *parts) {
    (void)c, (void)buf, (void)parts;
    return no_nccl();
}
int st_nccl_all_gather_parts_bf16(st_nccl_comm *c, uint16_t *buf, const size_t *parts) {
    (void)c, (void)buf, (void)parts;
    return no_nccl();
}
int st_nccl_send_recv(st_nccl_comm *c, const float *send, const st_nccl_span *to, float *recv,
                      const st_nccl_span *from) {
    (void)c, (void)send, (void)to, (void)recv, (void)from;
    return no_nccl();
}
int st_nccl_all_gather(st_nccl_comm *c, float *recv, const float *send, size_t send_n) {
    (void)c, (void)recv, (void)send, (void)send_n;
    return no_nccl();
}
int st_nccl_wait_compute(st_nccl_comm *c) { (void)c; return no_nccl(); }
int st_nccl_record(st_nccl_comm *c, int ev) { (void)c, (void)ev; return no_nccl(); }
int st_nccl_wait_event(st_nccl_comm *c, int ev) { (void)c, (void)ev; return no_nccl(); }
int st_nccl_synchronize(st_nccl_comm *c) { (void)c; return no_nccl(); }
int st_nccl_rank(const st_nccl_comm *c) { (void)c; return -1; }
int st_nccl_world(const st_nccl_comm *c) { (void)c; return 0; }
void st_nccl_destroy(st_nccl_comm *c) { (void)c; }
#else
typedef int st_nccl_stub_unused; /* ISO C: a translation unit is not empty */
#endif
