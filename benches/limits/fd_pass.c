/* The floor of handing off a socket: one descriptor (a dup of a connected
 * TCP socket) plus 64 bytes per datagram over a SOCK_SEQPACKET socketpair,
 * sender and receiver on two threads, the receiver closing each one.
 * Prints descriptors per second over N (argv[1], default 500000).
 *
 *   cc -O2 -pthread -o fd_pass fd_pass.c && ./fd_pass 500000
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int sv[2];
static long n_total;

static void *receiver(void *arg) {
    (void)arg;
    char buf[256];
    char cbuf[CMSG_SPACE(sizeof(int))];
    for (long i = 0; i < n_total; i++) {
        struct iovec iov = {buf, sizeof buf};
        struct msghdr m = {0};
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        m.msg_control = cbuf;
        m.msg_controllen = sizeof cbuf;
        if (recvmsg(sv[1], &m, MSG_CMSG_CLOEXEC) <= 0) { perror("recvmsg"); exit(1); }
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        int fd;
        memcpy(&fd, CMSG_DATA(c), sizeof fd);
        close(fd);
    }
    return NULL;
}

int main(int argc, char **argv) {
    n_total = argc > 1 ? atol(argv[1]) : 500000;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    bind(l, (struct sockaddr *)&a, sizeof a);
    listen(l, 1);
    getsockname(l, (struct sockaddr *)&a, &al);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    connect(c, (struct sockaddr *)&a, sizeof a);
    int s = accept(l, NULL, NULL);
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) { perror("socketpair"); return 1; }
    pthread_t t;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pthread_create(&t, NULL, receiver, NULL);
    char msg[64];
    memset(msg, 7, sizeof msg);
    char cbuf[CMSG_SPACE(sizeof(int))];
    for (long i = 0; i < n_total; i++) {
        int fd = dup(s);
        struct iovec iov = {msg, sizeof msg};
        struct msghdr m = {0};
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        m.msg_control = cbuf;
        m.msg_controllen = sizeof cbuf;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &fd, sizeof fd);
        if (sendmsg(sv[0], &m, 0) < 0) { perror("sendmsg"); return 1; }
        close(fd);
    }
    pthread_join(t, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("limit: fd + 64 B over seqpacket, 2 threads, blocking, %ld: %.0f fds/s\n", n_total, n_total / secs);
    return 0;
}
