/*
 * cbroadcast: a minimal single-threaded C WebSocket broadcast server, the "ceiling" peer of
 * `relay bench --peers` (compiled on demand like bench/load/cload.c).
 *
 * It shows what one core and the kernel allow on this machine, and checks that the load
 * generator keeps up at rates no Python server reaches. It speaks just enough of relay's
 * protocol (JSON only): `subscribe` joins a channel and is answered with `subscribed`; the
 * `data` of a `publish` goes, byte for byte, to every subscriber of its channel as
 * {"type":"message","channel":C,"offset":N,"data":D}, framed once. Like relay it flushes
 * each connection once per batch of input (one send(2) of everything queued for it) and
 * bounds every output buffer (4 MiB; past that it closes the connection with 4002).
 * No TLS, no extensions, no fragmentation of its own frames; not hardened. Loopback only.
 *
 * Usage: cbroadcast --port P
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define OUT_LIMIT (4u << 20)
#define IN_LIMIT (1u << 20)
#define MAX_CHANNELS 1024

typedef struct conn {
    int fd, upgraded, dirty, closing, want_out;
    uint8_t *in;
    size_t in_len, in_cap;
    uint8_t *out;
    size_t out_len, out_cap, out_off;
    int *chans; /* channel ids this connection joined */
    int nchans;
    struct conn *next_dirty;
} conn_t;

typedef struct {
    char name[256];
    int64_t offset;
    conn_t **subs;
    int n, cap;
} chan_t;

static chan_t channels[MAX_CHANNELS];
static int nchannels;
static int ep;
static conn_t *dirty;

/* ---- SHA-1 (RFC 3174), only for Sec-WebSocket-Accept ---- */
static uint32_t rol(uint32_t x, int n) { return x << n | x >> (32 - n); }

static void sha1(const uint8_t *msg, size_t len, uint8_t out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t total = ((len + 8) / 64 + 1) * 64;
    uint8_t *m = calloc(1, total);
    if (!m) abort();
    memcpy(m, msg, len);
    m[len] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) m[total - 1 - i] = (uint8_t)(bits >> (8 * i));
    for (size_t off = 0; off < total; off += 64) {
        uint32_t w[80];
        for (int i = 0; i < 16; i++)
            w[i] = (uint32_t)m[off + 4 * i] << 24 | (uint32_t)m[off + 4 * i + 1] << 16 | (uint32_t)m[off + 4 * i + 2] << 8 |
                   m[off + 4 * i + 3];
        for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
            else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
            else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
            else f = b ^ c ^ d, k = 0xCA62C1D6;
            uint32_t t = rol(a, 5) + f + e + k + w[i];
            e = d, d = c, c = rol(b, 30), b = a, a = t;
        }
        h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
    }
    free(m);
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 4; j++) out[4 * i + j] = (uint8_t)(h[i] >> (24 - 8 * j));
}

static void b64(const uint8_t *in, size_t n, char *out) {
    static const char T[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
        out[o++] = T[v >> 18 & 63];
        out[o++] = T[v >> 12 & 63];
        out[o++] = i + 1 < n ? T[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? T[v & 63] : '=';
    }
    out[o] = 0;
}

/* ---- connections ---- */
static void conn_close(conn_t *c) {
    if (c->fd < 0) return;
    for (int i = 0; i < c->nchans; i++) {
        chan_t *ch = &channels[c->chans[i]];
        for (int j = 0; j < ch->n; j++)
            if (ch->subs[j] == c) {
                ch->subs[j] = ch->subs[--ch->n]; /* O(1) removal; order among subscribers is free */
                break;
            }
    }
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->closing = 1;
    /* The struct stays allocated (leaked) so a pending dirty-list entry stays valid; this is a
     * benchmark peer whose connections live for one run. */
}

static void mark_dirty(conn_t *c) {
    if (!c->dirty && c->fd >= 0) {
        c->dirty = 1;
        c->next_dirty = dirty;
        dirty = c;
    }
}

static int queue_out(conn_t *c, const uint8_t *p, size_t n) {
    if (c->fd < 0) return -1;
    if (c->out_len - c->out_off + n > OUT_LIMIT) {
        static const uint8_t close4002[] = {0x88, 0x02, 0x0f, 0xa2};
        ssize_t w = send(c->fd, close4002, sizeof close4002, MSG_NOSIGNAL | MSG_DONTWAIT);
        (void)w;
        conn_close(c);
        return -1;
    }
    if (c->out_off && c->out_off == c->out_len) c->out_off = c->out_len = 0;
    if (c->out_len + n > c->out_cap) {
        if (c->out_off) {
            memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
            c->out_len -= c->out_off;
            c->out_off = 0;
        }
        if (c->out_len + n > c->out_cap) {
            c->out_cap = (c->out_len + n) * 2;
            c->out = realloc(c->out, c->out_cap);
            if (!c->out) abort();
        }
    }
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
    mark_dirty(c);
    return 0;
}

static size_t frame_header(uint8_t *h, int op, size_t n) {
    h[0] = (uint8_t)(0x80 | op);
    if (n < 126) return h[1] = (uint8_t)n, 2;
    if (n < 65536) return h[1] = 126, h[2] = (uint8_t)(n >> 8), h[3] = (uint8_t)n, 4;
    h[1] = 127;
    for (int i = 0; i < 8; i++) h[2 + i] = (uint8_t)((uint64_t)n >> (56 - 8 * i));
    return 10;
}

static void send_text(conn_t *c, const char *s, size_t n) {
    uint8_t h[10];
    size_t hl = frame_header(h, 1, n);
    if (queue_out(c, h, hl) == 0) queue_out(c, (const uint8_t *)s, n);
}

static void flush(conn_t *c) {
    if (c->fd < 0) return;
    while (c->out_off < c->out_len) {
        ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            c->out_off += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!c->want_out) {
                struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                c->want_out = 1;
            }
            return;
        }
        conn_close(c);
        return;
    }
    c->out_off = c->out_len = 0;
    if (c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = 0;
    }
}

