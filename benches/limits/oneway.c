/* The floor of forwarding log records: W writer processes (argv[2],
 * default 4) each send N datagrams (argv[1], default 250000) of 128 bytes
 * (a record's size) over its own SOCK_SEQPACKET socketpair, blocking; one
 * reader process drains them all with epoll and writes nothing. Prints
 * messages per second received.
 *
 *   cc -O2 -o oneway oneway.c && ./oneway 250000 4
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 250000;
    int w = argc > 2 ? atoi(argv[2]) : 4;
    int ep = epoll_create1(0);
    int *fds = calloc(w, sizeof(int));
    for (int i = 0; i < w; i++) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv) < 0) { perror("socketpair"); return 1; }
        if (fork() == 0) {
            close(sv[0]);
            char rec[128];
            memset(rec, 'x', sizeof rec);
            for (long k = 0; k < n; k++)
                if (send(sv[1], rec, sizeof rec, 0) < 0) _exit(1);
            _exit(0);
        }
        close(sv[1]);
        fds[i] = sv[0];
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = sv[0]};
        epoll_ctl(ep, EPOLL_CTL_ADD, sv[0], &ev);
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long got = 0;
    int open = w;
    char buf[4096];
    struct epoll_event evs[16];
    while (open > 0) {
        int k = epoll_wait(ep, evs, 16, -1);
        for (int i = 0; i < k; i++) {
            ssize_t r = recv(evs[i].data.fd, buf, sizeof buf, MSG_DONTWAIT);
            if (r > 0) got++;
            else if (r == 0) { epoll_ctl(ep, EPOLL_CTL_DEL, evs[i].data.fd, NULL); close(evs[i].data.fd); open--; }
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    while (wait(NULL) > 0) {}
    double secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("limit: %d writers x %ld datagrams of 128 B one way, one epoll reader: %.0f msgs/s\n", w, n, got / secs);
    return 0;
}
