/*
 * The native `hpcsif` front (installed by `make native`).
 *
 * A container start through the Python CLI spends tens of milliseconds before bwrap runs. This
 * program looks for a launch the Python CLI saved for the same command line, environment,
 * working directory, uid, gid and umask (hpcsif/engine/launch_plan.py describes the format and
 * what is saved). When every host file the plan was made from is unchanged and the caller's
 * passwd entry is the same, it registers as a holder of the image's shared mount
 * (hpcsif/engine/mounts.py; it mounts the image when nobody has, with a watchdog of its own, and
 * the last holder unmounts), starts bwrap as the plan says and stays its parent as the Python
 * engine does: signals are forwarded to the payload, its exit status returned (128+N when killed
 * by signal N). Everything else, and anything unexpected on the way, runs the Python CLI with the
 * same arguments, before anything was started.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/pidfd.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef HPCSIF_PYTHON
#define HPCSIF_PYTHON "python3"
#endif

#define FORMAT "hpcsif-plan-3"
#define MAX_PLAN (1 << 20)
#define MAX_PENDING 32

extern char **environ;

static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
#define N_FORWARDED (sizeof forwarded / sizeof forwarded[0])

static char **g_argv;
static int g_argc;

/* ------------------------------------------------------------------ the Python CLI */

static _Noreturn void run_python(char **args) {
    execvp(HPCSIF_PYTHON, args);
    fprintf(stderr, "FATAL:   cannot start %s: %s\n", HPCSIF_PYTHON, strerror(errno));
    exit(255);
}

/* The Python CLI with our arguments; it saves what it launches for the next time. */
static _Noreturn void python_cli(void) {
    char **args = calloc((size_t)g_argc + 3, sizeof *args);
    if (!args) {
        fputs("FATAL:   out of memory\n", stderr);
        exit(255);
    }
    args[0] = HPCSIF_PYTHON;
    args[1] = "-c";
    args[2] = "import sys; from hpcsif.cli.main import console; sys.exit(console(front=True))";
    for (int i = 1; i < g_argc; i++) args[i + 2] = g_argv[i];
    run_python(args);
}

/* ------------------------------------------------------------------ the key */

typedef unsigned __int128 u128;

static u128 fnv_field(u128 h, const char *s) {
    const u128 prime = ((u128)1 << 88) + 0x13B;
    for (const unsigned char *p = (const unsigned char *)s;; p++) {
        h = (h ^ *p) * prime; /* the terminating NUL is part of the field */
        if (!*p) return h;
    }
}

