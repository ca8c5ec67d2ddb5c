/* without-landlock PROGRAM [ARGS...]: runs PROGRAM with the Landlock system calls answering
 * ENOSYS, as on a kernel built without Landlock or under a container runtime's seccomp
 * profile that predates it. Test tooling for tests/integration/confine.rs (x86_64 and
 * aarch64 numbers are the same: 444-446); the filter is inherited by every child.
 * Run as root (no no_new_privs needed, and none set: the broker must still change users). */
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: without-landlock PROGRAM [ARGS...]\n");
        return 2;
    }
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 444, 0, 2),
        BPF_JUMP(BPF_JMP | BPF_JGT | BPF_K, 446, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {.len = sizeof filter / sizeof filter[0], .filter = filter};
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
        perror("without-landlock: seccomp");
        return 1;
    }
    execvp(argv[1], argv + 1);
    perror("without-landlock: exec");
    return 127;
}
