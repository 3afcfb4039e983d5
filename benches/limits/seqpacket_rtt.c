/* The floor of a message round trip between two processes: a 64-byte
 * datagram over a SOCK_SEQPACKET socketpair and back, blocking calls, no
 * runtime, no encoding. Prints p50, p90 and p99 over ROUNDS (argv[1],
 * default 20000) after 1000 warm-up rounds.
 *
 *   cc -O2 -o seqpacket_rtt seqpacket_rtt.c && ./seqpacket_rtt 20000
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 20000;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv) < 0) { perror("socketpair"); return 1; }
    pid_t pid = fork();
    if (pid == 0) {
        char buf[256];
        close(sv[0]);
        for (;;) {
            ssize_t n = recv(sv[1], buf, sizeof buf, 0);
            if (n <= 0) _exit(0);
            if (send(sv[1], buf, n, 0) != n) _exit(1);
        }
    }
    close(sv[1]);
    char msg[64], buf[256];
    memset(msg, 7, sizeof msg);
    double *s = malloc(sizeof(double) * rounds);
    for (int i = 0; i < rounds + 1000; i++) {
        double t0 = now_us();
        if (send(sv[0], msg, sizeof msg, 0) != sizeof msg) { perror("send"); return 1; }
        if (recv(sv[0], buf, sizeof buf, 0) != sizeof msg) { perror("recv"); return 1; }
        if (i >= 1000) s[i - 1000] = now_us() - t0;
    }
    close(sv[0]);
    waitpid(pid, NULL, 0);
    qsort(s, rounds, sizeof(double), cmp);
    printf("limit: seqpacket round trip (64 B, 2 processes, blocking), %d rounds: p50 %.1f us  p90 %.1f us  p99 %.1f us\n",
           rounds, s[rounds / 2], s[rounds * 9 / 10], s[rounds * 99 / 100]);
    return 0;
}
