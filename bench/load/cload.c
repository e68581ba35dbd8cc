/*
 * cload: the C load generator behind `relay bench` (see bench/load/README.md).
 *
 * Two roles, one binary:
 *
 *   cload sub --port P --conns N [options]
 *       Opens N WebSocket connections to 127.0.0.1:P (or [::1]:P), subscribes each to one
 *       channel, then reads with epoll and large buffers. For every `message` frame it reads
 *       the publisher's timestamp `t` (CLOCK_MONOTONIC ns) and sequence number `s` out of
 *       `data` with a cheap scan (no JSON/msgpack parser), records the publish-to-deliver
 *       latency in a log-linear histogram. From the kernel's receive timestamps
 *       (SO_TIMESTAMPNS, the last segment of each read) it also records how long data waited
 *       in the socket before this process read it (its own share of the latency) and the
 *       latency up to that arrival (what the server and the kernel took, without the load
 *       generator's own queueing). It checks per connection that the server's
 *       `offset` and the publisher's `s` increase by one step with nothing skipped or
 *       repeated. A frame whose payload is an array (a `?tick_ms=N` connection, given with
 *       --path /ws?tick_ms=N) counts as each of its elements; the result counts the frames
 *       that carried messages (msg_frames, msg_frame_bytes with headers) and the array frames
 *       apart. Answers pings, counts close frames by code. Prints one JSON line
 *       {"event":"ready",...} when every connection is subscribed (or failed), measures
 *       from the start signal (a "start" line on stdin, --start-at NS, or --start now) for
 *       at most --duration seconds or until every connection saw the last measured
 *       message, then prints one JSON line {"event":"result",...} and exits (with --hold:
 *       after a "close" line or EOF on stdin, so the caller can look at the server first).
 *
 *   cload pub --port P --rate R --count K [options]
 *       One connection; publishes K messages `{"t":T,"s":S,"p":"xx.."}` on an absolute
 *       schedule (message k is due at start + k/R; a late send does not shift later ones),
 *       `t` read just before each send. Its result includes the most bytes it had sent that the
 *       server had not yet read and acknowledged (SIOCOUTQ, every 64 messages and at the end):
 *       a server that falls behind its publisher shows there first. With --keys N the data also carries a key field
 *       (--key-field, default "symbol") after `s`: "SYM000".."SYM<N-1>", round robin by
 *       sequence number (message S has key S mod N), for channels with conflate_key. Prints {"event":"result",...} with its pacing
 *       error, then lingers (answering pings) until "stop"/EOF on stdin or --linger S.
 *
 * Loopback only: the host must be 127.0.0.1 or ::1. Every phase has a time limit.
 * Linux only (epoll, CLOCK_MONOTONIC shared by all processes). Build: cc -O2 -pthread.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/sockios.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CLOAD_VERSION "2"
#define MAX_FRAME_BYTES (64u << 20)   /* a server frame larger than this ends the connection */
#define MAX_HANDSHAKE_BYTES 16384
#define MIN_READ 65536
#define MAX_ERRORS 8
#define MAX_CLOSE_CODE 5000
#define TL_BUCKET_NS 50000000LL /* latency timeline: 50 ms buckets of publish time */
#define TL_BUCKETS 1200

/* ---------------------------------------------------------------- small helpers */

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double tv_s(struct timeval tv) { return (double)tv.tv_sec + tv.tv_usec / 1e6; }

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("cload: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) die("out of memory (%zu bytes)", n);
    return p;
}

static void *xrealloc(void *p, size_t n) {
    p = realloc(p, n ? n : 1);
    if (!p) die("out of memory (%zu bytes)", n);
    return p;
}

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static void b64_16(const uint8_t in[16], char out[25]) {
    int o = 0;
    for (int i = 0; i < 15; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = B64[v >> 18 & 63];
        out[o++] = B64[v >> 12 & 63];
        out[o++] = B64[v >> 6 & 63];
        out[o++] = B64[v & 63];
    }
    uint32_t v = (uint32_t)in[15] << 16;
    out[o++] = B64[v >> 18 & 63];
    out[o++] = B64[v >> 12 & 63];
    out[o++] = '=';
    out[o++] = '=';
    out[o] = 0;
}

/* JSON string escaping for the few free-text fields we print (error samples). */
static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
        else if (ch < 0x20 || ch >= 0x7f) fprintf(f, "\\u%04x", ch);
        else fputc(ch, f);
    }
    fputc('"', f);
}

/* Printable copy of raw bytes, for error samples. */
static void printable(char *out, size_t cap, const uint8_t *p, size_t n) {
    size_t o = 0;
    for (size_t i = 0; i < n && o + 1 < cap; i++) out[o++] = (p[i] >= 0x20 && p[i] < 0x7f) ? (char)p[i] : '.';
    out[o] = 0;
}

/* ---------------------------------------------------------------- histogram */
/* Log-linear (HDR-like): values below 256 exact, then 128 sub-buckets per power of two, so a
 * bucket's width is at most 1/128 of its value (0.8%). Values are nanoseconds. */
#define HSUB_BITS 8
#define HSUB (1u << HSUB_BITS)
#define HHALF (HSUB / 2)
#define HBUCKETS (HSUB + (64 - HSUB_BITS) * HHALF)

typedef struct {
    uint64_t b[HBUCKETS];
    uint64_t count, sum, min, max;
} hist_t;

static inline int hidx(uint64_t v) {
    if (v < HSUB) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - HSUB_BITS + 1;
    return (int)(HSUB + (uint32_t)(shift - 1) * HHALF + (uint32_t)((v >> shift) - HHALF));
}

static uint64_t hupper(int idx) {
    if (idx < (int)HSUB) return (uint64_t)idx;
    int j = idx - (int)HSUB;
    int shift = j / (int)HHALF + 1;
    uint64_t m = (uint64_t)(j % (int)HHALF) + HHALF;
    return ((m + 1) << shift) - 1;
}

static inline void hrec(hist_t *h, uint64_t v) {
    h->b[hidx(v)]++;
    h->count++;
    h->sum += v;
    if (v > h->max) h->max = v;
    if (h->count == 1 || v < h->min) h->min = v;
}

static void hmerge(hist_t *into, const hist_t *h) {
    if (!h->count) return;
    for (int i = 0; i < (int)HBUCKETS; i++) into->b[i] += h->b[i];
    if (!into->count || h->min < into->min) into->min = h->min;
    if (h->max > into->max) into->max = h->max;
    into->count += h->count;
    into->sum += h->sum;
}

/* Nearest-rank percentile, reported as the bucket's upper bound (never above the max seen). */
static uint64_t hpct(const hist_t *h, double q) {
    if (!h->count) return 0;
    uint64_t rank = (uint64_t)((q / 100.0) * (double)h->count + 0.999999999);
    if (rank < 1) rank = 1;
    uint64_t cum = 0;
    for (int i = 0; i < (int)HBUCKETS; i++) {
        cum += h->b[i];
        if (cum >= rank) {
            uint64_t v = hupper(i);
            if (v > h->max) v = h->max;
            if (v < h->min) v = h->min;
            return v;
        }
    }
    return h->max;
}

static void hprint(FILE *f, const char *name, const hist_t *h) {
    fprintf(f, "\"%s\":{\"count\":%" PRIu64, name, h->count);
    if (h->count) {
        fprintf(f, ",\"min\":%.1f,\"mean\":%.1f,\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"p99.9\":%.1f,\"max\":%.1f",
                h->min / 1e3, (double)h->sum / (double)h->count / 1e3, hpct(h, 50) / 1e3, hpct(h, 90) / 1e3,
                hpct(h, 99) / 1e3, hpct(h, 99.9) / 1e3, h->max / 1e3);
    }
    fputc('}', f);
}

/* Sparse buckets [[upper_ns, count], ...] so that several processes can be merged exactly. */
static void hprint_buckets(FILE *f, const char *name, const hist_t *h) {
    fprintf(f, "\"%s\":[", name);
    int first = 1;
    for (int i = 0; i < (int)HBUCKETS; i++) {
        if (!h->b[i]) continue;
        fprintf(f, "%s[%" PRIu64 ",%" PRIu64 "]", first ? "" : ",", hupper(i), h->b[i]);
        first = 0;
    }
    fputc(']', f);
}

/* ---------------------------------------------------------------- options */

typedef struct {
    const char *role;
    const char *host;
    int port;
    const char *path;
    int msgpack;
    const char *prefix;
    int channels;
    /* sub */
    int conns, threads, index_base, inflight, subscribe, hold;
    int64_t first_seq, last_seq; /* measured window, inclusive; last_seq < 0: no window (idle) */
    double duration, connect_timeout;
    int64_t start_at;            /* CLOCK_MONOTONIC ns; 0 = wait for the start signal */
    int start_now;
    size_t read_buffer;
    double batch_us; /* at most one epoll round per batch_us (0: wake up for every event) */
    int rx_timestamps; /* SO_TIMESTAMPNS: how long data waited in the socket before we read it */
    /* pub */
    double rate, linger, late_limit;
    int64_t count, measure_from, seq0;
    int payload_bytes;
    int keys;              /* > 0: add a key field, round robin over this many values */
    const char *key_field;
} opts_t;

static opts_t O = {
    .host = "127.0.0.1", .port = 0, .path = "/ws", .msgpack = 0, .prefix = "bench.", .channels = 1,
    .conns = 1, .threads = 1, .index_base = 0, .inflight = 256, .subscribe = 1, .hold = 0,
    .first_seq = 0, .last_seq = -1, .duration = 60, .connect_timeout = 60, .start_at = 0, .start_now = 0,
    .read_buffer = 1 << 20, .batch_us = 0, .rx_timestamps = 1, .rate = 1000, .linger = 10, .late_limit = 2.0, .count = 0, .measure_from = 0,
    .seq0 = 0, .payload_bytes = 64, .keys = 0, .key_field = "symbol",
};

static struct sockaddr_storage g_addr;
static socklen_t g_addrlen;
static char g_hostport[80];

static void usage(void) {
    fputs(
        "usage: cload sub --port P [--host 127.0.0.1|::1] [--path /ws] [--encoding json|msgpack]\n"
        "                 [--conns N] [--threads T] [--channels C] [--prefix bench.] [--index-base I]\n"
        "                 [--first-seq A --last-seq B] [--duration S] [--start stdin|now|NS]\n"
        "                 [--connect-timeout S] [--inflight K] [--no-subscribe] [--hold] [--read-buffer BYTES]\n"
        "                 [--batch-us US] [--no-rx-timestamps]\n"
        "       cload pub --port P --rate R --count K [--seq0 S0] [--measure-from K0] [--start now|NS]\n"
        "                 [--payload-bytes B] [--channels C] [--prefix bench.] [--linger S] [--late-limit S]\n"
        "                 [--keys N [--key-field symbol]]\n",
        stderr);
    exit(2);
}

