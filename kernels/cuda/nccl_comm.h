/* nccl_comm.h — a small C API over NCCL for the data-parallel worker (CUDA builds only).
 *
 * Setup: rank 0 calls st_nccl_get_unique_id() and broadcasts the ST_NCCL_ID_BYTES bytes (e.g. with
 * MPI_Bcast); every rank then calls st_nccl_init() with the same bytes. The communicator owns a dedicated
 * communication stream and two events. Every collective first makes the comm stream wait for the work
 * queued so far on the compute stream (event recorded on compute -> waited on comm), so the gradients it
 * reads are complete, then returns without blocking the host. st_nccl_wait_compute() makes the compute
 * stream wait for the collectives queued so far (before the optimizer reads reduced gradients).
 * Buffers are device float pointers owned by the caller. Functions return 0 or ST_ECOMM / ST_EDEVICE /
 * ST_EINVAL with st_error() naming the operation, rank and NCCL's reason. */
#ifndef ST_NCCL_COMM_H
#define ST_NCCL_COMM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ST_NCCL_ID_BYTES 128

typedef struct st_nccl_comm st_nccl_comm;

/* Fills id_out with a fresh NCCL unique id (call on one rank only). */
int st_nccl_get_unique_id(unsigned char id_out[ST_NCCL_ID_BYTES]);

/* Joins the communicator of `world` ranks as `rank`, on the CUDA backend's device and compute stream
 * (st_backend_cuda() must have succeeded). Collective: blocks until all ranks joined. */
int st_nccl_init(st_nccl_comm **out, int rank, int world, const unsigned char id[ST_NCCL_ID_BYTES]);

/* In place: buf[0..n) = sum over ranks. */
int st_nccl_all_reduce_sum(st_nccl_comm *comm, float *buf, size_t n);
/* recv[0..recv_n) = sum over ranks of send[rank * recv_n ..); send has world * recv_n floats. */
int st_nccl_reduce_scatter_sum(st_nccl_comm *comm, float *recv, const float *send, size_t recv_n);
/* A reduce-scatter with uneven parts: send[0..sum(parts)) is summed over ranks and rank r receives the
 * r-th consecutive part (parts[r] floats, world entries) in its recv. Grouped ncclReduce calls, one per
 * non-empty part (NCCL's ReduceScatter needs equal parts). */
int st_nccl_reduce_parts_sum(st_nccl_comm *comm, float *recv, const float *send, const size_t *parts);
/* An all-gather with uneven parts, in place: buf[0..sum(parts)) holds consecutive per-rank parts and rank
 * r's part (parts[r] floats) is broadcast from rank r to every rank. Grouped ncclBroadcast calls. */
int st_nccl_all_gather_parts(st_nccl_comm *comm, float *buf, const size_t *parts);
/* The same over bf16 values (parts[r] 2-byte elements): device ZeRO-3's frozen parameters held in bf16 only
 * travel so, half the bytes (worker/comm_zero3_dev.c). */
int st_nccl_all_gather_parts_bf16(st_nccl_comm *comm, uint16_t *buf, const size_t *parts);
/* Point to point, one NCCL group (ncclSend / ncclRecv): to[r] = {off, n} sends send[off .. off + n) to rank r,
 * from[r] receives n floats from rank r into recv[off ..) (world entries each; n 0: nothing with that rank;
 * this rank's own entries are ignored: the caller copies its own overlap). Collective in order: every rank
 * calls it at the same point of its queue, those with nothing to move too, and a rank's to[r] must match
 * rank r's from[its rank]. Device ZeRO-3's stage change moves a piece owner to owner with it. */
typedef struct { size_t off, n; } st_nccl_span;
int st_nccl_send_recv(st_nccl_comm *comm, const float *send, const st_nccl_span *to, float *recv,
                      const st_nccl_span *from);
/* recv[r * send_n ..) = send of rank r; recv has world * send_n floats (send may alias its slot). */
int st_nccl_all_gather(st_nccl_comm *comm, float *recv, const float *send, size_t send_n);

/* Compute stream waits (on the device, the host does not block) for the collectives queued so far. */
int st_nccl_wait_compute(st_nccl_comm *comm);
/* Marks on the comm stream, ST_NCCL_EVENTS of them (ev 0 .. ST_NCCL_EVENTS - 1): st_nccl_record(comm, ev)
 * records event ev after the collectives queued so far; st_nccl_wait_event(comm, ev) makes the compute
 * stream wait (on the device) for those only, so collectives queued after the mark stay in flight (ZeRO-3
 * on a device waits for a layer's gather while the previous layer's reduce-scatter still travels). */
#define ST_NCCL_EVENTS 10
int st_nccl_record(st_nccl_comm *comm, int ev);
int st_nccl_wait_event(st_nccl_comm *comm, int ev);
/* Host blocks until the queued collectives finished; reports asynchronous NCCL errors. */
int st_nccl_synchronize(st_nccl_comm *comm);

int st_nccl_rank(const st_nccl_comm *comm);
int st_nccl_world(const st_nccl_comm *comm);

/* Destroys the communicator, its stream and events (NULL is fine). */
void st_nccl_destroy(st_nccl_comm *comm);

#ifdef __cplusplus
}
#endif
#endif
