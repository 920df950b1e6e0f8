/* node_rank.c — prints what st_comm_node_rank says for this rank, next to what the launcher says:
 *   "<world rank> <node-local rank> <ranks on node> <OMPI_COMM_WORLD_LOCAL_RANK or -1>"
 * (tests/integration/test_node_rank.sh runs it under mpirun). */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

#include "common/error.h"
#include "worker/comm.h"

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank = 0, local = -1, size = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (st_comm_node_rank(MPI_COMM_WORLD, &local, &size) != 0) {
        fprintf(stderr, "node_rank: %s\n", st_error());
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    const char *env = getenv("OMPI_COMM_WORLD_LOCAL_RANK");
    printf("%d %d %d %s\n", rank, local, size, env ? env : "-1");
    MPI_Finalize();
    return 0;
}
