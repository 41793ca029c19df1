/* The directory updates behind an exclusive holder's metadata, without buildlock: the old way
 * (rename the spare to X.lock.pid and back) against the new (link it, unlink the name), each
 * after an in-place rewrite of the spare, as the library does. docs/PERFORMANCE.md, fourth round.
 *
 *   cc -O2 -o /tmp/rename_vs_link scripts/floor/rename_vs_link.c
 *   mkdir -p /tmp/floor && cd /tmp/floor && /tmp/rename_vs_link
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(void) {
    const int n = 100000;
    char buf[276];
    memset(buf, 'x', sizeof buf);
    unlink("x.lock.pid");
    int spare = open("x.lock.pid.spare", O_RDWR | O_CREAT, 0644);
    if (spare < 0 || write(spare, buf, sizeof buf) != sizeof buf) {
        perror("x.lock.pid.spare");
        return 1;
    }
    for (int round = 0; round < 3; round++) {
        double t = now_ns();
        for (int i = 0; i < n; i++) {
            pwrite(spare, buf, sizeof buf, 0);
            renameat2(AT_FDCWD, "x.lock.pid.spare", AT_FDCWD, "x.lock.pid", RENAME_NOREPLACE);
            renameat2(AT_FDCWD, "x.lock.pid", AT_FDCWD, "x.lock.pid.spare", RENAME_NOREPLACE);
        }
        printf("rewrite, rename there and back: %.2f us\n", (now_ns() - t) / n / 1000);
        t = now_ns();
        for (int i = 0; i < n; i++) {
            pwrite(spare, buf, sizeof buf, 0);
            linkat(AT_FDCWD, "x.lock.pid.spare", AT_FDCWD, "x.lock.pid", 0);
            unlink("x.lock.pid");
        }
        printf("rewrite, link, unlink:          %.2f us\n", (now_ns() - t) / n / 1000);
    }
    return 0;
}