static double parse_num(const char *name, const char *v, double lo, double hi) {
    char *end;
    errno = 0;
    double d = strtod(v, &end);
    if (errno || end == v || *end || d < lo || d > hi) die("%s: %s is not a number from %g to %g", name, v, lo, hi);
    return d;
}

static void parse_args(int argc, char **argv) {
    if (argc < 2) usage();
    O.role = argv[1];
    if (strcmp(O.role, "sub") && strcmp(O.role, "pub")) usage();
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
#define NEXT() (i + 1 < argc ? argv[++i] : (die("%s needs a value", a), ""))
        if (!strcmp(a, "--host")) O.host = NEXT();
        else if (!strcmp(a, "--port")) O.port = (int)parse_num(a, NEXT(), 1, 65535);
        else if (!strcmp(a, "--path")) O.path = NEXT();
        else if (!strcmp(a, "--encoding")) {
            const char *v = NEXT();
            if (!strcmp(v, "json")) O.msgpack = 0;
            else if (!strcmp(v, "msgpack")) O.msgpack = 1;
            else die("--encoding: json or msgpack, not %s", v);
        } else if (!strcmp(a, "--prefix")) O.prefix = NEXT();
        else if (!strcmp(a, "--channels")) O.channels = (int)parse_num(a, NEXT(), 1, 1e6);
        else if (!strcmp(a, "--conns")) O.conns = (int)parse_num(a, NEXT(), 1, 1e6);
        else if (!strcmp(a, "--threads")) O.threads = (int)parse_num(a, NEXT(), 1, 256);
        else if (!strcmp(a, "--index-base")) O.index_base = (int)parse_num(a, NEXT(), 0, 1e9);
        else if (!strcmp(a, "--inflight")) O.inflight = (int)parse_num(a, NEXT(), 1, 1e6);
        else if (!strcmp(a, "--no-subscribe")) O.subscribe = 0;
        else if (!strcmp(a, "--hold")) O.hold = 1;
        else if (!strcmp(a, "--first-seq")) O.first_seq = (int64_t)parse_num(a, NEXT(), 0, 9e15);
        else if (!strcmp(a, "--last-seq")) O.last_seq = (int64_t)parse_num(a, NEXT(), -1, 9e15);
        else if (!strcmp(a, "--duration")) O.duration = parse_num(a, NEXT(), 0, 3600);
        else if (!strcmp(a, "--connect-timeout")) O.connect_timeout = parse_num(a, NEXT(), 0.1, 3600);
        else if (!strcmp(a, "--read-buffer")) O.read_buffer = (size_t)parse_num(a, NEXT(), 4096, 1 << 30);
        else if (!strcmp(a, "--batch-us")) O.batch_us = parse_num(a, NEXT(), 0, 100000);
        else if (!strcmp(a, "--no-rx-timestamps")) O.rx_timestamps = 0;
        else if (!strcmp(a, "--start")) {
            const char *v = NEXT();
            if (!strcmp(v, "now")) O.start_now = 1;
            else if (!strcmp(v, "stdin")) O.start_now = 0, O.start_at = 0;
            else O.start_at = (int64_t)parse_num(a, v, 1, 9.2e18);
        } else if (!strcmp(a, "--rate")) O.rate = parse_num(a, NEXT(), 0.001, 1e7);
        else if (!strcmp(a, "--count")) O.count = (int64_t)parse_num(a, NEXT(), 0, 1e10);
        else if (!strcmp(a, "--seq0")) O.seq0 = (int64_t)parse_num(a, NEXT(), 0, 9e15);
        else if (!strcmp(a, "--measure-from")) O.measure_from = (int64_t)parse_num(a, NEXT(), 0, 1e10);
        else if (!strcmp(a, "--payload-bytes")) O.payload_bytes = (int)parse_num(a, NEXT(), 0, 1 << 24);
        else if (!strcmp(a, "--keys")) O.keys = (int)parse_num(a, NEXT(), 0, 1e6);
        else if (!strcmp(a, "--key-field")) O.key_field = NEXT();
        else if (!strcmp(a, "--linger")) O.linger = parse_num(a, NEXT(), 0, 3600);
        else if (!strcmp(a, "--late-limit")) O.late_limit = parse_num(a, NEXT(), 0, 3600);
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) usage();
        else die("unknown option %s (try --help)", a);
#undef NEXT
    }
    if (!O.port) die("--port is required");
    memset(&g_addr, 0, sizeof g_addr);
    if (!strcmp(O.host, "127.0.0.1") || !strcmp(O.host, "localhost")) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&g_addr;
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)O.port);
        inet_pton(AF_INET, "127.0.0.1", &s4->sin_addr);
        g_addrlen = sizeof *s4;
        snprintf(g_hostport, sizeof g_hostport, "127.0.0.1:%d", O.port);
    } else if (!strcmp(O.host, "::1") || !strcmp(O.host, "[::1]")) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&g_addr;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)O.port);
        inet_pton(AF_INET6, "::1", &s6->sin6_addr);
        g_addrlen = sizeof *s6;
        snprintf(g_hostport, sizeof g_hostport, "[::1]:%d", O.port);
    } else {
        die("refusing to target %s: only 127.0.0.1 or ::1 (loopback)", O.host);
    }
    if (strlen(O.prefix) > 200) die("--prefix is too long");
    if (!O.key_field[0] || strlen(O.key_field) > 31 || strpbrk(O.key_field, "\"\\"))
        die("--key-field must be 1 to 31 characters without quotes or backslashes");
    if (O.path[0] != '/' || strlen(O.path) > 1000 || strpbrk(O.path, " \r\n")) die("--path must look like /ws");
}

/* ---------------------------------------------------------------- WebSocket client bits */

static int upgrade_request(char *out, size_t cap, uint64_t *rng) {
    uint8_t key[16];
    for (int i = 0; i < 16; i += 8) {
        uint64_t r = xorshift(rng);
        memcpy(key + i, &r, 8);
    }
    char k64[25];
    b64_16(key, k64);
    return snprintf(out, cap,
                    "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: %s\r\n\r\n",
                    O.path, g_hostport, k64, O.msgpack ? "relay.v1.msgpack" : "relay.v1.json");
}

/* Write one final, masked client frame; return its length. `out` needs n + 14 bytes. */
static size_t ws_frame(uint8_t *out, int opcode, const uint8_t *payload, size_t n, uint32_t key) {
    size_t h = 0;
    out[h++] = (uint8_t)(0x80 | opcode);
    if (n < 126) {
        out[h++] = (uint8_t)(0x80 | n);
    } else if (n < 65536) {
        out[h++] = 0x80 | 126;
        out[h++] = (uint8_t)(n >> 8);
        out[h++] = (uint8_t)n;
    } else {
        out[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--) out[h++] = (uint8_t)((uint64_t)n >> (8 * i));
    }
    uint8_t k[4];
    memcpy(k, &key, 4);
    memcpy(out + h, k, 4);
    h += 4;
    for (size_t i = 0; i < n; i++) out[h + i] = payload[i] ^ k[i & 3];
    return h + n;
}

/* Encode {"type":"subscribe","channel":"<prefix><ch>"} (or the msgpack map); return length. */
static size_t subscribe_payload(uint8_t *out, int ch) {
    char name[256];
    int nl = snprintf(name, sizeof name, "%s%d", O.prefix, ch);
    if (!O.msgpack) return (size_t)sprintf((char *)out, "{\"type\":\"subscribe\",\"channel\":\"%s\"}", name);
    size_t o = 0;
    memcpy(out, "\x82\xa4type\xa9subscribe\xa7" "channel", 24);
    o = 24;
    if (nl < 32) out[o++] = (uint8_t)(0xa0 | nl);
    else out[o++] = 0xd9, out[o++] = (uint8_t)nl;
    memcpy(out + o, name, (size_t)nl);
    return o + (size_t)nl;
}

/* Send everything or fail (non-blocking socket; waits with poll up to `ms`). */
static int send_all(int fd, const uint8_t *p, size_t n, int ms, int64_t *blocked_ns) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd pf = {.fd = fd, .events = POLLOUT};
            int64_t t0 = mono_ns();
            int r = poll(&pf, 1, ms);
            if (blocked_ns) *blocked_ns += mono_ns() - t0;
            if (r <= 0) return -1;
            continue;
        }
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- cheap scanners */

