/* codetainer-seccomp: the link of the agent's exec chain that runs right after the
 * privilege drop (boot/chain.py), as the agent:
 *
 *     codetainer-seccomp HEX [--nproc=N] [--core=N] [--nice=N] -- PROGRAM [ARG...]
 *
 * sets the process's own limits (hard limits too, so they cannot be raised again), its
 * nice value, then no_new_privs and the seccomp filter HEX (classic BPF compiled by the
 * daemon with libseccomp, boot/seccomp.py), then execs PROGRAM. The same contract as the
 * Python loader in boot/chain.py (LOADER), which is the fallback where this is not built;
 * tests/integration/test_chain.py runs both through the same cases. It exists because
 * an interpreter's start is most of an agent process's launch (bench/bench_seccomp.py).
 *
 * Any failure: a line on stderr and exit 126 (127: no such program); nothing runs.
 * Built by ./dev setup and the Dockerfile: cc -O2 -static -o codetainer-seccomp this.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SECCOMP_FILTER_FLAG_SPEC_ALLOW
#define SECCOMP_FILTER_FLAG_SPEC_ALLOW (1UL << 2)
#endif

#define MAX_INSNS 4096 /* BPF_MAXINSNS */

static struct sock_filter program[MAX_INSNS];

static void fail(const char *what, const char *detail, int code)
{
    fprintf(stderr, "codetainer-seccomp: %s%s\n", what, detail ? detail : "");
    _exit(code);
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* A non-empty string of ASCII digits that fits in an unsigned long long. */
static int number(const char *s, unsigned long long *out)
{
    unsigned long long v = 0;
    if (!*s)
        return 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return 0;
        if (v > (~0ULL - 9) / 10)
            return -1;
        v = v * 10 + (unsigned long long)(*s - '0');
    }
    *out = v;
    return 1;
}

static void limit(const char *opt, const char *value, int resource)
{
    unsigned long long v = 0;
    int ok = number(value, &v);
    if (ok == 0) {
        fail("unknown option ", opt, 126);
    }
    struct rlimit rl = {(rlim_t)v, (rlim_t)v};
    if (ok < 0 || setrlimit(resource, &rl) != 0) {
        char why[256];
        snprintf(why, sizeof why, "%s: %s", opt, ok < 0 ? "out of range" : strerror(errno));
        fail("cannot set ", why, 126);
    }
}

static void renice(const char *opt, const char *value)
{
    unsigned long long v = 0;
    int ok = number(value, &v);
    if (ok == 0)
        fail("unknown option ", opt, 126);
    errno = 0;
    int range = ok > 0 && v <= INT_MAX;
    if (!range || (nice((int)v) == -1 && errno != 0)) {
        char why[256];
        snprintf(why, sizeof why, "%s: %s", opt, range ? strerror(errno) : "out of range");
        fail("cannot set ", why, 126);
    }
}

int main(int argc, char **argv)
{
    int end = -1;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0) {
            end = i;
            break;
        }
    }
    if (end < 2 || end == argc - 1)
        fail("usage: HEX [--nproc=N] [--core=N] [--nice=N] -- PROGRAM [ARG...]", NULL, 126);

    const char *hex = argv[1];
    size_t len = strlen(hex);
    if (len == 0 || len % 16 != 0 || len / 16 > MAX_INSNS)
        fail("the filter is not hex", NULL, 126);
    unsigned char *bytes = (unsigned char *)program;
    for (size_t i = 0; i < len; i += 2) {
        int hi = hexval(hex[i]), lo = hexval(hex[i + 1]);
        if (hi < 0 || lo < 0)
            fail("the filter is not hex", NULL, 126);
        bytes[i / 2] = (unsigned char)(hi << 4 | lo);
    }

    for (int i = 2; i < end; i++) {
        const char *opt = argv[i];
        const char *eq = strchr(opt, '=');
        size_t name = eq ? (size_t)(eq - opt) : strlen(opt);
        const char *value = eq ? eq + 1 : "";
        if (name == 7 && strncmp(opt, "--nproc", 7) == 0)
            limit(opt, value, RLIMIT_NPROC);
        else if (name == 6 && strncmp(opt, "--core", 6) == 0)
            limit(opt, value, RLIMIT_CORE);
        else if (name == 6 && strncmp(opt, "--nice", 6) == 0)
            renice(opt, value);
        else
            fail("unknown option ", opt, 126);
    }

    struct sock_fprog prog = {(unsigned short)(len / 16), program};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1UL, 0UL, 0UL, 0UL) != 0)
        fail("cannot set no_new_privs: ", strerror(errno), 126);
    /* seccomp(2) with SPEC_ALLOW (a filter alone does not switch the tree's speculation
     * mitigations, which kernels before 5.16 did by default); prctl where the flag or the
     * call is unknown. */
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_SPEC_ALLOW, &prog) != 0 &&
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0UL, 0UL) != 0)
        fail("cannot load the agent's filter: ", strerror(errno), 126);

    execvp(argv[end + 1], &argv[end + 1]);
    int err = errno;
    char why[512];
    snprintf(why, sizeof why, "%s: %s", argv[end + 1], strerror(err));
    fail("cannot run ", why, err == ENOENT ? 127 : 126);
    return 126;
}
