/* HDF5 helpers shared by the data set files of worker/ (dataset.c writes a whole data set, dataset_stream.c
 * appends to one document by document). Internal to worker/: no other module includes it. */
#ifndef ST_DATASET_H5_H
#define ST_DATASET_H5_H

#include <hdf5.h>
#include <stdint.h>

/* Writes the scalar int64 attribute NAME on FILE. 0, or -1 when HDF5 fails (the caller names the file). */
int st_dataset_h5_int_attr(hid_t file, const char *name, int64_t value);

#endif
