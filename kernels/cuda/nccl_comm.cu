/* nccl_comm.cu — NCCL communicator, collectives on a dedicated stream, event ordering against the
 * compute stream (see nccl_comm.h). The st_nccl_comm struct and its stream/events are owned here. */
#include "kernels/cuda/nccl_comm.h"
#include "kernels/cuda/cuda_common.cuh"

#include <nccl.h>
#include <stdlib.h>
#include <string.h>

static_assert(sizeof(ncclUniqueId) == ST_NCCL_ID_BYTES, "NCCL unique id size changed");

struct st_nccl_comm {
    ncclComm_t comm;
    int rank, world;
    cudaStream_t comm_stream, compute_stream;
    cudaEvent_t compute_ready; /* recorded on compute, waited on by comm */
    cudaEvent_t comm_done;     /* recorded on comm, waited on by compute */
    cudaEvent_t marks[ST_NCCL_EVENTS]; /* st_nccl_record / st_nccl_wait_event */
};

static int nccl_fail(const st_nccl_comm *c, const char *what, ncclResult_t r) {
    return st_fail(ST_ECOMM, "NCCL %s on rank %d: %s", what, c ? c->rank : -1, ncclGetErrorString(r));
}

static int cuda_fail(const st_nccl_comm *c, const char *what, cudaError_t e) {
    return st_fail(ST_EDEVICE, "NCCL %s on rank %d: %s", what, c ? c->rank : -1, cudaGetErrorString(e));
}

extern "C" int st_nccl_get_unique_id(unsigned char id_out[ST_NCCL_ID_BYTES]) {
    ncclUniqueId id;
    ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess) return nccl_fail(NULL, "get unique id", r);
    memcpy(id_out, &id, ST_NCCL_ID_BYTES);
    return 0;
}

extern "C" int st_nccl_init(st_nccl_comm **out, int rank, int world, const unsigned char id[ST_NCCL_ID_BYTES]) {
    *out = NULL;
    if (world < 1 || rank < 0 || rank >= world)
        return st_fail(ST_EINVAL, "NCCL init: rank %d outside world of %d", rank, world);
    cudaStream_t compute = st_cuda_stream_internal();
    if (!compute) return st_fail(ST_EDEVICE, "NCCL init on rank %d: the CUDA backend is not initialized", rank);
    st_nccl_comm *c = (st_nccl_comm *)calloc(1, sizeof *c);
    if (!c) return st_fail(ST_ENOMEM, "NCCL init on rank %d: out of memory", rank);
    c->rank = rank, c->world = world, c->compute_stream = compute;
    /* the highest priority the device offers: a bucket's collective is scheduled ahead of the backward
     * kernels queued behind it, so the reduction overlaps instead of waiting for the compute queue */
    int least = 0, greatest = 0;
    cudaError_t e = cudaDeviceGetStreamPriorityRange(&least, &greatest);
    if (e == cudaSuccess) e = cudaStreamCreateWithPriority(&c->comm_stream, cudaStreamNonBlocking, greatest);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&c->compute_ready, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&c->comm_done, cudaEventDisableTiming);
    for (int k = 0; k < ST_NCCL_EVENTS && e == cudaSuccess; k++)
        e = cudaEventCreateWithFlags(&c->marks[k], cudaEventDisableTiming);
    if (e != cudaSuccess) {
        int rc = cuda_fail(c, "stream/event creation", e);
        st_nccl_destroy(c);
        return rc;
    }
    ncclUniqueId uid;
    memcpy(&uid, id, ST_NCCL_ID_BYTES);
    ncclResult_t r = ncclCommInitRank(&c->comm, world, uid, rank);
    if (r != ncclSuccess) {
        c->comm = NULL;
        int rc = nccl_fail(c, "communicator init", r);
        st_nccl_destroy(c);
        return rc;
    }
    *out = c;
    return 0;
}

