/*
 * The relay thread's fast path (see relay.py and fastrelay.py): epoll_wait and, for a socket
 * whose bytes need no decision, read -> pass on -> wait again, without coming back to Python.
 *
 * The relay registers a source socket here only while everything about its direction is plain:
 * nothing pending, no EOF, both frame readers between two frames, and - for the browser's
 * direction while its input is being judged - only control frames may pass without Python. A
 * read that is not whole WebSocket frames of that kind, a partial send, an error, EOF or any
 * event other than "readable" goes back to Python with what was read still in the shared
 * buffer, and Python handles it exactly as if it had read it itself. So the frame readers in
 * Python stay right: they only ever skip whole frames they were not shown.
 *
 * Plain C with libc only; loaded with ctypes (which releases the GIL for the whole wait: the
 * fast path runs while trio's thread holds the GIL). Every call comes from the relay thread.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

#define FR_BATCH 256

enum { FR_UP = 1, FR_JUDGING = 2 };                 /* flags of a direction */
enum { FR_EVENT = 0, FR_READ = 1, FR_PARTIAL = 2,  /* what an event hands to Python */
       FR_SEND_ERROR = 3, FR_RECV_ERROR = 4 };

struct fr_direction {
    int enabled;
    int dst;
    int flags;
    uint64_t moved; /* bytes passed on here, not yet taken by Python */
};

struct fr_event {
    int32_t fd;
    uint32_t events;
    int32_t status; /* FR_* above */
    int32_t nread;  /* FR_READ, FR_PARTIAL, FR_SEND_ERROR: bytes in the buffer, from offset 0 */
    int32_t nsent;  /* FR_PARTIAL: of which the destination took this many */
    int32_t error;  /* FR_SEND_ERROR, FR_RECV_ERROR: errno */
};

struct fr_relay {
    int epfd;
    unsigned char *buf;
    size_t bufsize;
    struct fr_direction *by_fd;
    int nfds;
    struct epoll_event batch[FR_BATCH]; /* from the last epoll_wait */
    int batch_len, batch_next;          /* events of it not yet looked at */
};

struct fr_relay *fr_new(int epfd, unsigned char *buf, size_t bufsize) {
    struct fr_relay *r = calloc(1, sizeof *r);
    if (r) {
        r->epfd = epfd;
        r->buf = buf;
        r->bufsize = bufsize;
    }
    return r;
}

void fr_free(struct fr_relay *r) {
    if (r) {
        free(r->by_fd);
        free(r);
    }
}

/* Pass readable `src` on to `dst` here. 0, or -ENOMEM. */
int fr_set(struct fr_relay *r, int src, int dst, int flags) {
    if (src < 0)
        return -EBADF;
    if (src >= r->nfds) {
        int n = r->nfds ? r->nfds : 64;
        while (n <= src)
            n *= 2;
        struct fr_direction *grown = realloc(r->by_fd, (size_t)n * sizeof *grown);
        if (!grown)
            return -ENOMEM;
        memset(grown + r->nfds, 0, (size_t)(n - r->nfds) * sizeof *grown);
        r->by_fd = grown;
        r->nfds = n;
    }
    struct fr_direction *d = &r->by_fd[src];
    d->enabled = 1;
    d->dst = dst;
    d->flags = flags;
    return 0;
}

/* Hand `src` back to Python (its moved count stays until taken). */
void fr_clear(struct fr_relay *r, int src) {
    if (src >= 0 && src < r->nfds)
        r->by_fd[src].enabled = 0;
}

uint64_t fr_take_moved(struct fr_relay *r, int src) {
    if (src < 0 || src >= r->nfds)
        return 0;
    uint64_t moved = r->by_fd[src].moved;
    r->by_fd[src].moved = 0;
    return moved;
}

/* Whether buf[0:n] is whole WebSocket frames that may pass without Python looking: any frame
 * when nothing is judged, only control frames (close, ping, pong) while the browser's input is. */
