/* The floor of an idle supervisor: a parent that forks 2 children (which
 * pause) and waits in epoll; prints the parent's pid and waits for SIGTERM.
 * Its RSS is what any process pays before doing anything.
 *
 *   cc -O2 -o idle_parent idle_parent.c && ./idle_parent
 */
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/epoll.h>
#include <unistd.h>

int main(void) {
    for (int i = 0; i < 2; i++)
        if (fork() == 0) { prctl(PR_SET_PDEATHSIG, SIGKILL); pause(); _exit(0); }
    printf("%d\n", getpid());
    fflush(stdout);
    int ep = epoll_create1(0);
    struct epoll_event ev;
    for (;;) epoll_wait(ep, &ev, 1, -1);
}