/* comm stream waits for everything queued on the compute stream so far */
static int order_after_compute(st_nccl_comm *c, const char *what) {
    cudaError_t e = cudaEventRecord(c->compute_ready, c->compute_stream);
    if (e == cudaSuccess) e = cudaStreamWaitEvent(c->comm_stream, c->compute_ready, 0);
    return e == cudaSuccess ? 0 : cuda_fail(c, what, e);
}

static int finish(st_nccl_comm *c, const char *what, ncclResult_t r) {
    if (r != ncclSuccess) return nccl_fail(c, what, r);
    cudaError_t e = cudaEventRecord(c->comm_done, c->comm_stream);
    return e == cudaSuccess ? 0 : cuda_fail(c, what, e);
}

extern "C" int st_nccl_all_reduce_sum(st_nccl_comm *c, float *buf, size_t n) {
    if (!c) return st_fail(ST_EINVAL, "NCCL all_reduce: no communicator");
    if (n == 0) return 0;
    int rc = order_after_compute(c, "all_reduce");
    if (rc) return rc;
    return finish(c, "all_reduce", ncclAllReduce(buf, buf, n, ncclFloat32, ncclSum, c->comm, c->comm_stream));
}

extern "C" int st_nccl_reduce_scatter_sum(st_nccl_comm *c, float *recv, const float *send, size_t recv_n) {
    if (!c) return st_fail(ST_EINVAL, "NCCL reduce_scatter: no communicator");
    if (recv_n == 0) return 0;
    int rc = order_after_compute(c, "reduce_scatter");
    if (rc) return rc;
    return finish(c, "reduce_scatter",
                  ncclReduceScatter(send, recv, recv_n, ncclFloat32, ncclSum, c->comm, c->comm_stream));
}

/* One collective per non-empty per-rank part (parts[root] floats at offset `off`, parts consecutive), as
 * one NCCL group: op(root, off, count) issues it. NCCL's own ReduceScatter / AllGather need equal parts. */
template <typename Op> static int grouped_parts(st_nccl_comm *c, const char *what, const size_t *parts, Op op) {
    int rc = order_after_compute(c, what);
    if (rc) return rc;
    ncclResult_t r = ncclGroupStart();
    size_t off = 0;
    for (int root = 0; root < c->world && r == ncclSuccess; root++) {
        if (parts[root] == 0) continue;
        r = op(root, off, parts[root]);
        off += parts[root];
    }
    ncclResult_t g = ncclGroupEnd();
    return finish(c, what, r != ncclSuccess ? r : g);
}

extern "C" int st_nccl_reduce_parts_sum(st_nccl_comm *c, float *recv, const float *send, const size_t *parts) {
    if (!c) return st_fail(ST_EINVAL, "NCCL reduce_parts: no communicator");
    return grouped_parts(c, "reduce_parts", parts, [&](int root, size_t off, size_t n) {
        /* only the root's receive buffer is written; others pass a valid device pointer all the same */
        float *dst = root == c->rank ? recv : (float *)(send + off);
        return ncclReduce(send + off, dst, n, ncclFloat32, ncclSum, root, c->comm, c->comm_stream);
    });
}

extern "C" int st_nccl_all_gather_parts(st_nccl_comm *c, float *buf, const size_t *parts) {
    if (!c) return st_fail(ST_EINVAL, "NCCL all_gather_parts: no communicator");
    return grouped_parts(c, "all_gather_parts", parts, [&](int root, size_t off, size_t n) {
        return ncclBroadcast(buf + off, buf + off, n, ncclFloat32, root, c->comm, c->comm_stream);
    });
}

extern "C" int st_nccl_all_gather_parts_bf16(st_nccl_comm *c, uint16_t *buf, const size_t *parts) {
    if (!c) return st_fail(ST_EINVAL, "NCCL all_gather_parts_bf16: no communicator");
    return grouped_parts(c, "all_gather_parts_bf16", parts, [&](int root, size_t off, size_t n) {
        return ncclBroadcast(buf + off, buf + off, n, ncclBfloat16, root, c->comm, c->comm_stream); /* bits moved */
    });
}