/* Value of "key": in a JSON object text: points at the value, or NULL. */
static const char *jval(const char *p, const char *end, const char *key) {
    size_t kl = strlen(key);
    while (p < end) {
        const char *k = memmem(p, (size_t)(end - p), key, kl);
        if (!k) return NULL;
        const char *v = k + kl;
        while (v < end && (*v == ' ' || *v == '\t')) v++;
        if (v < end && *v == ':') {
            v++;
            while (v < end && (*v == ' ' || *v == '\t')) v++;
            return v;
        }
        p = k + 1;
    }
    return NULL;
}

/* A JSON string value without escapes (channel names here); length or -1. */
static int jstr(const char *v, const char *end, const char **s) {
    if (!v || v >= end || *v != '"') return -1;
    const char *q = memchr(v + 1, '"', (size_t)(end - v - 1));
    if (!q || memchr(v + 1, '\\', (size_t)(q - v - 1)) || q - v - 1 > 255) return -1;
    *s = v + 1;
    return (int)(q - v - 1);
}

static int channel_id(const char *name, int n) {
    for (int i = 0; i < nchannels; i++)
        if ((int)strlen(channels[i].name) == n && !memcmp(channels[i].name, name, (size_t)n)) return i;
    if (nchannels == MAX_CHANNELS) return -1;
    memcpy(channels[nchannels].name, name, (size_t)n);
    channels[nchannels].name[n] = 0;
    return nchannels++;
}

static void on_text(conn_t *c, const char *p, size_t n) {
    const char *end = p + n, *type, *name;
    const char *tv = jval(p, end, "\"type\"");
    int tl = jstr(tv, end, &type);
    int nl = jstr(jval(p, end, "\"channel\""), end, &name);
    if (tl < 0 || nl < 0) return;
    int id = channel_id(name, nl);
    if (id < 0) return;
    chan_t *ch = &channels[id];
    if (tl == 9 && !memcmp(type, "subscribe", 9)) {
        if (ch->n == ch->cap) {
            ch->cap = ch->cap ? ch->cap * 2 : 64;
            ch->subs = realloc(ch->subs, (size_t)ch->cap * sizeof *ch->subs);
            if (!ch->subs) abort();
        }
        ch->subs[ch->n++] = c;
        c->chans = realloc(c->chans, (size_t)(c->nchans + 1) * sizeof *c->chans);
        if (!c->chans) abort();
        c->chans[c->nchans++] = id;
        char reply[400];
        int rl = snprintf(reply, sizeof reply, "{\"type\":\"subscribed\",\"channel\":\"%s\",\"offset\":%lld}", ch->name,
                          (long long)ch->offset);
        send_text(c, reply, (size_t)rl);
    } else if (tl == 7 && !memcmp(type, "publish", 7)) {
        const char *d = jval(p, end, "\"data\"");
        if (!d) return;
        /* data is the rest of the object up to its closing brace (relay clients put it last). */
        const char *de = end;
        while (de > d && de[-1] != '}') de--;
        if (de <= d) return;
        de--;
        ch->offset++;
        static uint8_t *msg;
        static size_t cap;
        size_t need = (size_t)(de - d) + 400;
        if (need > cap) {
            cap = need * 2;
            msg = realloc(msg, cap);
            if (!msg) abort();
        }
        int hl = snprintf((char *)msg + 10, 380, "{\"type\":\"message\",\"channel\":\"%s\",\"offset\":%lld,\"data\":",
                          ch->name, (long long)ch->offset);
        size_t body = (size_t)hl + (size_t)(de - d) + 1;
        memcpy(msg + 10 + hl, d, (size_t)(de - d));
        msg[10 + body - 1] = '}';
        uint8_t h[10];
        size_t fh = frame_header(h, 1, body);
        memcpy(msg + 10 - fh, h, fh);
        for (int i = ch->n - 1; i >= 0; i--) /* backwards: a closed subscriber swaps in the last one */
            if (i < ch->n) queue_out(ch->subs[i], msg + 10 - fh, fh + body);
    }
}