static int plain_frames(const unsigned char *buf, size_t n, int judging) {
    size_t pos = 0;
    while (pos < n) {
        size_t left = n - pos;
        if (left < 2)
            return 0;
        unsigned first = buf[pos], second = buf[pos + 1];
        unsigned opcode = first & 0x0F;
        if (first & 0x70)
            return 0; /* reserved bits: Python decides what it is */
        if (opcode > 0x2 && (opcode < 0x8 || opcode > 0xA))
            return 0;
        if (judging && opcode < 0x8)
            return 0; /* a data frame a person may have caused */
        uint64_t length = second & 0x7F;
        size_t header = 2;
        if (length == 126) {
            if (left < 4)
                return 0;
            length = ((uint64_t)buf[pos + 2] << 8) | buf[pos + 3];
            header = 4;
        } else if (length == 127) {
            if (left < 10)
                return 0;
            length = 0;
            for (int i = 2; i < 10; i++)
                length = (length << 8) | buf[pos + i];
            header = 10;
        }
        if (second & 0x80)
            header += 4;
        if (header > left || length > left - header)
            return 0;
        pos += header + (size_t)length;
    }
    return 1;
}

/* `src` is readable: read once and pass it on. 1 if all of it went (nothing for Python), 0 if
 * `ev` now says what Python must do. */
static int pass_on(struct fr_relay *r, int src, struct fr_direction *d, struct fr_event *ev) {
    ssize_t n = recv(src, r->buf, r->bufsize, MSG_DONTWAIT);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 1;
        ev->status = FR_RECV_ERROR; /* reported once by the kernel: Python must see this one */
        ev->error = errno;
        return 0;
    }
    if (n == 0)
        return 0; /* EOF: Python's own read sees it again */
    if (!plain_frames(r->buf, (size_t)n, (d->flags & (FR_UP | FR_JUDGING)) == (FR_UP | FR_JUDGING))) {
        ev->status = FR_READ;
        ev->nread = (int32_t)n;
        return 0;
    }
    ssize_t sent = send(d->dst, r->buf, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (sent == n) {
        d->moved += (uint64_t)n;
        return 1;
    }
    ev->nread = (int32_t)n;
    if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        ev->status = FR_SEND_ERROR;
        ev->error = errno;
        return 0;
    }
    d->moved += (uint64_t)n;
    ev->status = FR_PARTIAL;
    ev->nsent = sent < 0 ? 0 : (int32_t)sent;
    return 0;
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait at most `timeout_ms` (-1: no limit) for events Python must see, passing plain reads on
 * meanwhile. Returns how many were written to `out` (0: the time ran out), or -errno. An event
 * that left bytes in the buffer comes alone: Python takes them before anything reads again. */
int fr_wait(struct fr_relay *r, int timeout_ms, struct fr_event *out, int max) {
    int64_t deadline = timeout_ms >= 0 ? now_ms() + timeout_ms : -1;
    int count = 0, polled = 0;
    for (;;) {
        while (r->batch_next < r->batch_len && count < max) {
            struct epoll_event *e = &r->batch[r->batch_next++];
            int fd = e->data.fd;
            struct fr_event *ev = &out[count];
            ev->fd = fd;
            ev->events = e->events;
            ev->status = FR_EVENT;
            ev->nread = ev->nsent = ev->error = 0;
            if (fd >= 0 && fd < r->nfds && r->by_fd[fd].enabled && e->events == EPOLLIN) {
                if (count) {
                    /* A read may leave bytes in the buffer for Python, which would handle the
                     * events before it first - and they read into the same buffer. */
                    r->batch_next--;
                    return count;
                }
                if (pass_on(r, fd, &r->by_fd[fd], ev))
                    continue;
            }
            count++;
            if (ev->status != FR_EVENT)
                return count;
        }
        if (count)
            return count;
        int wait = -1;
        if (deadline >= 0) {
            int64_t left = deadline - now_ms();
            if (left <= 0 && polled)
                return 0; /* Python's timers are due, however busy the sockets are */
            wait = left > 0 ? (int)left : 0;
        }
        polled = 1;
        int n = epoll_wait(r->epfd, r->batch, FR_BATCH, wait);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        r->batch_len = n;
        r->batch_next = 0;
        if (n == 0)
            return 0;
    }
}