static int by_bytes(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/*
 * How an environment entry enters the key: whole, or only its name for a variable that differs
 * between the tasks of a job and only passes through (launch_plan.per_task), so that the ranks
 * of an srun share one plan. NULL when out of memory.
 */
static char *key_entry(char *entry) {
    static const char *const prefixes[] = {"SLURM_", "SLURMD_", "PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "PALS_"};
    size_t name = strcspn(entry, "=");
    if (name == strlen("SLURM_JOB_PARTITION") && strncmp(entry, "SLURM_JOB_PARTITION", name) == 0)
        return entry; /* hpcsif reads it (mpi.partition_defaults) */
    for (size_t i = 0; i < sizeof prefixes / sizeof prefixes[0]; i++)
        if (strncmp(entry, prefixes[i], strlen(prefixes[i])) == 0) return strndup(entry, name);
    return entry;
}

/* ------------------------------------------------------------------ plan fields */

struct cursor {
    char *p, *end;
};

static char *field(struct cursor *c) {
    if (!c->p || c->p >= c->end) return NULL;
    char *s = c->p, *z = memchr(s, 0, (size_t)(c->end - s));
    if (!z) return NULL;
    c->p = z + 1;
    return s;
}

static int number(struct cursor *c, long long *out) {
    char *s = field(c), *e;
    if (!s || !*s) return -1;
    errno = 0;
    long long v = strtoll(s, &e, 10);
    if (*e || errno) return -1;
    *out = v;
    return 0;
}

/* A user-private directory: ours, a directory, writable by nobody else. */
static int private_dir(const char *path) {
    struct stat st;
    return lstat(path, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == getuid() && !(st.st_mode & 022);
}

/* Read plan file *path* (ours, private, a regular file) into a buffer; NULL when unusable. */
static char *read_plan(const char *path, size_t *len) {
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return NULL;
    struct stat st;
    char *buf = NULL;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == getuid() && !(st.st_mode & 022) &&
        st.st_size > 0 && st.st_size <= MAX_PLAN && (buf = malloc((size_t)st.st_size))) {
        size_t got = 0;
        while (got < (size_t)st.st_size) {
            ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            got += (size_t)n;
        }
        if (got != (size_t)st.st_size) {
            free(buf);
            buf = NULL;
        }
        *len = got;
    }
    close(fd);
    return buf;
}

static int by_gid(const void *a, const void *b) {
    gid_t x = *(const gid_t *)a, y = *(const gid_t *)b;
    return (x > y) - (x < y);
}

/* The caller's groups as launch_plan.groups_field writes them: sorted, unique, comma-separated. */
static char *groups_field(void) {
    int n = getgroups(0, NULL);
    if (n < 0) return NULL;
    gid_t *gids = calloc((size_t)n + 1, sizeof *gids);
    char *out = calloc((size_t)n + 1, 12);
    if (!gids || !out || getgroups(n, gids) != n) {
        free(gids);
        free(out);
        return NULL;
    }
    qsort(gids, (size_t)n, sizeof *gids, by_gid);
    size_t len = 0;
    for (int i = 0; i < n; i++)
        if (i == 0 || gids[i] != gids[i - 1])
            len += (size_t)sprintf(out + len, "%s%u", len ? "," : "", (unsigned)gids[i]);
    free(gids);
    return out;
}

/*
 * The saved plan for this command line, if any: the longest prefix of the arguments that has
 * one (what follows it is the container's command). *split* gets the first command argument.
 */
static char *find_plan(size_t *len, int *split) {
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    char base[4096], path[4200], cwd[4096], num[64];
    if (xdg && *xdg && access(xdg, W_OK) == 0)
        snprintf(base, sizeof base, "%s/hpcsif", xdg);
    else
        snprintf(base, sizeof base, "/tmp/hpcsif-%u", (unsigned)getuid());
    snprintf(path, sizeof path, "%s/plans", base);
    if (!private_dir(base) || !private_dir(path) || !getcwd(cwd, sizeof cwd)) return NULL;

    mode_t mask = umask(0);
    umask(mask);
    u128 h = ((u128)0x6C62272E07BB0142ULL << 64) | 0x62B821756295C58DULL;
    h = fnv_field(h, FORMAT);
    snprintf(num, sizeof num, "%u", (unsigned)getuid());
    h = fnv_field(h, num);
    snprintf(num, sizeof num, "%u", (unsigned)getgid());
    h = fnv_field(h, num);
    char *groups = groups_field();
    if (!groups) return NULL;
    h = fnv_field(h, groups);
    free(groups);
    snprintf(num, sizeof num, "%o", (unsigned)mask);
    h = fnv_field(h, num);
    h = fnv_field(h, cwd);
    size_t n_env = 0;
    while (environ[n_env]) n_env++;
    char **env = malloc((n_env + 1) * sizeof *env);
    u128 *keys = malloc((size_t)g_argc * sizeof *keys);
    if (!env || !keys) return NULL;
    for (size_t i = 0; i < n_env; i++)
        if (!(env[i] = key_entry(environ[i]))) return NULL;
    qsort(env, n_env, sizeof *env, by_bytes);
    for (size_t i = 0; i < n_env; i++)
        if (*env[i]) h = fnv_field(h, env[i]);
    h = fnv_field(h, "");
    for (int k = 1; k < g_argc; k++) keys[k] = h = fnv_field(h, g_argv[k]);

    char *plan = NULL;
    for (int k = g_argc - 1; k >= 2 && !plan; k--) {
        snprintf(path, sizeof path, "%s/plans/%016llx%016llx.plan", base, (unsigned long long)(keys[k] >> 64),
                 (unsigned long long)keys[k]);
        if ((plan = read_plan(path, len))) *split = k + 1;
    }
    free(keys);
    return plan;
}

/* ------------------------------------------------------------------ checks */

/* One witness: the host file must be as it was when the plan was made. */
static int witness_holds(struct cursor *c) {
    char *kind = field(c), *path = field(c);
    long long v[8];
    for (int i = 0; i < 8; i++)
        if (number(c, &v[i])) return 0;
    if (!kind || !path) return 0;
    struct stat st;
    if (strcmp(kind, "-") == 0) return stat(path, &st) != 0 && (errno == ENOENT || errno == ENOTDIR);
    if (stat(path, &st) != 0) return 0;
    if ((long long)st.st_dev != v[0] || (long long)st.st_ino != v[1] || (long long)st.st_mode != v[2] ||
        (long long)st.st_uid != v[3] || (long long)st.st_gid != v[4])
        return 0;
    if (strcmp(kind, "d") == 0) return 1;
    long long mtime = (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
    long long ctime = (long long)st.st_ctim.tv_sec * 1000000000LL + st.st_ctim.tv_nsec;
    return strcmp(kind, "f") == 0 && (long long)st.st_size == v[5] && mtime == v[6] && ctime == v[7];
}

/* The caller's passwd entry and group name, as the plan's /etc/passwd and /etc/group lines used them. */
static int user_holds(struct cursor *c) {
    char *name = field(c), *uid = field(c), *gid = field(c), *gecos = field(c), *dir = field(c), *group = field(c);
    struct passwd *pw = getpwuid(getuid());
    char num[32];
    if (!group || !pw) return 0;
    snprintf(num, sizeof num, "%u", (unsigned)pw->pw_uid);
    if (strcmp(name, pw->pw_name) || strcmp(uid, num) || strcmp(gecos, pw->pw_gecos ? pw->pw_gecos : "") ||
        strcmp(dir, pw->pw_dir))
        return 0;
    snprintf(num, sizeof num, "%u", (unsigned)pw->pw_gid);
    if (strcmp(gid, num)) return 0;
    struct group *gr = getgrgid(pw->pw_gid);
    return strcmp(group, gr ? gr->gr_name : num) == 0;
}

/* ------------------------------------------------------------------ the shared mount */

/* Field *index* of /proc/PID/stat counted from the state (1: the parent, 19: the start time), as
 * mounts._stat_fields; -1 when the process does not exist. */
static long long stat_field(pid_t pid, int index) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
    if (!p) return -1;
    p += 2;
    for (int i = 0; i < index; i++) {
        p = strchr(p, ' ');
        if (!p) return -1;
        p++;
    }
    return strtoll(p, NULL, 10);
}

static long long start_time(pid_t pid) { return stat_field(pid, 19); }

#define MAX_HOLDERS 4096

static int read_all(int fd, char *buf, size_t size);

/* As mounts._orphaned_bwrap: *pid* is a bwrap set up on *mnt* that no live holder started. */
static int orphaned_bwrap(pid_t pid, const char *mnt, const long *holders, int n_holders) {
    char path[64];
    static char argv[1 << 18];
    snprintf(path, sizeof path, "/proc/%d/cmdline", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t len = read_all(fd, argv, sizeof argv);
    const char *base = strrchr(argv, '/');
    if (len <= 0 || strcmp(base ? base + 1 : argv, "bwrap") != 0) return 0;
    size_t n = strlen(mnt);
    int uses = 0;
    for (const char *a = argv; a < argv + len && !uses; a += strlen(a) + 1)
        uses = strncmp(a, mnt, n) == 0 && (a[n] == 0 || a[n] == '/');
    if (!uses) return 0;
    long long ancestor = pid;
    for (int depth = 0; depth < 64; depth++) { /* a holder's container is a few generations below it */
        if ((ancestor = stat_field((pid_t)ancestor, 1)) <= 1) return 1;
        for (int i = 0; i < n_holders; i++)
            if (holders[i] == ancestor) return 0;
    }
    return 0;
}

/* As mounts.end_orphaned_bwraps: SIGKILL them until none is left. */
static void end_orphaned_bwraps(const char *mnt, const long *holders, int n_holders) {
    for (int round = 0; round < 10; round++) {
        int ended = 0;
        DIR *d = opendir("/proc");
        for (struct dirent *e; d && (e = readdir(d));) {
            if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
            pid_t pid = (pid_t)atol(e->d_name);
            int pidfd = pidfd_open(pid, 0); /* the process itself, whatever reuses its pid */
            if (pidfd < 0) continue;
            if (orphaned_bwrap(pid, mnt, holders, n_holders) && pidfd_send_signal(pidfd, SIGKILL, NULL, 0) == 0)
                ended++;
            close(pidfd);
        }
        if (d) closedir(d);
        if (!ended) return;
        usleep(20000);
    }
}

/* The mount directory's lock, taken as SharedMount._locked takes it (both made if missing). */
static int lock_mount(const char *dir) {
    char lock[4200];
    snprintf(lock, sizeof lock, "%s/lock", dir);
    for (;;) {
        if (mkdir(dir, 0700) != 0 && errno != EEXIST) return -1;
        int fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (fd < 0) {
            if (errno == ENOENT) continue; /* the directory went away between mkdir and open */
            return -1;
        }
        while (flock(fd, LOCK_EX) != 0)
            if (errno != EINTR) {
                close(fd);
                return -1;
            }
        struct stat a, b;
        if (stat(lock, &a) == 0 && fstat(fd, &b) == 0 && a.st_ino == b.st_ino) return fd;
        close(fd); /* the last user removed it meanwhile: start again */
    }
}

/* Live holders; dead holders' files are removed, and what they left ended, as
 * SharedMount.live_holders does. */
static int live_holders(const char *dir) {
    char path[4200];
    static long holders[MAX_HOLDERS];
    snprintf(path, sizeof path, "%s/holders", dir);
    DIR *d = opendir(path);
    if (!d) return 0;
    int live = 0, dead = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        char *dot, *end;
        if (e->d_name[0] == '.' || !(dot = strchr(e->d_name, '.'))) continue;
        long pid = strtol(e->d_name, &end, 10);
        long long start = end == dot ? strtoll(dot + 1, &end, 10) : -2;
        if (pid > 0 && !*end && start >= 0 && start_time((pid_t)pid) == start) {
            if (live < MAX_HOLDERS) holders[live] = pid;
            live++;
        } else {
            snprintf(path, sizeof path, "%s/holders/%s", dir, e->d_name);
            unlink(path);
            dead = 1;
        }
    }
    closedir(d);
    if (dead && live <= MAX_HOLDERS) {
        snprintf(path, sizeof path, "%s/mnt", dir);
        end_orphaned_bwraps(path, holders, live);
    }
    return live;
}

/* Run *argv* (PATH searched) with stdio on /dev/null, and *env*, in process *group* when it is > 0;
 * its exit status, -1 if it did not run. */
static int run_quietly(char *const argv[], char *const env[], pid_t group) {
    posix_spawn_file_actions_t io;
    posix_spawnattr_t attr;
    posix_spawn_file_actions_init(&io);
    posix_spawnattr_init(&attr);
    for (int fd = 0; fd < 3; fd++) posix_spawn_file_actions_addopen(&io, fd, "/dev/null", O_RDWR, 0);
    if (group > 0) {
        posix_spawnattr_setpgroup(&attr, group);
        posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
    }
    pid_t pid;
    int err = posix_spawnp(&pid, argv[0], &io, &attr, argv, env);
    posix_spawn_file_actions_destroy(&io);
    posix_spawnattr_destroy(&attr);
    if (err) return -1;
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* As mounts._mount_state: mnt (named "mnt" in dir) is a mount point (1), not (0), or stale (-1): a
 * FUSE mount whose daemon is gone, which even stat cannot reach, but which dir's listing shows. */
static int mounted(const char *dir, const char *mnt) {
    struct stat m, top;
    if (stat(mnt, &m) != 0) {
        DIR *d = opendir(dir);
        int listed = 0;
        for (struct dirent *e; d && (e = readdir(d));) listed |= strcmp(e->d_name, "mnt") == 0;
        if (d) closedir(d);
        return listed ? -1 : 0;
    }
    return stat(dir, &top) == 0 && m.st_dev != top.st_dev;
}

/* As mounts.unmount: fusermount3 -u (-z: lazily), else fusermount; 1 on success. */
static int unmount_once(const char *mnt, int lazy) {
    for (int v = 0; v < 2; v++) {
        char *argv[6] = {v ? "fusermount" : "fusermount3", "-u", "-q", NULL, NULL, NULL};
        argv[3 + !!lazy] = (char *)mnt;
        if (lazy) argv[3] = "-z";
        int rc = run_quietly(argv, environ, -1);
        if (rc >= 0) return rc == 0; /* it ran: unmounted, or busy, or not mounted */
    }
    return 0;
}

/* Unmounted, retried for about 0.2 s while busy, as mounts._unmount_soon does; 1 on success. */
static int unmount(const char *mnt) {
    static const int backoff_us[] = {1000, 2000, 4000, 8000, 16000, 32000, 64000, 73000, 0};
    for (size_t i = 0; i < sizeof backoff_us / sizeof backoff_us[0]; i++) {
        if (unmount_once(mnt, 0)) return 1;
        usleep((useconds_t)backoff_us[i]);
    }
    return 0;
}

/* Delete dir once nothing is mounted there (its lock held), as SharedMount._remove; the lock
 * file goes last: a waiter sees it gone and starts again. */
static void remove_mount_dir(const char *dir) {
    char path[4200];
    snprintf(path, sizeof path, "%s/mnt", dir);
    rmdir(path);
    snprintf(path, sizeof path, "%s/holders", dir);
    rmdir(path); /* empty: live_holders removed the dead ones' files */
    snprintf(path, sizeof path, "%s/lock", dir);
    unlink(path);
    rmdir(dir);
}

#define WATCHDOG "hpcsif-mount-watchdog" /* argv[0] of the front run as a mount's watchdog */
#define POLL_MS 500 /* mounts._POLL_MS */
#define LAZY_AFTER 20 /* mounts._LAZY_AFTER */

/* The mount's watchdog, as mounts.watch: looks at once, then on every mount-table change and every
 * half second, and unmounts once no holder is alive (a SIGKILLed last holder could not). */
static _Noreturn void watch(const char *dir) {
    char mnt[4200], buf[65536];
    snprintf(mnt, sizeof mnt, "%s/mnt", dir);
    int table = open("/proc/self/mounts", O_RDONLY | O_CLOEXEC), failures = 0, wait_ms = 0;
    for (;; wait_ms = POLL_MS) {
        struct pollfd p = {table, POLLPRI | POLLERR, 0};
        poll(&p, table >= 0, wait_ms);
        if (table >= 0 && lseek(table, 0, SEEK_SET) == 0)
            while (read(table, buf, sizeof buf) > 0) {
            }
        struct stat st;
        if (stat(dir, &st) != 0 || mounted(dir, mnt) == 0) _exit(0);
        int fd = lock_mount(dir);
        if (fd < 0) _exit(1);
        if (mounted(dir, mnt) == 0) {
            remove_mount_dir(dir); /* unmounted while we waited for the lock */
            _exit(0);
        }
        if (live_holders(dir)) {
            failures = 0;
        } else if (unmount_once(mnt, failures >= LAZY_AFTER)) {
            remove_mount_dir(dir);
            _exit(0);
        } else {
            failures++;
        }
        close(fd);
    }
}

/* Whether a process other than a zombie is in process *group*, as mounts._live_members. */
static int live_members(pid_t group) {
    DIR *d = opendir("/proc");
    int live = 0;
    for (struct dirent *e; d && !live && (e = readdir(d));) {
        char path[300], buf[1024];
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0) continue;
        buf[n] = 0;
        char state, *paren = strrchr(buf, ')');
        long pgrp;
        if (paren && sscanf(paren + 1, " %c %*d %ld", &state, &pgrp) == 2)
            live = pgrp == (long)group && state != 'Z' && state != 'X';
    }
    if (d) closedir(d);
    return live;
}

/* As mounts._detach_after_mount: once whoever holds the lock has run the mount command in our
 * process group, leave the group (a session of our own) and wait until its members have ended; 0
 * when there is nothing to look after (the mount came and went, or never came, before we ran). */
static int detach_after_mount(const char *dir) {
    char lock[4200], mnt[4200];
    pid_t group = getpgrp();
    snprintf(lock, sizeof lock, "%s/lock", dir);
    snprintf(mnt, sizeof mnt, "%s/mnt", dir);
    int fd = open(lock, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        if (mounted(dir, mnt) == 0) return 0;
    } else {
        while (flock(fd, LOCK_EX) != 0 && errno == EINTR) {
        }
        close(fd);
    }
    if (fork() != 0) _exit(0);
    setsid();
    while (live_members(group)) usleep(10000);
    return 1;
}

/* Start the mount's watchdog before the mount command, as SharedMount._start_watchdog does: should
 * the front be killed while the command mounts, the mount has a watchdog all the same. It leads a
 * process group of its own, for the command (see detach_after_mount), with SIGHUP ignored (a group
 * orphaned with a stopped member gets one), stdio on /dev/null and no other descriptor (a pipe held
 * open there would keep the caller's reader waiting). Its pid, -1 if it could not start. */
static pid_t start_watchdog(const char *dir) {
    pid_t pid = fork();
    if (pid != 0) {
        if (pid > 0) setpgid(pid, pid); /* (also in the child: whichever runs first) */
        return pid;
    }
    setpgid(0, 0);
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (size_t i = 0; i < N_FORWARDED; i++) sigaction(forwarded[i], &dfl, NULL);
    signal(SIGHUP, SIG_IGN);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    int null = open("/dev/null", O_RDWR);
    for (int fd = 0; fd < 3; fd++) dup2(null, fd);
    closefrom(3);
    /* under a name of its own: `pkill -f "hpcsif exec …"` must not end it with the containers */
    char *argv[] = {WATCHDOG, (char *)dir, "--group", NULL};
    execv("/proc/self/exe", argv);
    if (detach_after_mount(dir)) watch(dir);
    _exit(0);
}

struct mount_plan {
    char *dir;
    char **argv; /* the squashfuse command line, ending with the mount point */
};

/* Mount as SharedMount._mount does (the lock is held): the watchdog, then squashfuse in its process
 * group; 1 on success. */
static int mount_image(const struct mount_plan *plan, const char *mnt) {
    if (mkdir(mnt, 0777) != 0 && errno != EEXIST) return 0;
    pid_t watchdog = start_watchdog(plan->dir);
    if (watchdog < 0) return 0;
    if (run_quietly(plan->argv, environ, watchdog) != 0) return 0; /* the Python CLI says why */
    return mounted(plan->dir, mnt) == 1;
}

static char g_holder[4300];
static const char *g_mount_dir;

/* Register as a holder of the mount, mounting it first if needed; 0 when the Python CLI must. */
static int hold_mount(const struct mount_plan *plan) {
    char mnt[4200], holders[4200];
    long long started = start_time(getpid());
    int fd = lock_mount(plan->dir);
    if (fd < 0 || started < 0) {
        if (fd >= 0) close(fd);
        return 0;
    }
    snprintf(mnt, sizeof mnt, "%s/mnt", plan->dir);
    snprintf(holders, sizeof holders, "%s/holders", plan->dir);
    int state = mounted(plan->dir, mnt), ok = state == 1 || (state == 0 && mount_image(plan, mnt));
    if (ok) {
        snprintf(g_holder, sizeof g_holder, "%s/%d.%lld", holders, (int)getpid(), started);
        int h = -1;
        if ((mkdir(holders, 0700) == 0 || errno == EEXIST) &&
            (h = open(g_holder, O_WRONLY | O_CREAT | O_CLOEXEC, 0644)) >= 0)
            close(h);
        ok = h >= 0;
    }
    close(fd);
    if (ok) g_mount_dir = plan->dir;
    return ok;
}

/* Leave the mount and end with *status*: the last holder unmounts and removes its directory. */
static _Noreturn void leave(int status) {
    if (!g_mount_dir) exit(status);
    int fd = lock_mount(g_mount_dir);
    if (fd < 0) exit(status);
    unlink(g_holder);
    char path[4200];
    snprintf(path, sizeof path, "%s/mnt", g_mount_dir);
    /* busy: the watchdog unmounts it later, as after SharedMount.release */
    if (!live_holders(g_mount_dir) && (mounted(g_mount_dir, path) == 0 || unmount(path)))
        remove_mount_dir(g_mount_dir);
    close(fd);
    exit(status);
}

/* ------------------------------------------------------------------ signals */

static volatile sig_atomic_t g_child, g_pidns, g_forwarded, g_npending;
static volatile sig_atomic_t g_pending[MAX_PENDING];

static void put_number(char *out, long v) {
    char tmp[24];
    int n = 0;
    do tmp[n++] = (char)('0' + v % 10);
    while ((v /= 10) > 0);
    while (n) *out++ = tmp[--n];
    *out = 0;
}

/* As engine.supervise._signal_payload: the payload's process group, or its PID 1's children. */
static void signal_payload(pid_t child, int sig) {
    pid_t targets[64];
    int n = 0;
    if (g_pidns) {
        char path[96] = "/proc/", num[24], buf[512];
        put_number(num, child);
        strcat(path, num);
        strcat(path, "/task/");
        strcat(path, num);
        strcat(path, "/children");
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            ssize_t len = read(fd, buf, sizeof buf - 1);
            close(fd);
            buf[len > 0 ? len : 0] = 0;
            for (char *p = buf; *p && n < 64;) {
                long v = 0;
                while (*p == ' ') p++;
                if (*p < '0' || *p > '9') break;
                while (*p >= '0' && *p <= '9') v = v * 10 + (*p++ - '0');
                targets[n++] = (pid_t)v;
            }
        }
    }
    if (!n) targets[n++] = child;
    for (int i = 0; i < n; i++)
        if (killpg(targets[i], sig) != 0 && errno == ESRCH) kill(targets[i], sig);
}

static void on_signal(int sig) {
    int saved = errno;
    if (g_child) {
        g_forwarded = 1;
        signal_payload((pid_t)g_child, sig);
    } else if (g_npending < MAX_PENDING) {
        g_pending[g_npending] = sig;
        g_npending = g_npending + 1;
    }
    errno = saved;
}

static void block_forwarded(int how) {
    sigset_t set;
    sigemptyset(&set);
    for (size_t i = 0; i < N_FORWARDED; i++) sigaddset(&set, forwarded[i]);
    sigprocmask(how, &set, NULL);
}

/* ------------------------------------------------------------------ the launch */

static int read_all(int fd, char *buf, size_t size) {
    size_t got = 0;
    for (;;) {
        ssize_t n = read(fd, buf + got, size - 1 - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0 || (got += (size_t)n) >= size - 1) break;
    }
    buf[got] = 0;
    close(fd);
    return (int)got;
}

static long child_pid(const char *info) {
    const char *p = strstr(info, "\"child-pid\"");
    if (!p) return 0;
    p += strlen("\"child-pid\"");
    while (*p == ' ' || *p == '\t' || *p == '\n') p++;
    if (*p++ != ':') return 0;
    while (*p == ' ' || *p == '\t' || *p == '\n') p++;
    return strtol(p, NULL, 10);
}

static const char *host_value(const char *name) {
    size_t n = strlen(name);
    for (char **e = environ; *e; e++)
        if (strncmp(*e, name, n) == 0 && (*e)[n] == '=') return *e + n + 1;
    return NULL;
}

static char *joined(const char *name, const char *value) {
    char *s = malloc(strlen(name) + strlen(value) + 2);
    if (s) sprintf(s, "%s=%s", name, value);
    return s;
}

/* Run the plan in *c* (past its checks) with the command from argv[split]; never returns. */
static _Noreturn void launch(struct cursor *c, int split) {
    long long umask_set = -1, pidns, n_args, n_data, n_env, n_mount;
    struct mount_plan mount = {field(c), NULL};
    if (!mount.dir || number(c, &n_mount) || n_mount < 1 || n_mount > 64) python_cli();
    if (!(mount.argv = calloc((size_t)n_mount + 1, sizeof *mount.argv))) python_cli();
    for (long long i = 0; i < n_mount; i++)
        if (!(mount.argv[i] = field(c))) python_cli();
    char *umask_field = field(c);
    if (!umask_field || number(c, &pidns)) python_cli();
    if (strcmp(umask_field, "-") != 0) umask_set = strtoll(umask_field, NULL, 8);
    char *bwrap = field(c);
    if (!bwrap || number(c, &n_args) || n_args < 1 || n_args > 100000) python_cli();
    int n_cmd = g_argc - split;
    char **argv = calloc((size_t)(n_args + n_cmd + 4), sizeof *argv);
    if (!argv) python_cli();
    char info_fd[16], ready_fd[16];
    argv[0] = "bwrap";
    argv[1] = "--info-fd";
    argv[2] = info_fd;
    for (long long i = 0; i < n_args; i++)
        if (!(argv[3 + i] = field(c))) python_cli();
    if (number(c, &n_data) || n_data < 0 || n_data > 16) python_cli();
    int data_fds[16], n_fds = 0;
    for (long long i = 0; i < n_data; i++) {
        long long at;
        char *text;
        if (number(c, &at) || at < 0 || at >= n_args || !(text = field(c))) python_cli();
        int fd = memfd_create("hpcsif-data", 0);
        size_t len = strlen(text);
        if (fd < 0 || write(fd, text, len) != (ssize_t)len || lseek(fd, 0, SEEK_SET) != 0) python_cli();
        data_fds[n_fds++] = fd;
        char *num = malloc(16);
        if (!num) python_cli();
        snprintf(num, 16, "%d", fd);
        argv[3 + at] = num;
    }
    for (int i = 0; i < n_cmd; i++) argv[3 + n_args + i] = g_argv[split + i];
    if (number(c, &n_env) || n_env < 0 || n_env > 100000) python_cli();
    char **envp = calloc((size_t)n_env + 2, sizeof *envp);
    if (!envp) python_cli();
    for (long long i = 0; i < n_env; i++) {
        char *mode = field(c), *name = field(c), *value = field(c);
        const char *from = NULL;
        if (!value) python_cli();
        if (strcmp(mode, "s") == 0)
            from = value;
        else if (strcmp(mode, "i") == 0)
            from = host_value(name);
        else if (strcmp(mode, "c") == 0)
            from = host_value(value);
        if (!from || !(envp[i] = joined(name, from))) python_cli();
    }
    char *end = field(c);
    if (!end || strcmp(end, "end") != 0) python_cli();
    /* caught before the mount is held, as the Python engine does: nothing ends us holding it */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < N_FORWARDED; i++) sigaction(forwarded[i], &sa, NULL);
    if (!hold_mount(&mount)) python_cli();

    /* from here on we hold the mount: every exit goes through leave() */
    if (g_npending) leave(128 + g_pending[0]);
    int info[2], ready[2];
    if (pipe2(info, O_CLOEXEC) || pipe2(ready, O_CLOEXEC)) {
        fprintf(stderr, "FATAL:   cannot create a pipe: %s\n", strerror(errno));
        leave(255);
    }
    snprintf(info_fd, sizeof info_fd, "%d", info[1]);
    snprintf(ready_fd, sizeof ready_fd, "%d", ready[1]);
    envp[n_env] = joined("__HPCSIF_READY", ready_fd);
    fcntl(info[1], F_SETFD, 0);
    fcntl(ready[1], F_SETFD, 0);
    if (umask_set >= 0) umask((mode_t)umask_set);
    g_pidns = (sig_atomic_t)pidns;

    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    posix_spawnattr_setpgroup(&attr, 0); /* a terminal's Ctrl-C reaches us, and we forward it */
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
    pid_t pid;
    int err = posix_spawn(&pid, bwrap, NULL, &attr, argv, envp);
    close(info[1]);
    close(ready[1]);
    for (int i = 0; i < n_fds; i++) close(data_fds[i]);
    if (err) {
        close(info[0]);
        close(ready[0]);
        fprintf(stderr, "FATAL:   cannot start %s: %s\n", bwrap, strerror(err));
        leave(255);
    }
    char buf[4096];
    read_all(info[0], buf, sizeof buf);
    long child = child_pid(buf);
    if (child) {
        block_forwarded(SIG_BLOCK);
        g_child = (sig_atomic_t)child;
        for (int i = 0; i < g_npending; i++) {
            g_forwarded = 1;
            signal_payload((pid_t)child, g_pending[i]);
        }
        block_forwarded(SIG_UNBLOCK);
    }
    char byte = 0;
    ssize_t n;
    while ((n = read(ready[0], &byte, 1)) < 0 && errno == EINTR) {
    }
    close(ready[0]);
    int started = n == 1 && byte == 'x';
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) leave(255);
    int code = WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
    if (!started && !g_forwarded) {
        fputs("FATAL:   bwrap could not set up the container (see its message above; if it is about "
              "namespaces, this host does not allow unprivileged user namespaces: use --engine apptainer)\n",
              stderr);
        code = 255;
    }
    leave(code);
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[0], WATCHDOG) == 0 && strcmp(argv[2], "--group") == 0) {
        if (detach_after_mount(argv[1])) watch(argv[1]);
        return 0;
    }
    /* as engine.bwrap._open_standard_descriptors (and Apptainer, a Go program): a closed stdin,
     * stdout or stderr is /dev/null, so that no descriptor of the launch takes its number */
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0 && errno == EBADF) open("/dev/null", O_RDWR);
    g_argc = argc;
    g_argv = argv;
    size_t len = 0;
    int split = 0;
    /* on a terminal the Python engine makes it the container's controlling terminal, a launch it
     * does not save (supervise.py: on_terminal) */
    char *plan = argc >= 3 && !isatty(0) ? find_plan(&len, &split) : NULL;
    if (!plan) python_cli();
    struct cursor c = {plan, plan + len};
    char *format = field(&c);
    long long n_witness, min_command;
    if (!format || strcmp(format, FORMAT) || number(&c, &n_witness)) python_cli();
    for (long long i = 0; i < n_witness; i++)
        if (!witness_holds(&c)) python_cli();
    if (!user_holds(&c) || number(&c, &min_command) || argc - split < min_command) python_cli();
    launch(&c, split);
}
