/* mailbox.c — see mailbox.h. */
#include "coordinator/monitor/mailbox.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/error.h"

void st_mailbox_clear(st_mailbox *b) {
    memset(b, 0, sizeof *b);
    b->wake_fd = -1;
    pthread_mutex_init(&b->lock, NULL);
}

int st_mailbox_init(st_mailbox *b, int cap, size_t item_size) {
    b->cap = cap;
    b->item_size = item_size;
    b->items = calloc((size_t)cap, item_size);
    b->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return b->items && b->wake_fd >= 0 ? 0 : ST_ENOMEM;
}

void st_mailbox_free(st_mailbox *b) {
    if (b->wake_fd >= 0) close(b->wake_fd);
    b->wake_fd = -1;
    pthread_mutex_destroy(&b->lock);
    free(b->items);
    b->items = NULL;
}

void st_mailbox_wake(st_mailbox *b) {
    uint64_t one = 1;
    ssize_t w = write(b->wake_fd, &one, sizeof one); /* EAGAIN: counter already non-zero, fine */
    (void)w;
}

int st_mailbox_put(st_mailbox *b, const void *item) {
    int full;
    pthread_mutex_lock(&b->lock);
    full = b->count == b->cap;
    if (!full) {
        memcpy(b->items + (size_t)((b->head + b->count) % b->cap) * b->item_size, item, b->item_size);
        b->count++;
    }
    pthread_mutex_unlock(&b->lock);
    if (full) return 1;
    st_mailbox_wake(b);
    return 0;
}

int st_mailbox_take(st_mailbox *b, void *item) {
    pthread_mutex_lock(&b->lock);
    int have = b->count > 0;
    if (have) {
        memcpy(item, b->items + (size_t)b->head * b->item_size, b->item_size);
        b->head = (b->head + 1) % b->cap;
        b->count--;
    }
    pthread_mutex_unlock(&b->lock);
    return have;
}

int st_mailbox_fd(const st_mailbox *b) { return b->wake_fd; }

void st_mailbox_drain_wake(st_mailbox *b) {
    uint64_t v;
    ssize_t r = read(b->wake_fd, &v, sizeof v);
    (void)r;
}