extern "C" int st_nccl_send_recv(st_nccl_comm *c, const float *send, const st_nccl_span *to, float *recv,
                                 const st_nccl_span *from) {
    if (!c) return st_fail(ST_EINVAL, "NCCL send_recv: no communicator");
    int rc = order_after_compute(c, "send_recv");
    if (rc) return rc;
    ncclResult_t r = ncclGroupStart();
    for (int peer = 0; peer < c->world && r == ncclSuccess; peer++) {
        if (peer == c->rank) continue; /* the caller's own overlap: a local copy */
        if (to[peer].n) r = ncclSend(send + to[peer].off, to[peer].n, ncclFloat32, peer, c->comm, c->comm_stream);
        if (r == ncclSuccess && from[peer].n)
            r = ncclRecv(recv + from[peer].off, from[peer].n, ncclFloat32, peer, c->comm, c->comm_stream);
    }
    ncclResult_t g = ncclGroupEnd();
    return finish(c, "send_recv", r != ncclSuccess ? r : g);
}

extern "C" int st_nccl_all_gather(st_nccl_comm *c, float *recv, const float *send, size_t send_n) {
    if (!c) return st_fail(ST_EINVAL, "NCCL all_gather: no communicator");
    if (send_n == 0) return 0;
    int rc = order_after_compute(c, "all_gather");
    if (rc) return rc;
    return finish(c, "all_gather", ncclAllGather(send, recv, send_n, ncclFloat32, c->comm, c->comm_stream));
}

extern "C" int st_nccl_wait_compute(st_nccl_comm *c) {
    if (!c) return st_fail(ST_EINVAL, "NCCL wait: no communicator");
    cudaError_t e = cudaStreamWaitEvent(c->compute_stream, c->comm_done, 0);
    return e == cudaSuccess ? 0 : cuda_fail(c, "wait (compute on comm)", e);
}

extern "C" int st_nccl_record(st_nccl_comm *c, int ev) {
    if (!c || ev < 0 || ev >= ST_NCCL_EVENTS) return st_fail(ST_EINVAL, "NCCL record: no communicator or event %d", ev);
    cudaError_t e = cudaEventRecord(c->marks[ev], c->comm_stream);
    return e == cudaSuccess ? 0 : cuda_fail(c, "record (comm stream mark)", e);
}

extern "C" int st_nccl_wait_event(st_nccl_comm *c, int ev) {
    if (!c || ev < 0 || ev >= ST_NCCL_EVENTS) return st_fail(ST_EINVAL, "NCCL wait: no communicator or event %d", ev);
    cudaError_t e = cudaStreamWaitEvent(c->compute_stream, c->marks[ev], 0);
    return e == cudaSuccess ? 0 : cuda_fail(c, "wait (compute on a comm stream mark)", e);
}

extern "C" int st_nccl_synchronize(st_nccl_comm *c) {
    if (!c) return st_fail(ST_EINVAL, "NCCL synchronize: no communicator");
    cudaError_t e = cudaStreamSynchronize(c->comm_stream);
    if (e != cudaSuccess) return cuda_fail(c, "synchronize", e);
    ncclResult_t async_err = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(c->comm, &async_err);
    if (r != ncclSuccess) return nccl_fail(c, "async error query", r);
    if (async_err != ncclSuccess) return nccl_fail(c, "collective", async_err);
    return 0;
}

extern "C" int st_nccl_rank(const st_nccl_comm *c) { return c ? c->rank : -1; }
extern "C" int st_nccl_world(const st_nccl_comm *c) { return c ? c->world : 0; }

extern "C" void st_nccl_destroy(st_nccl_comm *c) {
    if (!c) return;
    if (c->comm_stream) cudaStreamSynchronize(c->comm_stream);
    if (c->comm) ncclCommDestroy(c->comm);
    if (c->comm_done) cudaEventDestroy(c->comm_done);
    for (int k = 0; k < ST_NCCL_EVENTS; k++)
        if (c->marks[k]) cudaEventDestroy(c->marks[k]);
    if (c->compute_ready) cudaEventDestroy(c->compute_ready);
    if (c->comm_stream) cudaStreamDestroy(c->comm_stream);
    free(c);
}
