/* The floor of a direct-mode handoff on this machine, without buildlock: a holder releases an
 * OFD lock, a waiter in another process blocked in F_OFD_SETLKW takes it; from just before the
 * release to just after the grant (CLOCK_REALTIME on both sides), the holder sleeping 15 ms
 * before each release as benches/compare.rs does. With "files", both sides also make the system
 * calls buildlock's release and grant make (statx, token pread/pwrite, the spare's
 * open/fstat/pwrite/close and linkat; at release two statx and an unlink). docs/PERFORMANCE.md.
 *
 *   cc -O2 -o /tmp/handoff scripts/floor/handoff.c
 *   /tmp/handoff; /tmp/handoff files
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define DIR_ "/tmp/floor-handoff/"
static char meta[276];
static int files;

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void lock(int fd, short type, int cmd) {
    struct flock fl = {0};
    fl.l_type = type;
    if (fcntl(fd, cmd, &fl) != 0) {
        perror("fcntl");
        exit(1);
    }
}

static void granted(int fence) {
    if (!files) return;
    struct statx sx;
    char token[65];
    statx(AT_FDCWD, DIR_ "x.lock", AT_SYMLINK_NOFOLLOW, STATX_ALL, &sx);
    pread(fence, token, sizeof token, 0);
    pwrite(fence, "00001795815061808618\n", 21, 0);
    int spare = open(DIR_ "x.lock.pid.spare", O_RDWR | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);
    statx(spare, "", AT_EMPTY_PATH, STATX_ALL, &sx);
    pwrite(spare, meta, sizeof meta, 0);
    close(spare);
    linkat(AT_FDCWD, DIR_ "x.lock.pid.spare", AT_FDCWD, DIR_ "x.lock.pid", 0);
}

static void release(int fd) {
    if (files) {
        struct statx sx;
        statx(AT_FDCWD, DIR_ "x.lock", AT_SYMLINK_NOFOLLOW, STATX_ALL, &sx);
        statx(AT_FDCWD, DIR_ "x.lock.pid", AT_SYMLINK_NOFOLLOW, STATX_ALL, &sx);
        unlink(DIR_ "x.lock.pid");
    }
    lock(fd, F_UNLCK, F_OFD_SETLK);
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    enum { N = 200 };
    files = argc > 1 && strcmp(argv[1], "files") == 0;
    memset(meta, 'x', sizeof meta);
    mkdir(DIR_, 0755);
    close(open(DIR_ "x.lock.pid.spare", O_RDWR | O_CREAT, 0644));
    double *grant = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int to_waiter[2], to_holder[2];
    if (pipe(to_waiter) || pipe(to_holder)) return 1;
    char c;
    if (fork() == 0) {
        int fd = open(DIR_ "x.lock", O_RDWR | O_CREAT, 0644), fence = open(DIR_ "x.lock.fence", O_RDWR | O_CREAT, 0644);
        for (int i = 0; i < N; i++) {
            read(to_waiter[0], &c, 1);
            write(to_holder[1], "w", 1);
            lock(fd, F_WRLCK, F_OFD_SETLKW);
            granted(fence);
            *grant = now_us();
            release(fd);
            write(to_holder[1], "g", 1);
        }
        exit(0);
    }
    int fd = open(DIR_ "x.lock", O_RDWR | O_CREAT, 0644), fence = open(DIR_ "x.lock.fence", O_RDWR | O_CREAT, 0644);
    double d[N];
    for (int i = 0; i < N; i++) {
        lock(fd, F_WRLCK, F_OFD_SETLKW);
        granted(fence);
        write(to_waiter[1], "g", 1);
        read(to_holder[0], &c, 1);
        usleep(15000); /* the waiter blocks meanwhile */
        double released = now_us();
        release(fd);
        read(to_holder[0], &c, 1);
        d[i] = *grant - released;
    }
    qsort(d, N, sizeof d[0], cmp);
    printf("%s handoff: median %.1f us, p90 %.1f us\n", files ? "with buildlock's file work," : "bare OFD", d[N / 2],
           d[N * 9 / 10]);
    return 0;
}