static void on_frames(conn_t *c) {
    size_t pos = 0;
    while (c->in_len - pos >= 2 && c->fd >= 0) {
        uint8_t *p = c->in + pos;
        int op = p[0] & 15, masked = p[1] & 0x80;
        uint64_t ln = p[1] & 0x7f;
        size_t hl = 2;
        if (ln == 126) {
            if (c->in_len - pos < 4) break;
            ln = (uint64_t)p[2] << 8 | p[3], hl = 4;
        } else if (ln == 127) {
            if (c->in_len - pos < 10) break;
            ln = 0;
            for (int i = 0; i < 8; i++) ln = ln << 8 | p[2 + i];
            hl = 10;
        }
        if (!masked || ln > IN_LIMIT) {
            conn_close(c);
            return;
        }
        if (c->in_len - pos < hl + 4 + ln) break;
        uint8_t *k = p + hl, *pl = p + hl + 4;
        for (uint64_t i = 0; i < ln; i++) pl[i] ^= k[i & 3];
        pos += hl + 4 + ln;
        if (op == 1 || op == 2) on_text(c, (const char *)pl, ln);
        else if (op == 9) {
            uint8_t h[10];
            size_t fh = frame_header(h, 10, ln);
            if (queue_out(c, h, fh) == 0) queue_out(c, pl, ln);
        } else if (op == 8) {
            uint8_t h[4] = {0x88, 0x02, 0x03, 0xe8};
            queue_out(c, h, 4);
            flush(c);
            conn_close(c);
            return;
        }
    }
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
}

static void on_handshake(conn_t *c) {
    char *e = memmem(c->in, c->in_len, "\r\n\r\n", 4);
    if (!e) {
        if (c->in_len > 8192) conn_close(c);
        return;
    }
    *e = 0;
    char *key = strcasestr((char *)c->in, "\r\nSec-WebSocket-Key:");
    if (!key) {
        const char *bad = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        ssize_t w = send(c->fd, bad, strlen(bad), MSG_NOSIGNAL);
        (void)w;
        conn_close(c);
        return;
    }
    key += 20;
    while (*key == ' ') key++;
    char *ke = strstr(key, "\r\n");
    size_t kl = ke ? (size_t)(ke - key) : strlen(key);
    while (kl && key[kl - 1] == ' ') kl--;
    char buf[200];
    if (kl > 100) kl = 100;
    memcpy(buf, key, kl);
    memcpy(buf + kl, "258EAFA5-E914-47DA-95CA-C5AB0DC85B11", 36);
    uint8_t dig[20];
    sha1((uint8_t *)buf, kl + 36, dig);
    char acc[40];
    b64(dig, 20, acc);
    int proto = strcasestr((char *)c->in, "relay.v1.json") != NULL;
    char resp[300];
    int rl = snprintf(resp, sizeof resp,
                      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Accept: %s\r\n%s\r\n",
                      acc, proto ? "Sec-WebSocket-Protocol: relay.v1.json\r\n" : "");
    size_t rest = c->in_len - (size_t)(e + 4 - (char *)c->in);
    memmove(c->in, e + 4, rest);
    c->in_len = rest;
    c->upgraded = 1;
    queue_out(c, (uint8_t *)resp, (size_t)rl);
    on_frames(c);
}

static void on_readable(conn_t *c) {
    for (int iter = 0; iter < 4 && c->fd >= 0; iter++) {
        if (c->in_cap - c->in_len < 65536) {
            c->in_cap = c->in_len + 131072;
            c->in = realloc(c->in, c->in_cap);
            if (!c->in) abort();
        }
        ssize_t r = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (r <= 0) {
            conn_close(c);
            return;
        }
        c->in_len += (size_t)r;
        if (c->upgraded) on_frames(c);
        else on_handshake(c);
        if ((size_t)r < 65536) return;
    }
}

int main(int argc, char **argv) {
    int port = 0;
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
    if (port <= 0 || port > 65535) {
        fprintf(stderr, "usage: cbroadcast --port P\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 4096) < 0) {
        perror("cbroadcast: bind/listen");
        return 1;
    }
    ep = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &lev);
    fprintf(stderr, "cbroadcast listening on ws://127.0.0.1:%d/ws\n", port);
    struct epoll_event evs[1024];
    for (;;) {
        int n = epoll_wait(ep, evs, 1024, -1);
        if (n < 0 && errno != EINTR) {
            perror("cbroadcast: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *nc = calloc(1, sizeof *nc);
                    if (!nc) abort();
                    nc->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            if (c->fd < 0) continue;
            if (evs[i].events & EPOLLOUT) flush(c);
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c);
        }
        /* One send per connection per batch of input. */
        while (dirty) {
            conn_t *c = dirty;
            dirty = c->next_dirty;
            c->dirty = 0;
            flush(c);
        }
    }
}
