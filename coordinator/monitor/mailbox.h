/* mailbox.h — a bounded queue of fixed-size items from any thread to one socket thread, with a wake-up
 * the socket thread can zmq_poll (an eventfd). Used by the telemetry thread (step reports from the
 * training loop) and the monitor server (events from the API). A full mailbox drops the new item: the
 * sender never waits on the socket thread. The mailbox owns its item array and the eventfd. */
#ifndef ST_MAILBOX_H
#define ST_MAILBOX_H

#include <pthread.h>
#include <stddef.h>

typedef struct {
    pthread_mutex_t lock; /* guards items, head, count */
    unsigned char *items; /* [cap * item_size] ring */
    size_t item_size;
    int cap, head, count;
    int wake_fd;          /* eventfd; -1 when not open */
} st_mailbox;

/* Zeroed state that st_mailbox_free accepts (call before anything can fail). */
void st_mailbox_clear(st_mailbox *b);
/* Room for cap items of item_size bytes, and the wake-up. 0, or ST_ENOMEM (no message set). */
int st_mailbox_init(st_mailbox *b, int cap, size_t item_size);
void st_mailbox_free(st_mailbox *b);

/* Any thread: queues a copy of item and wakes the reader; 1 (nothing queued) when the mailbox is full. */
int st_mailbox_put(st_mailbox *b, const void *item);
/* The reader: 1 and the oldest item copied out, or 0 when empty. */
int st_mailbox_take(st_mailbox *b, void *item);
/* Any thread: makes the reader's poll return (e.g. to stop). */
void st_mailbox_wake(st_mailbox *b);
/* The reader: the fd to poll for ZMQ_POLLIN, and the reset after it fired. */
int st_mailbox_fd(const st_mailbox *b);
void st_mailbox_drain_wake(st_mailbox *b);

#endif