/* Find `"key"` then optional spaces and ':'; return a pointer to the value, or NULL. */
static const uint8_t *json_val(const uint8_t *p, const uint8_t *end, const char *key, size_t klen) {
    while (p < end) {
        const uint8_t *k = memmem(p, (size_t)(end - p), key, klen);
        if (!k) return NULL;
        const uint8_t *v = k + klen;
        while (v < end && (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r')) v++;
        if (v < end && *v == ':') {
            v++;
            while (v < end && (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r')) v++;
            return v;
        }
        p = k + 1;
    }
    return NULL;
}

static int64_t json_uint(const uint8_t *v, const uint8_t *end) {
    if (!v || v >= end || *v < '0' || *v > '9') return -1;
    int64_t x = 0;
    while (v < end && *v >= '0' && *v <= '9' && x < 922337203685477580LL) x = x * 10 + (*v++ - '0');
    return x;
}

/* Read a msgpack non-negative integer at *pp (advancing it); -1 if it is not one. */
static int64_t mp_uint(const uint8_t **pp, const uint8_t *end) {
    const uint8_t *p = *pp;
    if (p >= end) return -1;
    uint8_t b = *p++;
    int64_t v;
    int n;
    if (b < 0x80) {
        *pp = p;
        return b;
    }
    switch (b) {
    case 0xcc: n = 1; break;
    case 0xcd: n = 2; break;
    case 0xce: n = 4; break;
    case 0xcf: n = 8; break;
    case 0xd0: n = 1; break;
    case 0xd1: n = 2; break;
    case 0xd2: n = 4; break;
    case 0xd3: n = 8; break;
    default: return -1;
    }
    if (end - p < n) return -1;
    uint64_t u = 0;
    for (int i = 0; i < n; i++) u = u << 8 | p[i];
    if (b >= 0xd0 && (p[0] & 0x80)) return -1; /* negative */
    v = (int64_t)(u & 0x7fffffffffffffffULL);
    *pp = p + n;
    return v;
}

/* ---------------------------------------------------------------- subscriber role */

enum { CS_NEW, CS_CONNECTING, CS_UPGRADING, CS_SUBSCRIBING, CS_ACTIVE, CS_CLOSED, CS_FAILED };

typedef struct {
    int fd, state, ch, done, finished;
    uint8_t *buf; /* handshake bytes, or the unparsed tail of the stream (a partial frame) */
    uint32_t len, cap;
    uint8_t *frag; /* a fragmented message being put together */
    uint32_t flen, fcap;
    size_t need; /* bytes the partial frame in buf needs in total */
    int64_t last_off, last_seq, last_expected, expected, received, max_window_seq;
    int64_t connect_start;
} conn_t;

typedef struct {
    int id, ep, n;
    conn_t *conns;
    uint8_t *rb;
    size_t rbcap;
    uint64_t rng;
    int inflight_cap, pending, next;
    int connect_done; /* read by main */
    int n_active, n_failed, n_done, n_dead, n_finished; /* read by main */
    hist_t lat, rdelay, arrival;
    int64_t read_arrival; /* CLOCK_MONOTONIC ns the last byte of the current read reached the socket; 0 = unknown */
    uint64_t deliveries_all, deliveries_window, off_gap_events, off_missing, out_of_order, seq_gap_events,
        seq_missing, duplicates, gap_msgs, err_msgs, other_msgs, unparsed, pings, pongs_dropped, eof, resets,
        closes_total, protocol_errors, bytes, reads, frames, clock_anomalies, rounds,
        msg_frames, msg_frame_bytes, array_frames;
    uint32_t closes[MAX_CLOSE_CODE + 1]; /* index MAX_CLOSE_CODE: any code above */
    int64_t first_ns, last_ns;
    uint64_t tl_max[TL_BUCKETS], tl_sum[TL_BUCKETS], tl_n[TL_BUCKETS];
    double connect_s_max;
    int nerr;
    char errs[MAX_ERRORS][240];
    pthread_t th;
} thr_t;

static thr_t *T;
static volatile int64_t g_tl_origin; /* publish time of timeline bucket 0 (the start signal) */
static int64_t g_real_minus_mono; /* CLOCK_REALTIME - CLOCK_MONOTONIC, for kernel receive timestamps */

static void clock_offset(void) {
    int64_t best = INT64_MAX;
    for (int i = 0; i < 5; i++) {
        struct timespec r;
        int64_t m0 = mono_ns();
        clock_gettime(CLOCK_REALTIME, &r);
        int64_t m1 = mono_ns();
        if (m1 - m0 < best) {
            best = m1 - m0;
            g_real_minus_mono = (int64_t)r.tv_sec * 1000000000LL + r.tv_nsec - (m0 + m1) / 2;
        }
    }
}
static volatile int g_stop;            /* main -> threads: stop reading */
static volatile int64_t g_connect_deadline;

static void terr(thr_t *t, const char *fmt, ...) {
    if (t->nerr >= MAX_ERRORS) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->errs[t->nerr++], sizeof t->errs[0], fmt, ap);
    va_end(ap);
}

static void conn_handshake_over(thr_t *t, conn_t *c) {
    (void)c;
    t->pending--;
}

/* A connection is finished once it saw its channel's last measured message, or ended. */
static void conn_finished(thr_t *t, conn_t *c) {
    if (c->finished) return;
    c->finished = 1;
    __atomic_add_fetch(&t->n_finished, 1, __ATOMIC_RELAXED);
}

static void conn_end(thr_t *t, conn_t *c, int failed) {
    int was = c->state;
    if (was == CS_CLOSED || was == CS_FAILED) return;
    if (c->fd >= 0) {
        epoll_ctl(t->ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    if (was == CS_CONNECTING || was == CS_UPGRADING || was == CS_SUBSCRIBING) {
        conn_handshake_over(t, c);
        failed = 1;
    }
    if (failed && was != CS_ACTIVE) {
        c->state = CS_FAILED;
        __atomic_add_fetch(&t->n_failed, 1, __ATOMIC_RELAXED);
    } else {
        c->state = CS_CLOSED;
        __atomic_add_fetch(&t->n_dead, 1, __ATOMIC_RELAXED);
    }
    conn_finished(t, c);
}

static void conn_start(thr_t *t, conn_t *c) {
    c->connect_start = mono_ns();
    c->fd = socket(g_addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    t->pending++;
    c->state = CS_CONNECTING;
    if (c->fd < 0) {
        terr(t, "socket: %s", strerror(errno));
        conn_end(t, c, 1);
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (O.rx_timestamps) setsockopt(c->fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one);
    int r = connect(c->fd, (struct sockaddr *)&g_addr, g_addrlen);
    if (r < 0 && errno != EINPROGRESS) {
        terr(t, "connect: %s", strerror(errno));
        conn_end(t, c, 1);
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(t->ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
        terr(t, "epoll_ctl: %s", strerror(errno));
        conn_end(t, c, 1);
    }
}

static void buf_put(conn_t *c, const uint8_t *p, size_t n) {
    if (n > c->cap) {
        c->cap = (uint32_t)(n < 256 ? 256 : n + n / 2);
        c->buf = xrealloc(c->buf, c->cap);
    }
    if (n) memmove(c->buf, p, n);
    c->len = (uint32_t)n;
}

static void send_control(thr_t *t, conn_t *c, int op, const uint8_t *p, size_t n) {
    uint8_t fr[160];
    if (n > 125) n = 125;
    size_t fl = ws_frame(fr, op, p, n, (uint32_t)xorshift(&t->rng));
    ssize_t w = send(c->fd, fr, fl, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w != (ssize_t)fl) t->pongs_dropped++;
}

static void on_delivery(thr_t *t, conn_t *c, int64_t off, int64_t seq, int64_t ts, int64_t now) {
    if (off >= 0) {
        if (c->last_off >= 0) {
            if (off > c->last_off + 1) {
                t->off_gap_events++;
                t->off_missing += (uint64_t)(off - c->last_off - 1);
            } else if (off <= c->last_off) {
                t->out_of_order++;
            }
        }
        if (off > c->last_off) c->last_off = off;
    }
    if (c->last_seq >= 0) {
        if (seq <= c->last_seq) {
            t->duplicates++; /* repeated or older than one already counted: never counted twice */
            return;
        }
        if (seq != c->last_seq + O.channels) {
            t->seq_gap_events++;
            t->seq_missing += (uint64_t)((seq - c->last_seq) / O.channels - 1);
        }
    }
    c->last_seq = seq;
    t->deliveries_all++;
    if (O.last_seq >= 0 && seq >= O.first_seq && seq <= O.last_seq) {
        int64_t d = now - ts;
        if (d < 0) {
            t->clock_anomalies++;
            d = 0;
        }
        hrec(&t->lat, (uint64_t)d);
        int64_t origin = g_tl_origin;
        if (origin && ts >= origin && (ts - origin) / TL_BUCKET_NS < TL_BUCKETS) {
            int64_t b = (ts - origin) / TL_BUCKET_NS;
            if ((uint64_t)d > t->tl_max[b]) t->tl_max[b] = (uint64_t)d;
            t->tl_sum[b] += (uint64_t)d;
            t->tl_n[b]++;
        }
        if (t->read_arrival) {
            hrec(&t->rdelay, (uint64_t)(now > t->read_arrival ? now - t->read_arrival : 0));
            hrec(&t->arrival, (uint64_t)(t->read_arrival > ts ? t->read_arrival - ts : 0));
        }
        c->received++;
        t->deliveries_window++;
        if (seq > c->max_window_seq) c->max_window_seq = seq;
        if (!t->first_ns || now < t->first_ns) t->first_ns = now;
        if (now > t->last_ns) t->last_ns = now;
    }
    if (!c->done && O.last_seq >= 0 && seq >= c->last_expected) {
        c->done = 1;
        __atomic_add_fetch(&t->n_done, 1, __ATOMIC_RELAXED);
        conn_finished(t, c);
    }
}

static void on_subscribed(thr_t *t, conn_t *c) {
    if (c->state != CS_SUBSCRIBING) return;
    c->state = CS_ACTIVE;
    conn_handshake_over(t, c);
    double s = (mono_ns() - c->connect_start) / 1e9;
    if (s > t->connect_s_max) t->connect_s_max = s;
    __atomic_add_fetch(&t->n_active, 1, __ATOMIC_RELAXED);
}

static void sample_msg(thr_t *t, const char *what, const uint8_t *p, size_t n) {
    if (t->nerr >= MAX_ERRORS) return;
    char pr[200];
    printable(pr, sizeof pr, p, n);
    terr(t, "%s: %s", what, pr);
}

static void on_message(thr_t *t, conn_t *c, const uint8_t *p, size_t n, int64_t now) {
    const uint8_t *end = p + n;
    if (!O.msgpack) {
        const uint8_t *v = json_val(p, p + (n < 64 ? n : 64), "\"type\"", 6);
        if (v && end - v >= 9 && !memcmp(v, "\"message\"", 9)) {
            int64_t off = json_uint(json_val(p, end, "\"offset\"", 8), end);
            const uint8_t *d = json_val(p, end, "\"data\"", 6);
            int64_t ts = d ? json_uint(json_val(d, end, "\"t\"", 3), end) : -1;
            int64_t seq = d ? json_uint(json_val(d, end, "\"s\"", 3), end) : -1;
            if (ts < 0 || seq < 0) {
                t->unparsed++;
                sample_msg(t, "message without t/s", p, n);
                return;
            }
            on_delivery(t, c, off, seq, ts, now);
        } else if (v && end - v >= 12 && !memcmp(v, "\"subscribed\"", 12)) {
            on_subscribed(t, c);
        } else if (v && end - v >= 5 && !memcmp(v, "\"gap\"", 5)) {
            t->gap_msgs++;
            sample_msg(t, "gap", p, n);
        } else if (v && end - v >= 7 && !memcmp(v, "\"error\"", 7)) {
            t->err_msgs++;
            sample_msg(t, "error", p, n);
        } else {
            t->other_msgs++;
        }
        return;
    }
    const uint8_t *k = memmem(p, n < 48 ? n : 48, "\xa4type", 5);
    if (!k) {
        t->other_msgs++;
        return;
    }
    const uint8_t *v = k + 5;
    if (end - v >= 8 && !memcmp(v, "\xa7message", 8)) {
        int64_t off = -1, ts = -1, seq = -1;
        const uint8_t *o = memmem(p, n, "\xa6offset", 7);
        if (o) {
            o += 7;
            off = mp_uint(&o, end);
        }
        const uint8_t *d = memmem(p, n, "\xa4" "data", 5);
        if (d) {
            d += 5;
            /* The publisher's fixed layout: {"t": uint, "s": uint, "p": str}. */
            if (d < end && ((*d & 0xf0) == 0x80 || *d == 0xde)) d += (*d == 0xde) ? 3 : 1;
            if (end - d >= 2 && d[0] == 0xa1 && d[1] == 't') {
                d += 2;
                ts = mp_uint(&d, end);
            }
            if (end - d >= 2 && d[0] == 0xa1 && d[1] == 's') {
                d += 2;
                seq = mp_uint(&d, end);
            }
        }
        if (ts < 0 || seq < 0) {
            t->unparsed++;
            sample_msg(t, "message without t/s", p, n);
            return;
        }
        on_delivery(t, c, off, seq, ts, now);
    } else if (end - v >= 11 && !memcmp(v, "\xaasubscribed", 11)) {
        on_subscribed(t, c);
    } else if (end - v >= 4 && !memcmp(v, "\xa3gap", 4)) {
        t->gap_msgs++;
        sample_msg(t, "gap", p, n);
    } else if (end - v >= 6 && !memcmp(v, "\xa5" "error", 6)) {
        t->err_msgs++;
        sample_msg(t, "error", p, n);
    } else {
        t->other_msgs++;
    }
}

/* Skip one msgpack object at p; return the byte after it, or NULL if malformed or truncated. */
static const uint8_t *mp_skip(const uint8_t *p, const uint8_t *end, int depth) {
    if (p >= end || depth > 64) return NULL;
    uint8_t b = *p++;
    uint64_t n = 0, items = 0;
    if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) return p;
    if ((b & 0xf0) == 0x80) items = 2 * (uint64_t)(b & 0x0f);
    else if ((b & 0xf0) == 0x90) items = b & 0x0f;
    else if ((b & 0xe0) == 0xa0) n = b & 0x1f;
    else {
        int w;
        switch (b) {
        case 0xcc: case 0xd0: return end - p >= 1 ? p + 1 : NULL;
        case 0xcd: case 0xd1: return end - p >= 2 ? p + 2 : NULL;
        case 0xca: case 0xce: case 0xd2: return end - p >= 4 ? p + 4 : NULL;
        case 0xcb: case 0xcf: case 0xd3: return end - p >= 8 ? p + 8 : NULL;
        case 0xd4: return end - p >= 2 ? p + 2 : NULL;
        case 0xd5: return end - p >= 3 ? p + 3 : NULL;
        case 0xd6: return end - p >= 5 ? p + 5 : NULL;
        case 0xd7: return end - p >= 9 ? p + 9 : NULL;
        case 0xd8: return end - p >= 17 ? p + 17 : NULL;
        case 0xc4: case 0xd9: w = 1; break;
        case 0xc5: case 0xda: w = 2; break;
        case 0xc6: case 0xdb: w = 4; break;
        case 0xc7: w = -1; break;
        case 0xc8: w = -2; break;
        case 0xc9: w = -4; break;
        case 0xdc: w = 12; break;
        case 0xdd: w = 14; break;
        case 0xde: w = 22; break;
        case 0xdf: w = 24; break;
        default: return NULL;
        }
        int bytes = w < 0 ? -w : w % 10, kind = w < 0 ? 3 : w / 10; /* 0 str/bin, 1 array, 2 map, 3 ext */
        if (end - p < bytes) return NULL;
        uint64_t len = 0;
        for (int i = 0; i < bytes; i++) len = len << 8 | p[i];
        p += bytes;
        if (kind == 0) n = len;
        else if (kind == 3) n = len + 1; /* type byte, then the data */
        else items = kind == 1 ? len : 2 * len;
    }
    if (n) return (uint64_t)(end - p) >= n ? p + n : NULL;
    for (uint64_t i = 0; i < items; i++) {
        p = mp_skip(p, end, depth + 1);
        if (!p) return NULL;
    }
    return p;
}

/* A data frame's payload: one message, or (on a ?tick_ms= connection) an array of them. */
static void on_payload(thr_t *t, conn_t *c, const uint8_t *p, size_t n, int64_t now) {
    const uint8_t *end = p + n;
    if (!O.msgpack) {
        const uint8_t *q = p;
        while (q < end && (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r')) q++;
        if (q >= end || *q != '[') {
            on_message(t, c, p, n, now);
            return;
        }
        t->array_frames++;
        q++;
        for (;;) { /* the elements are objects: split them at depth 0, minding strings */
            while (q < end && (*q == ' ' || *q == ',' || *q == '\t' || *q == '\n' || *q == '\r')) q++;
            if (q >= end || *q == ']') return;
            if (*q != '{') {
                t->unparsed++;
                sample_msg(t, "array element that is not an object", q, (size_t)(end - q));
                return;
            }
            const uint8_t *s = q;
            int depth = 0, instr = 0;
            for (; q < end; q++) {
                uint8_t ch = *q;
                if (instr) {
                    if (ch == '\\') q++;
                    else if (ch == '"') instr = 0;
                } else if (ch == '"') instr = 1;
                else if (ch == '{' || ch == '[') depth++;
                else if ((ch == '}' || ch == ']') && --depth == 0) break;
            }
            if (q >= end) {
                t->unparsed++;
                sample_msg(t, "unterminated array element", s, (size_t)(end - s));
                return;
            }
            q++;
            on_message(t, c, s, (size_t)(q - s), now);
        }
    }
    uint64_t items;
    const uint8_t *q = p;
    if (n && (*q & 0xf0) == 0x90) {
        items = *q & 0x0f;
        q++;
    } else if (n >= 3 && *q == 0xdc) {
        items = (uint64_t)q[1] << 8 | q[2];
        q += 3;
    } else if (n >= 5 && *q == 0xdd) {
        items = (uint64_t)q[1] << 24 | (uint64_t)q[2] << 16 | (uint64_t)q[3] << 8 | q[4];
        q += 5;
    } else {
        on_message(t, c, p, n, now);
        return;
    }
    t->array_frames++;
    for (uint64_t i = 0; i < items; i++) {
        const uint8_t *e = mp_skip(q, end, 0);
        if (!e) {
            t->unparsed++;
            sample_msg(t, "malformed msgpack array element", q, (size_t)(end - q));
            return;
        }
        on_message(t, c, q, (size_t)(e - q), now);
        q = e;
    }
}

/* Parse whole frames from p[0..n); return the bytes consumed. The connection may end. */
static size_t parse_frames(thr_t *t, conn_t *c, const uint8_t *p, size_t n, int64_t now) {
    size_t pos = 0;
    c->need = 0;
    while (n - pos >= 2) {
        uint8_t b0 = p[pos], b1 = p[pos + 1];
        if (b1 & 0x80) {
            t->protocol_errors++;
            terr(t, "masked frame from the server");
            conn_end(t, c, 0);
            return pos;
        }
        uint64_t ln = b1 & 0x7f;
        size_t hl = 2;
        if (ln == 126) {
            if (n - pos < 4) break;
            ln = (uint64_t)p[pos + 2] << 8 | p[pos + 3];
            hl = 4;
        } else if (ln == 127) {
            if (n - pos < 10) break;
            ln = 0;
            for (int i = 0; i < 8; i++) ln = ln << 8 | p[pos + 2 + i];
            hl = 10;
            if (ln > MAX_FRAME_BYTES) {
                t->protocol_errors++;
                terr(t, "server frame of %" PRIu64 " bytes exceeds %u", ln, MAX_FRAME_BYTES);
                conn_end(t, c, 0);
                return pos;
            }
        }
        if (n - pos - hl < ln) {
            c->need = hl + ln;
            break;
        }
        const uint8_t *pl = p + pos + hl;
        int op = b0 & 0x0f, fin = b0 & 0x80;
        pos += hl + ln;
        t->frames++;
        if (op & 0x8) {
            if (op == 0x9) {
                t->pings++;
                send_control(t, c, 0xA, pl, ln);
            } else if (op == 0x8) {
                int code = ln >= 2 ? (pl[0] << 8 | pl[1]) : 1005;
                t->closes_total++;
                t->closes[code < MAX_CLOSE_CODE ? code : MAX_CLOSE_CODE]++;
                if (ln > 2) sample_msg(t, "close reason", pl + 2, ln - 2);
                uint8_t echo[2] = {(uint8_t)(code >> 8), (uint8_t)code};
                send_control(t, c, 0x8, echo, code == 1005 ? 0 : 2);
                conn_end(t, c, 0);
                return pos;
            }
            continue; /* pong */
        }
        if (op == 0 || !fin) { /* fragmented message: rare; put it together */
            if (op != 0) c->flen = 0;
            if (c->flen + ln > MAX_FRAME_BYTES) {
                t->protocol_errors++;
                terr(t, "fragmented message too large");
                conn_end(t, c, 0);
                return pos;
            }
            if (c->flen + ln > c->fcap) {
                c->fcap = (uint32_t)(c->flen + ln + 1024);
                c->frag = xrealloc(c->frag, c->fcap);
            }
            memcpy(c->frag + c->flen, pl, ln);
            c->flen += (uint32_t)ln;
            if (fin) {
                uint64_t before = t->deliveries_all;
                on_payload(t, c, c->frag, c->flen, now);
                if (t->deliveries_all != before) {
                    t->msg_frames++;
                    t->msg_frame_bytes += c->flen + hl;
                }
                c->flen = 0;
            }
            continue;
        }
        uint64_t before = t->deliveries_all;
        on_payload(t, c, pl, ln, now);
        if (t->deliveries_all != before) { /* frames (and their bytes) that carried channel messages */
            t->msg_frames++;
            t->msg_frame_bytes += hl + ln;
        }
    }
    return pos;
}

static void read_stream(thr_t *t, conn_t *c) {
    for (int iter = 0; iter < 8; iter++) {
        size_t have = c->len;
        size_t want = have + MIN_READ;
        if (c->need + 1 > want) want = c->need + 1;
        if (t->rbcap < want) {
            t->rbcap = want + want / 2;
            t->rb = xrealloc(t->rb, t->rbcap);
        }
        if (have) memcpy(t->rb, c->buf, have);
        size_t space = t->rbcap - have;
        struct iovec iov = {.iov_base = t->rb + have, .iov_len = space};
        union {
            char buf[CMSG_SPACE(sizeof(struct timespec))];
            struct cmsghdr align;
        } ctl;
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
        if (O.rx_timestamps) mh.msg_control = ctl.buf, mh.msg_controllen = sizeof ctl.buf;
        ssize_t got = recvmsg(c->fd, &mh, 0);
        if (got < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            if (errno == EINTR) continue;
            t->resets++;
            terr(t, "recv: %s", strerror(errno));
            conn_end(t, c, 0);
            return;
        }
        if (got == 0) {
            t->eof++;
            conn_end(t, c, 0);
            return;
        }
        int64_t now = mono_ns();
        t->read_arrival = 0;
        if (O.rx_timestamps)
            for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
                if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_TIMESTAMPNS) {
                    struct timespec ts;
                    memcpy(&ts, CMSG_DATA(cm), sizeof ts);
                    t->read_arrival = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec - g_real_minus_mono;
                }
        t->bytes += (uint64_t)got;
        t->reads++;
        size_t total = have + (size_t)got;
        size_t used = parse_frames(t, c, t->rb, total, now);
        if (c->state == CS_CLOSED || c->state == CS_FAILED) return;
        buf_put(c, t->rb + used, total - used);
        if ((size_t)got < space) return;
    }
}

static void on_connected(thr_t *t, conn_t *c) {
    int err = 0;
    socklen_t el = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
    if (err) {
        terr(t, "connect: %s", strerror(err));
        conn_end(t, c, 1);
        return;
    }
    char req[1400];
    int rl = upgrade_request(req, sizeof req, &t->rng);
    if (send_all(c->fd, (uint8_t *)req, (size_t)rl, 5000, NULL) < 0) {
        terr(t, "sending the upgrade request: %s", strerror(errno));
        conn_end(t, c, 1);
        return;
    }
    c->state = CS_UPGRADING;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(t->ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void on_upgrade_bytes(thr_t *t, conn_t *c, int64_t now) {
    if (c->cap < MAX_HANDSHAKE_BYTES) {
        c->cap = MAX_HANDSHAKE_BYTES;
        c->buf = xrealloc(c->buf, c->cap);
    }
    ssize_t got = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
    if (got < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (got <= 0) {
        char pr[120];
        printable(pr, sizeof pr, c->buf, c->len < 100 ? c->len : 100);
        terr(t, "server closed during the handshake (%s) after: %s", got < 0 ? strerror(errno) : "EOF", pr);
        conn_end(t, c, 1);
        return;
    }
    c->len += (uint32_t)got;
    uint8_t *e = memmem(c->buf, c->len, "\r\n\r\n", 4);
    if (!e) {
        if (c->len >= c->cap) {
            terr(t, "handshake response over %d bytes", MAX_HANDSHAKE_BYTES);
            conn_end(t, c, 1);
        }
        return;
    }
    uint8_t *eol = memmem(c->buf, c->len, "\r\n", 2);
    if (!(eol - c->buf >= 12 && !memcmp(c->buf, "HTTP/1.1 101", 12))) {
        char pr[200];
        size_t hl = (size_t)(e - c->buf);
        printable(pr, sizeof pr, c->buf, hl < 190 ? hl : 190);
        terr(t, "upgrade refused: %s", pr);
        conn_end(t, c, 1);
        return;
    }
    size_t rest = c->len - (size_t)(e + 4 - c->buf);
    memmove(c->buf, e + 4, rest);
    c->len = (uint32_t)rest;
    c->cap = (uint32_t)(rest < 256 ? 256 : rest); /* keep idle connections small */
    c->buf = xrealloc(c->buf, c->cap);
    if (O.subscribe) {
        uint8_t pl[300], fr[320];
        size_t n = subscribe_payload(pl, c->ch);
        size_t fl = ws_frame(fr, O.msgpack ? 2 : 1, pl, n, (uint32_t)xorshift(&t->rng));
        if (send_all(c->fd, fr, fl, 5000, NULL) < 0) {
            terr(t, "sending subscribe: %s", strerror(errno));
            conn_end(t, c, 1);
            return;
        }
        c->state = CS_SUBSCRIBING;
    } else {
        c->state = CS_SUBSCRIBING;
        on_subscribed(t, c); /* counts as ready once upgraded */
    }
    t->read_arrival = 0;
    if (c->len) { /* frames that came with the 101 */
        uint8_t *tmp = xmalloc(c->len);
        size_t n = c->len;
        memcpy(tmp, c->buf, n);
        size_t used = parse_frames(t, c, tmp, n, now);
        if (c->state != CS_CLOSED && c->state != CS_FAILED) buf_put(c, tmp + used, n - used);
        free(tmp);
    }
}

static void *sub_thread(void *arg) {
    thr_t *t = arg;
    struct epoll_event evs[512];
    int64_t batch_ns = (int64_t)(O.batch_us * 1000), next_round = 0;
    if (batch_ns) prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    while (!g_stop) {
        while (t->next < t->n && t->pending < t->inflight_cap) conn_start(t, &t->conns[t->next++]);
        if (batch_ns && t->connect_done) {
            /* Let frames gather: one round per batch_ns at most (adds < batch_ns latency). */
            int64_t now0 = mono_ns();
            if (now0 < next_round) {
                struct timespec ts = {next_round / 1000000000LL, next_round % 1000000000LL};
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
            }
        }
        int k = epoll_wait(t->ep, evs, 512, 10);
        if (k < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        int64_t now = mono_ns();
        t->rounds++;
        if (k > 0) next_round = now + batch_ns;
        for (int i = 0; i < k; i++) {
            conn_t *c = evs[i].data.ptr;
            switch (c->state) {
            case CS_CONNECTING: on_connected(t, c); break;
            case CS_UPGRADING: on_upgrade_bytes(t, c, now); break;
            case CS_SUBSCRIBING:
            case CS_ACTIVE: read_stream(t, c); break;
            default: break;
            }
        }
        if (!t->connect_done) {
            if (now > g_connect_deadline) {
                t->next = t->n;
                for (int i = 0; i < t->n; i++) {
                    conn_t *c = &t->conns[i];
                    if (c->state == CS_NEW) {
                        c->state = CS_CONNECTING;
                        t->pending++;
                        c->fd = -1;
                    }
                    if (c->state <= CS_SUBSCRIBING) {
                        terr(t, "connection %d not subscribed within --connect-timeout (state %d)", i, c->state);
                        conn_end(t, c, 1);
                    }
                }
            }
            if (t->next >= t->n && t->pending == 0) __atomic_store_n(&t->connect_done, 1, __ATOMIC_RELEASE);
        }
    }
    return NULL;
}

static int64_t per_channel_last(int ch) {
    /* The last measured seq of channel ch: seqs of channel ch are those with seq % C == ch. */
    if (O.last_seq < 0) return -1;
    int64_t last = O.last_seq;
    last -= ((last - ch) % O.channels + O.channels) % O.channels;
    return last;
}

static int64_t per_channel_count(int ch) {
    int64_t last = per_channel_last(ch);
    if (last < O.first_seq) return 0;
    int64_t first = O.first_seq + ((ch - O.first_seq) % O.channels + O.channels) % O.channels;
    if (first > last) return 0;
    return (last - first) / O.channels + 1;
}

static int64_t count_upto(int ch, int64_t hi) {
    /* Measured seqs of channel ch that are <= hi. */
    int64_t first = O.first_seq + ((ch - O.first_seq) % O.channels + O.channels) % O.channels;
    int64_t last = per_channel_last(ch);
    if (hi > last) hi = last;
    if (hi < first) return 0;
    return (hi - first) / O.channels + 1;
}

/* Read one command line from stdin without blocking for more than `ms`; 1 = got a line,
 * 0 = nothing yet, -1 = EOF. */
static char g_line[256];
static int stdin_line(int ms) {
    static char acc[256];
    static size_t alen;
    struct pollfd pf = {.fd = 0, .events = POLLIN};
    if (poll(&pf, 1, ms) <= 0) return 0;
    ssize_t r = read(0, acc + alen, sizeof acc - 1 - alen);
    if (r <= 0) return -1;
    alen += (size_t)r;
    char *nl = memchr(acc, '\n', alen);
    if (!nl) {
        if (alen >= sizeof acc - 1) alen = 0;
        return 0;
    }
    size_t l = (size_t)(nl - acc);
    memcpy(g_line, acc, l);
    g_line[l] = 0;
    memmove(acc, nl + 1, alen - l - 1);
    alen -= l + 1;
    return 1;
}

static void raise_nofile(int need) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0) return;
    if (rl.rlim_cur < (rlim_t)need) {
        rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > (rlim_t)need ? (rlim_t)need : rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    if (rl.rlim_cur < (rlim_t)need)
        die("needs %d file descriptors, RLIMIT_NOFILE allows %llu (hard %llu); raise it (ulimit -n)", need,
            (unsigned long long)rl.rlim_cur, (unsigned long long)rl.rlim_max);
}

static void close_all_gracefully(void) {
    /* Send a close frame on every open connection, then wait (<= 2 s) for the server's
     * close/EOF so that no socket is closed with unread data (which would send RST). */
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int open_n = 0;
    uint8_t code[2] = {0x03, 0xe8}, fr[16];
    uint64_t rng = (uint64_t)mono_ns() | 1;
    for (int i = 0; i < O.threads; i++) {
        thr_t *t = &T[i];
        for (int j = 0; j < t->n; j++) {
            conn_t *c = &t->conns[j];
            if (c->fd < 0) continue;
            epoll_ctl(t->ep, EPOLL_CTL_DEL, c->fd, NULL);
            size_t fl = ws_frame(fr, 0x8, code, 2, (uint32_t)xorshift(&rng));
            if (send(c->fd, fr, fl, MSG_NOSIGNAL | MSG_DONTWAIT) != (ssize_t)fl || ep < 0) {
                close(c->fd);
                c->fd = -1;
                continue;
            }
            struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
            epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
            open_n++;
        }
    }
    int64_t deadline = mono_ns() + 2000000000LL;
    static uint8_t sink[65536];
    struct epoll_event evs[256];
    while (open_n > 0 && mono_ns() < deadline) {
        int k = epoll_wait(ep, evs, 256, 50);
        for (int i = 0; i < k; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c->fd < 0) continue;
            ssize_t r;
            while ((r = recv(c->fd, sink, sizeof sink, MSG_DONTWAIT)) > 0) {
            }
            if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                close(c->fd);
                c->fd = -1;
                open_n--;
            }
        }
    }
    for (int i = 0; i < O.threads; i++)
        for (int j = 0; j < T[i].n; j++)
            if (T[i].conns[j].fd >= 0) close(T[i].conns[j].fd), T[i].conns[j].fd = -1;
    if (ep >= 0) close(ep);
}

static int run_sub(void) {
    if (O.threads > O.conns) O.threads = O.conns;
    clock_offset();
    raise_nofile(O.conns + O.threads + 64);
    int64_t t0 = mono_ns();
    g_connect_deadline = t0 + (int64_t)(O.connect_timeout * 1e9);
    T = calloc((size_t)O.threads, sizeof *T);
    if (!T) die("out of memory");
    conn_t *all = calloc((size_t)O.conns, sizeof *all);
    if (!all) die("out of memory");
    /* Connection i goes to thread i % T; its channel is (index_base + i) % C. */
    int per = O.conns / O.threads, extra = O.conns % O.threads, at = 0;
    for (int i = 0; i < O.threads; i++) {
        thr_t *t = &T[i];
        t->id = i;
        t->n = per + (i < extra);
        t->conns = all + at;
        for (int j = 0; j < t->n; j++) {
            conn_t *c = &t->conns[j];
            c->fd = -1;
            c->state = CS_NEW;
            c->ch = (O.index_base + at + j) % O.channels;
            c->last_off = c->last_seq = c->max_window_seq = -1;
            c->last_expected = per_channel_last(c->ch);
            c->expected = per_channel_count(c->ch);
            if (O.last_seq >= 0 && c->expected == 0) {
                c->done = c->finished = 1;
                t->n_done++;
                t->n_finished++;
            }
        }
        at += t->n;
        t->ep = epoll_create1(EPOLL_CLOEXEC);
        if (t->ep < 0) die("epoll_create1: %s", strerror(errno));
        t->rbcap = O.read_buffer;
        t->rb = xmalloc(t->rbcap);
        t->rng = (uint64_t)mono_ns() * 0x9E3779B97F4A7C15ULL + (uint64_t)i * 7919 + 1;
        t->inflight_cap = O.inflight / O.threads > 0 ? O.inflight / O.threads : 1;
        if (pthread_create(&t->th, NULL, sub_thread, t)) die("pthread_create failed");
    }
    /* Wait for every connection to be subscribed or failed. */
    for (;;) {
        int done = 1;
        for (int i = 0; i < O.threads; i++) done &= __atomic_load_n(&T[i].connect_done, __ATOMIC_ACQUIRE);
        if (done) break;
        struct timespec ts = {0, 5000000};
        nanosleep(&ts, NULL);
    }
    int n_active = 0, n_failed = 0;
    double cmax = 0;
    for (int i = 0; i < O.threads; i++) {
        n_active += __atomic_load_n(&T[i].n_active, __ATOMIC_RELAXED);
        n_failed += __atomic_load_n(&T[i].n_failed, __ATOMIC_RELAXED);
        if (T[i].connect_s_max > cmax) cmax = T[i].connect_s_max;
    }
    double connect_s = (mono_ns() - t0) / 1e9;
    printf("{\"event\":\"ready\",\"conns\":%d,\"subscribed\":%d,\"failed\":%d,\"seconds\":%.3f,"
           "\"slowest_connection_s\":%.3f}\n",
           O.conns, n_active, n_failed, connect_s, cmax);
    fflush(stdout);

    /* The start signal. */
    int stdin_open = 1, stop_now = 0;
    if (!O.start_now && !O.start_at) {
        for (;;) {
            int r = stdin_line(100);
            if (r < 0) { stdin_open = 0; break; }
            if (r > 0 && !strcmp(g_line, "start")) break;
            if (r > 0 && !strcmp(g_line, "stop")) { stop_now = 1; break; }
            if (r > 0 && !strcmp(g_line, "close")) { stop_now = 1; stdin_open = 0; break; }
            if (mono_ns() - t0 > (int64_t)((O.connect_timeout + 3600) * 1e9)) break;
        }
    } else if (O.start_at) {
        struct timespec ts = {O.start_at / 1000000000LL, O.start_at % 1000000000LL};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
        }
    }
    int64_t start = mono_ns();
    g_tl_origin = start;
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    int64_t end_at = start + (int64_t)(O.duration * 1e9);
    const char *why = stop_now ? "stop" : "duration";
    while (!stop_now) {
        int64_t now = mono_ns();
        if (now >= end_at) break;
        int all_done = O.last_seq >= 0;
        if (all_done) {
            int sum = 0;
            for (int i = 0; i < O.threads; i++) sum += __atomic_load_n(&T[i].n_finished, __ATOMIC_RELAXED);
            all_done = sum >= O.conns;
        }
        if (all_done) { why = "all_done"; break; }
        if (stdin_open) {
            int64_t left_ms = (end_at - now) / 1000000;
            int r = stdin_line(left_ms < 5 ? (int)left_ms : 5);
            if (r < 0) stdin_open = 0; /* nobody to listen to: --duration still bounds the run */
            if (r > 0 && (!strcmp(g_line, "stop") || !strcmp(g_line, "close"))) { why = "stop"; break; }
        } else {
            struct timespec ts = {0, 2000000};
            nanosleep(&ts, NULL);
        }
    }
    int64_t stop_ns = mono_ns();
    getrusage(RUSAGE_SELF, &ru1);
    g_stop = 1;
    for (int i = 0; i < O.threads; i++) pthread_join(T[i].th, NULL);

    /* Aggregate. */
    thr_t *A = calloc(1, sizeof *A);
    if (!A) die("out of memory");
    int64_t expected = 0, received = 0, loss_gaps = 0, loss_late = 0, per_min = -1, per_max = 0, zero_conns = 0;
    int n_dead = 0, n_done = 0;
    for (int i = 0; i < O.threads; i++) {
        thr_t *t = &T[i];
        hmerge(&A->lat, &t->lat);
        hmerge(&A->rdelay, &t->rdelay);
        hmerge(&A->arrival, &t->arrival);
#define ADD(f) A->f += t->f
        ADD(deliveries_all); ADD(deliveries_window); ADD(off_gap_events); ADD(off_missing); ADD(out_of_order);
        ADD(seq_gap_events); ADD(seq_missing); ADD(duplicates); ADD(gap_msgs); ADD(err_msgs); ADD(other_msgs);
        ADD(unparsed); ADD(pings); ADD(pongs_dropped); ADD(eof); ADD(resets); ADD(closes_total);
        ADD(protocol_errors); ADD(bytes); ADD(reads); ADD(frames); ADD(clock_anomalies); ADD(rounds);
        ADD(msg_frames); ADD(msg_frame_bytes); ADD(array_frames);
#undef ADD
        for (int k = 0; k <= MAX_CLOSE_CODE; k++) A->closes[k] += t->closes[k];
        if (t->first_ns && (!A->first_ns || t->first_ns < A->first_ns)) A->first_ns = t->first_ns;
        if (t->last_ns > A->last_ns) A->last_ns = t->last_ns;
        n_dead += t->n_dead;
        n_done += t->n_done;
        for (int j = 0; j < t->n; j++) {
            conn_t *c = &t->conns[j];
            if (O.last_seq < 0) continue;
            expected += c->expected;
            received += c->received;
            int64_t upto = count_upto(c->ch, c->max_window_seq);
            loss_gaps += upto - c->received;
            loss_late += c->expected - upto;
            if (per_min < 0 || c->received < per_min) per_min = c->received;
            if (c->received > per_max) per_max = c->received;
            if (!c->received) zero_conns++;
        }
    }
    double wall = (stop_ns - start) / 1e9;
    double user = tv_s(ru1.ru_utime) - tv_s(ru0.ru_utime), sys = tv_s(ru1.ru_stime) - tv_s(ru0.ru_stime);
    FILE *f = stdout;
    fprintf(f, "{\"event\":\"result\",\"role\":\"sub\",\"version\":\"%s\",\"encoding\":\"%s\",\"conns\":%d,\"threads\":%d,"
               "\"channels\":%d,\"subscribed\":%d,\"connect_failed\":%d,\"connect_seconds\":%.3f,"
               "\"first_seq\":%" PRId64 ",\"last_seq\":%" PRId64 ",\"stopped_by\":\"%s\",",
            CLOAD_VERSION, O.msgpack ? "msgpack" : "json", O.conns, O.threads, O.channels, n_active, n_failed,
            connect_s, O.first_seq, O.last_seq, why);
    fprintf(f, "\"expected\":%" PRId64 ",\"received\":%" PRId64 ",\"loss\":%" PRId64 ",\"loss_gaps\":%" PRId64
               ",\"loss_late\":%" PRId64 ",\"deliveries_all\":%" PRIu64 ",\"conns_done\":%d,\"conns_closed\":%d,"
               "\"per_conn_received\":{\"min\":%" PRId64 ",\"max\":%" PRId64 ",\"zero\":%" PRId64 "},",
            expected, received, expected - received, loss_gaps, loss_late, A->deliveries_all, n_done, n_dead,
            per_min < 0 ? 0 : per_min, per_max, zero_conns);
    fprintf(f, "\"offset_gap_events\":%" PRIu64 ",\"offset_missing\":%" PRIu64 ",\"out_of_order\":%" PRIu64
               ",\"seq_gap_events\":%" PRIu64 ",\"seq_missing\":%" PRIu64 ",\"duplicates\":%" PRIu64
               ",\"gap_messages\":%" PRIu64 ",\"error_messages\":%" PRIu64 ",\"other_messages\":%" PRIu64
               ",\"unparsed_messages\":%" PRIu64 ",\"pings\":%" PRIu64 ",\"control_sends_dropped\":%" PRIu64
               ",\"eof\":%" PRIu64 ",\"resets\":%" PRIu64 ",\"protocol_errors\":%" PRIu64
               ",\"clock_anomalies\":%" PRIu64 ",\"closes\":%" PRIu64 ",\"closes_by_code\":{",
            A->off_gap_events, A->off_missing, A->out_of_order, A->seq_gap_events, A->seq_missing, A->duplicates,
            A->gap_msgs, A->err_msgs, A->other_msgs, A->unparsed, A->pings, A->pongs_dropped, A->eof, A->resets,
            A->protocol_errors, A->clock_anomalies, A->closes_total);
    int firstc = 1;
    for (int k = 0; k <= MAX_CLOSE_CODE; k++) {
        if (!A->closes[k]) continue;
        if (k == MAX_CLOSE_CODE) fprintf(f, "%s\"other\":%u", firstc ? "" : ",", A->closes[k]);
        else fprintf(f, "%s\"%d\":%u", firstc ? "" : ",", k, A->closes[k]);
        firstc = 0;
    }
    fprintf(f, "},\"batch_us\":%g,\"epoll_rounds\":%" PRIu64 ",\"bytes\":%" PRIu64 ",\"reads\":%" PRIu64 ",\"frames\":%" PRIu64 ","
               "\"first_delivery_ns\":%" PRId64 ",\"last_delivery_ns\":%" PRId64 ",\"start_ns\":%" PRId64
               ",\"stop_ns\":%" PRId64 ",",
            O.batch_us, A->rounds, A->bytes, A->reads, A->frames, A->first_ns, A->last_ns, start, stop_ns);
    fprintf(f, "\"msg_frames\":%" PRIu64 ",\"msg_frame_bytes\":%" PRIu64 ",\"array_frames\":%" PRIu64 ",",
            A->msg_frames, A->msg_frame_bytes, A->array_frames);
    fprintf(f, "\"cpu\":{\"user_s\":%.4f,\"sys_s\":%.4f,\"wall_s\":%.4f,\"utilization\":%.4f},", user, sys, wall,
            wall > 0 ? (user + sys) / wall : 0.0);
    fprintf(f, "\"cpu_process_total\":{\"user_s\":%.4f,\"sys_s\":%.4f},", tv_s(ru1.ru_utime), tv_s(ru1.ru_stime));
    hprint(f, "latency_us", &A->lat);
    fputc(',', f);
    hprint(f, "read_delay_us", &A->rdelay);
    fputc(',', f);
    hprint_buckets(f, "read_delay_hist_ns", &A->rdelay);
    fputc(',', f);
    hprint(f, "arrival_latency_us", &A->arrival);
    fputc(',', f);
    hprint_buckets(f, "arrival_latency_hist_ns", &A->arrival);
    fputc(',', f);
    hprint_buckets(f, "latency_hist_ns", &A->lat);
    /* Timeline: for each 50 ms of publish time since the start signal, the max and mean latency. */
    int tl_last = -1;
    for (int b = 0; b < TL_BUCKETS; b++)
        for (int i = 0; i < O.threads; i++)
            if (T[i].tl_n[b]) tl_last = b;
    fprintf(f, ",\"timeline\":{\"bucket_ms\":%lld,\"max_us\":[", TL_BUCKET_NS / 1000000);
    for (int b = 0; b <= tl_last; b++) {
        uint64_t mx = 0;
        for (int i = 0; i < O.threads; i++)
            if (T[i].tl_max[b] > mx) mx = T[i].tl_max[b];
        fprintf(f, "%s%.0f", b ? "," : "", mx / 1e3);
    }
    fputs("],\"mean_us\":[", f);
    for (int b = 0; b <= tl_last; b++) {
        uint64_t sum = 0, n = 0;
        for (int i = 0; i < O.threads; i++) sum += T[i].tl_sum[b], n += T[i].tl_n[b];
        fprintf(f, "%s%.0f", b ? "," : "", n ? (double)sum / (double)n / 1e3 : 0.0);
    }
    fputs("],\"count\":[", f);
    for (int b = 0; b <= tl_last; b++) {
        uint64_t n = 0;
        for (int i = 0; i < O.threads; i++) n += T[i].tl_n[b];
        fprintf(f, "%s%" PRIu64, b ? "," : "", n);
    }
    fputs("]}", f);
    fputs(",\"errors\":[", f);
    int nerr = 0;
    for (int i = 0; i < O.threads; i++)
        for (int j = 0; j < T[i].nerr && nerr < 20; j++, nerr++) {
            if (nerr) fputc(',', f);
            json_str(f, T[i].errs[j]);
        }
    fputs("]}\n", f);
    fflush(f);
    if (O.hold && stdin_open) {
        int64_t until = mono_ns() + 600LL * 1000000000LL;
        while (mono_ns() < until) {
            int r = stdin_line(200);
            if (r < 0 || (r > 0 && !strcmp(g_line, "close"))) break;
        }
    }
    close_all_gracefully();
    return 0;
}

/* ---------------------------------------------------------------- publisher role */

static int pub_connect(uint8_t **rest, size_t *rest_len, char *err, size_t errcap) {
    int fd = socket(g_addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return snprintf(err, errcap, "socket: %s", strerror(errno)), -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&g_addr, g_addrlen) < 0 && errno != EINPROGRESS)
        return snprintf(err, errcap, "connect: %s", strerror(errno)), close(fd), -1;
    struct pollfd pf = {.fd = fd, .events = POLLOUT};
    if (poll(&pf, 1, 10000) != 1) return snprintf(err, errcap, "connect timed out"), close(fd), -1;
    int e = 0;
    socklen_t el = sizeof e;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &el);
    if (e) return snprintf(err, errcap, "connect: %s", strerror(e)), close(fd), -1;
    char req[1400];
    uint64_t rng = (uint64_t)mono_ns() | 1;
    int rl = upgrade_request(req, sizeof req, &rng);
    if (send_all(fd, (uint8_t *)req, (size_t)rl, 10000, NULL) < 0)
        return snprintf(err, errcap, "sending the upgrade: %s", strerror(errno)), close(fd), -1;
    static uint8_t buf[MAX_HANDSHAKE_BYTES];
    size_t len = 0;
    int64_t deadline = mono_ns() + 10000000000LL;
    for (;;) {
        struct pollfd pr = {.fd = fd, .events = POLLIN};
        int ms = (int)((deadline - mono_ns()) / 1000000);
        if (ms <= 0 || poll(&pr, 1, ms) != 1) return snprintf(err, errcap, "no upgrade response"), close(fd), -1;
        ssize_t g = recv(fd, buf + len, sizeof buf - len, 0);
        if (g <= 0) return snprintf(err, errcap, "server closed during the handshake"), close(fd), -1;
        len += (size_t)g;
        uint8_t *end = memmem(buf, len, "\r\n\r\n", 4);
        if (!end) {
            if (len == sizeof buf) return snprintf(err, errcap, "handshake response too long"), close(fd), -1;
            continue;
        }
        if (len < 12 || memcmp(buf, "HTTP/1.1 101", 12)) {
            char pr2[200];
            printable(pr2, sizeof pr2, buf, (size_t)(end - buf) < 190 ? (size_t)(end - buf) : 190);
            return snprintf(err, errcap, "upgrade refused: %s", pr2), close(fd), -1;
        }
        *rest_len = len - (size_t)(end + 4 - buf);
        *rest = xmalloc(*rest_len + 1);
        memcpy(*rest, end + 4, *rest_len);
        return fd;
    }
}

typedef struct {
    int fd;
    uint8_t *buf;
    size_t len, cap;
    uint64_t rng;
    int closed, close_code;
    uint64_t errors, pings, other;
    char err[MAX_ERRORS][240];
    int nerr;
} pubconn_t;

static void pub_err(pubconn_t *p, const char *fmt, ...) {
    if (p->nerr >= MAX_ERRORS) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err[p->nerr++], sizeof p->err[0], fmt, ap);
    va_end(ap);
}

/* Read what the server sent the publisher (welcome, pings, errors, close) without blocking. */
static void pub_drain(pubconn_t *p) {
    if (p->closed) return;
    for (;;) {
        if (p->cap - p->len < 65536) {
            p->cap = p->len + 131072;
            p->buf = xrealloc(p->buf, p->cap);
        }
        ssize_t g = recv(p->fd, p->buf + p->len, p->cap - p->len, MSG_DONTWAIT);
        if (g < 0 && (errno == EAGAIN || errno == EINTR)) break;
        if (g <= 0) {
            p->closed = 1;
            pub_err(p, "server closed the publisher's connection (%s)", g < 0 ? strerror(errno) : "EOF");
            return;
        }
        p->len += (size_t)g;
    }
    size_t pos = 0;
    while (p->len - pos >= 2) {
        const uint8_t *q = p->buf + pos;
        uint64_t ln = q[1] & 0x7f;
        size_t hl = 2;
        if (ln == 126) {
            if (p->len - pos < 4) break;
            ln = (uint64_t)q[2] << 8 | q[3];
            hl = 4;
        } else if (ln == 127) {
            if (p->len - pos < 10) break;
            ln = 0;
            for (int i = 0; i < 8; i++) ln = ln << 8 | q[2 + i];
            hl = 10;
        }
        if (p->len - pos - hl < ln) break;
        const uint8_t *pl = q + hl;
        int op = q[0] & 0x0f;
        pos += hl + ln;
        if (op == 0x9) {
            uint8_t fr[160];
            size_t fl = ws_frame(fr, 0xA, pl, ln > 125 ? 125 : ln, (uint32_t)xorshift(&p->rng));
            send_all(p->fd, fr, fl, 1000, NULL);
            p->pings++;
        } else if (op == 0x8) {
            p->close_code = ln >= 2 ? (pl[0] << 8 | pl[1]) : 1005;
            char pr[200];
            printable(pr, sizeof pr, pl + (ln >= 2 ? 2 : 0), ln > 2 ? ln - 2 : 0);
            pub_err(p, "server closed the publisher with %d %s", p->close_code, pr);
            p->closed = 1;
        } else if (op == 0x1 || op == 0x2) {
            int is_err = O.msgpack ? memmem(pl, ln < 48 ? ln : 48, "\xa4type\xa5" "error", 11) != NULL
                                   : memmem(pl, ln < 48 ? ln : 48, "\"error\"", 7) != NULL;
            if (is_err) {
                p->errors++;
                char pr[200];
                printable(pr, sizeof pr, pl, ln);
                pub_err(p, "%s", pr);
            } else {
                p->other++;
            }
        }
    }
    memmove(p->buf, p->buf + pos, p->len - pos);
    p->len -= pos;
}

static int digits(uint64_t v) {
    int d = 1;
    while (v >= 10) v /= 10, d++;
    return d;
}

static const char *g_pub_sched = "normal";

static int run_pub(void) {
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0); /* wake up on time, not up to 50 µs late */
    /* The publisher shares its CPU with the subscribers; a real-time priority (root only)
     * keeps it on schedule. It sleeps between sends, so it cannot starve them. */
    struct sched_param sp = {.sched_priority = 1};
    if (sched_setscheduler(0, SCHED_FIFO, &sp) == 0) g_pub_sched = "fifo";
    else if (setpriority(PRIO_PROCESS, 0, -10) == 0) g_pub_sched = "nice-10";
    pubconn_t P = {0};
    P.rng = (uint64_t)mono_ns() * 0x9E3779B97F4A7C15ULL | 1;
    uint8_t *rest = NULL;
    size_t rest_len = 0;
    char err[300];
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    P.fd = pub_connect(&rest, &rest_len, err, sizeof err);
    if (P.fd < 0) {
        printf("{\"event\":\"result\",\"role\":\"pub\",\"sent\":0,\"errors\":[");
        json_str(stdout, err);
        printf("]}\n");
        fflush(stdout);
        return 1;
    }
    P.cap = rest_len + 131072;
    P.buf = xmalloc(P.cap);
    memcpy(P.buf, rest, rest_len);
    P.len = rest_len;
    free(rest);
    pub_drain(&P);

    /* Pad so that the data object {"t":T,"s":S,"p":"..."} is about --payload-bytes long. */
    int64_t last_seq = O.seq0 + (O.count ? O.count - 1 : 0);
    int base = O.msgpack ? 1 + 11 + 7 + 2 + 1 : (int)strlen("{\"t\":,\"s\":,\"p\":\"\"}") + digits((uint64_t)mono_ns()) + digits((uint64_t)last_seq);
    /* --keys: the key field "K":"SYM000" (msgpack: fixstr name, fixstr value) after "s". */
    int key_digits = O.keys > 0 ? digits((uint64_t)(O.keys - 1)) : 0;
    if (key_digits && key_digits < 3) key_digits = 3;
    int key_len = (int)strlen(O.key_field);
    if (O.keys > 0) base += O.msgpack ? 1 + key_len + 1 + 3 + key_digits : key_len + 6 + 3 + key_digits;
    int pad = O.payload_bytes - base;
    if (pad < 0) pad = 0;
    if (O.msgpack && pad >= 32) pad = pad - 1 >= 256 ? pad - 2 : pad - 1; /* str8/str16 header */
    char *padbuf = xmalloc((size_t)pad + 1);
    memset(padbuf, 'x', (size_t)pad);
    padbuf[pad] = 0;
    size_t cap = (size_t)pad + 512;
    uint8_t *pl = xmalloc(cap), *fr = xmalloc(cap + 16);

    int64_t start = O.start_at ? O.start_at : mono_ns() + 20000000LL;
    double interval = 1e9 / O.rate;
    int64_t plan_end = start + (int64_t)((double)O.count * interval);
    int64_t give_up = plan_end + (int64_t)(O.late_limit * 1e9);
    hist_t *lag = calloc(1, sizeof *lag);
    if (!lag) die("out of memory");
    int64_t sent = 0, sent_measured = 0, t_first = 0, t_last = 0, blocked = 0;
    int64_t bytes_sent = 0;
    int outq = 0, outq_max = 0, outq_end = -1; /* SIOCOUTQ: bytes the server has not yet acknowledged */
    const char *stopped = "done";
    for (int64_t k = 0; k < O.count; k++) {
        int64_t due = start + (int64_t)((double)k * interval);
        if ((k & 63) == 0) {
            pub_drain(&P);
            if (ioctl(P.fd, SIOCOUTQ, &outq) == 0 && outq > outq_max) outq_max = outq;
        }
        if (P.closed) { stopped = "closed"; break; }
        int64_t now = mono_ns();
        if (now < due) {
            struct timespec ts = {due / 1000000000LL, due % 1000000000LL};
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
            }
        } else if (now > give_up) {
            stopped = "late";
            pub_err(&P, "gave up at message %" PRId64 " of %" PRId64 ": %.1f s behind schedule (server not reading?)",
                    k, O.count, (now - due) / 1e9);
            break;
        }
        int64_t seq = O.seq0 + k;
        int ch = (int)(seq % O.channels);
        int64_t ts = mono_ns();
        size_t n;
        if (!O.msgpack && O.keys > 0) {
            n = (size_t)snprintf((char *)pl, cap,
                                 "{\"type\":\"publish\",\"channel\":\"%s%d\",\"data\":{\"t\":%" PRId64 ",\"s\":%" PRId64
                                 ",\"%s\":\"SYM%0*d\",\"p\":\"%s\"}}",
                                 O.prefix, ch, ts, seq, O.key_field, key_digits, (int)(seq % O.keys), padbuf);
        } else if (!O.msgpack) {
            n = (size_t)snprintf((char *)pl, cap,
                                 "{\"type\":\"publish\",\"channel\":\"%s%d\",\"data\":{\"t\":%" PRId64 ",\"s\":%" PRId64
                                 ",\"p\":\"%s\"}}",
                                 O.prefix, ch, ts, seq, padbuf);
        } else {
            char name[256];
            int nl = snprintf(name, sizeof name, "%s%d", O.prefix, ch);
            n = 0;
            memcpy(pl, "\x83\xa4type\xa7publish\xa7" "channel", 22);
            n = 22;
            if (nl < 32) pl[n++] = (uint8_t)(0xa0 | nl);
            else pl[n++] = 0xd9, pl[n++] = (uint8_t)nl;
            memcpy(pl + n, name, (size_t)nl);
            n += (size_t)nl;
            memcpy(pl + n, O.keys > 0 ? "\xa4" "data\x84\xa1t\xcf" : "\xa4" "data\x83\xa1t\xcf", 9);
            n += 9;
            for (int i = 7; i >= 0; i--) pl[n++] = (uint8_t)((uint64_t)ts >> (8 * i));
            pl[n++] = 0xa1, pl[n++] = 's', pl[n++] = 0xce;
            for (int i = 3; i >= 0; i--) pl[n++] = (uint8_t)((uint64_t)seq >> (8 * i));
            if (O.keys > 0) {
                pl[n++] = (uint8_t)(0xa0 | key_len);
                memcpy(pl + n, O.key_field, (size_t)key_len);
                n += (size_t)key_len;
                char kv[32];
                int kl = snprintf(kv, sizeof kv, "SYM%0*d", key_digits, (int)(seq % O.keys));
                pl[n++] = (uint8_t)(0xa0 | kl);
                memcpy(pl + n, kv, (size_t)kl);
                n += (size_t)kl;
            }
            pl[n++] = 0xa1, pl[n++] = 'p';
            if (pad < 32) pl[n++] = (uint8_t)(0xa0 | pad);
            else if (pad < 256) pl[n++] = 0xd9, pl[n++] = (uint8_t)pad;
            else pl[n++] = 0xda, pl[n++] = (uint8_t)(pad >> 8), pl[n++] = (uint8_t)pad;
            memcpy(pl + n, padbuf, (size_t)pad);
            n += (size_t)pad;
        }
        size_t fl = ws_frame(fr, O.msgpack ? 2 : 1, pl, n, (uint32_t)xorshift(&P.rng));
        int wait_ms = (int)((give_up - mono_ns()) / 1000000);
        if (send_all(P.fd, fr, fl, wait_ms > 0 ? wait_ms : 1, &blocked) < 0) {
            stopped = "send_failed";
            pub_err(&P, "send of message %" PRId64 " failed or blocked past the deadline: %s", k, strerror(errno));
            break;
        }
        sent++;
        bytes_sent += (int64_t)fl;
        if (k >= O.measure_from) {
            hrec(lag, (uint64_t)(ts > due ? ts - due : 0));
            if (!sent_measured) t_first = ts;
            t_last = ts;
            sent_measured++;
        }
    }
    getrusage(RUSAGE_SELF, &ru1);
    pub_drain(&P);
    if (ioctl(P.fd, SIOCOUTQ, &outq) == 0) {
        outq_end = outq;
        if (outq > outq_max) outq_max = outq;
    }
    double span = (t_last - t_first) / 1e9;
    printf("{\"event\":\"result\",\"role\":\"pub\",\"version\":\"%s\",\"rate\":%.3f,\"count\":%" PRId64
           ",\"sent\":%" PRId64 ",\"sent_measured\":%" PRId64 ",\"stopped_by\":\"%s\",\"achieved_rate\":%.3f,"
           "\"start_ns\":%" PRId64 ",\"first_measured_ns\":%" PRId64 ",\"last_measured_ns\":%" PRId64
           ",\"send_blocked_s\":%.4f,\"pings\":%" PRIu64 ",\"error_messages\":%" PRIu64 ",\"close_code\":%d,"
           "\"scheduling\":\"%s\",\"unread_bytes_max\":%d,\"unread_bytes_end\":%d,\"bytes_sent\":%" PRId64 ",",
           CLOAD_VERSION, O.rate, O.count, sent, sent_measured, stopped,
           sent_measured > 1 && span > 0 ? (sent_measured - 1) / span : 0.0, start, t_first, t_last, blocked / 1e9,
           P.pings, P.errors, P.close_code, g_pub_sched, outq_max, outq_end, bytes_sent);
    hprint(stdout, "lag_us", lag);
    double user = tv_s(ru1.ru_utime) - tv_s(ru0.ru_utime), sys = tv_s(ru1.ru_stime) - tv_s(ru0.ru_stime);
    printf(",\"cpu\":{\"user_s\":%.4f,\"sys_s\":%.4f},\"errors\":[", user, sys);
    for (int i = 0; i < P.nerr; i++) {
        if (i) putchar(',');
        json_str(stdout, P.err[i]);
    }
    printf("]}\n");
    fflush(stdout);

    /* Linger: keep answering pings until told to stop, so that closing this socket cannot
     * reset the connection while the server still has publishes to read. */
    int64_t until = mono_ns() + (int64_t)(O.linger * 1e9);
    while (!P.closed && mono_ns() < until) {
        struct pollfd pf[2] = {{.fd = 0, .events = POLLIN}, {.fd = P.fd, .events = POLLIN}};
        int r = poll(pf, 2, 100);
        if (r < 0 && errno != EINTR) break;
        if (pf[1].revents) pub_drain(&P);
        if (pf[0].revents) {
            int l = stdin_line(0);
            if (l < 0 || (l > 0 && (!strcmp(g_line, "stop") || !strcmp(g_line, "close")))) break;
        }
    }
    if (!P.closed) {
        uint8_t code[2] = {0x03, 0xe8}, cf[16];
        size_t fl = ws_frame(cf, 0x8, code, 2, (uint32_t)xorshift(&P.rng));
        send_all(P.fd, cf, fl, 1000, NULL);
        int64_t dl = mono_ns() + 2000000000LL;
        while (!P.closed && mono_ns() < dl) {
            struct pollfd pf = {.fd = P.fd, .events = POLLIN};
            if (poll(&pf, 1, 50) > 0) pub_drain(&P);
        }
    }
    close(P.fd);
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOFBF, 1 << 16);
    parse_args(argc, argv);
    return !strcmp(O.role, "sub") ? run_sub() : run_pub();
}
