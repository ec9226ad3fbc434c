/*
 * spank_hpcsif: Slurm SPANK plugin for hpcsif containers.
 *
 * Adds --sif-image, --sif-mounts, --sif-nv and --sif-mpi to sbatch, salloc and srun.
 *
 *  - At submission (sbatch/salloc, or srun creating its own allocation) the request is put in
 *    the job control environment, so the prolog sees SPANK_HPCSIF_IMAGE, SPANK_HPCSIF_MOUNTS,
 *    SPANK_HPCSIF_NV and SPANK_HPCSIF_MPI and stages the image on every node before the job
 *    starts.
 *  - In the tasks of an srun step (not the batch script, not the extern step), the task's
 *    command is run inside the container: argv[0] is replaced by the task-exec wrapper, and
 *    the original argv[0] and the request travel in HPCSIF_TASK_* variables, so the task
 *    becomes "hpcsif exec [-B ...] [--nv] [--mpi NAME] IMAGE ORIGINAL-ARGV...".
 *    Slurm's slurmstepd calls slurm_spank_task_init in the forked task process right before
 *    execve(task->argv[0], task->argv, env), and task->argv is the step's argv array (unless
 *    --multi-prog), so changing argv[0] there changes what this one task executes and keeps
 *    everything slurmstepd does after the hook (task prolog, TMPDIR, limits).
 *    Commands that already start a container (hpcsif, apptainer, singularity) are left alone.
 *
 *  - With resolve_at_submit, sbatch/salloc resolve a registry tag to its digest at submission
 *    ("hpcsif slurm resolve REF") and pass it as SPANK_HPCSIF_DIGEST, so every node stages the
 *    image the tag named when the job was submitted. A failure there, or no answer within
 *    resolve_timeout seconds (a registry that hangs must not hang sbatch), is only a warning:
 *    the first prolog then resolves the tag and records it on the job.
 *
 * Plugin arguments (plugstack.conf):
 *    task_exec=PATH     the wrapper run as the task (default: HPCSIF_TASK_EXEC below)
 *    disable_task       only stage through the prolog; never wrap tasks
 *    resolve_at_submit  pin registry tags to a digest in sbatch/salloc (needs hpcsif there)
 *    hpcsif=COMMAND     how to run hpcsif for that (default: hpcsif on PATH)
 *    resolve_timeout=S  seconds sbatch/salloc wait for that (default 30)
 *
 * Because sbatch exports its SPANK options to the job's environment, an srun inside a batch
 * job submitted with --sif-image runs its tasks in that image too (as Pyxis does).
 */

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

SPANK_PLUGIN(hpcsif, 1);

#ifndef HPCSIF_TASK_EXEC
#define HPCSIF_TASK_EXEC "/usr/libexec/hpcsif/task-exec"
#endif

#define OPT_IMAGE 1
#define OPT_MOUNTS 2
#define OPT_NV 3
#define OPT_MPI 4

static char *image;
static char *mounts;
static char *mpi;
static int nv;
static char *task_exec;
static int disable_task;
static int resolve_at_submit;
static char *hpcsif_cmd;
static long resolve_timeout = 30;

static int option_cb(int val, const char *optarg, int remote);

/*
 * Registered in slurm_spank_init rather than exported as the spank_options symbol: Slurm ignores
 * that static table in the allocator context (sbatch, salloc).
 */
static struct spank_option options[] = {
	{ "sif-image", "IMAGE",
	  "[hpcsif] run the tasks in container IMAGE (docker://, oras://, oci://, a .sif ...); "
	  "the prolog stages it on every node first",
	  1, OPT_IMAGE, option_cb },
	{ "sif-mounts", "SRC[:DST[:OPTS]][,...]",
	  "[hpcsif] bind mount host paths into the container", 1, OPT_MOUNTS, option_cb },
	{ "sif-nv", NULL, "[hpcsif] enable NVIDIA GPU support in the container", 0, OPT_NV,
	  option_cb },
	{ "sif-mpi", "NAME", "[hpcsif] use the host MPI profile NAME in the container", 1, OPT_MPI,
	  option_cb },
	SPANK_OPTIONS_TABLE_END
};

static int replace(char **slot, const char *value)
{
	char *copy = strdup(value);

	if (!copy)
		return -1;
	free(*slot);
	*slot = copy;
	return 0;
}

static int option_cb(int val, const char *optarg, int remote)
{
	(void)remote;
	switch (val) {
	case OPT_IMAGE:
		if (!optarg || !*optarg) {
			slurm_error("hpcsif: --sif-image needs an image reference");
			return -1;
		}
		return replace(&image, optarg);
	case OPT_MOUNTS:
		return replace(&mounts, optarg ? optarg : "");
	case OPT_NV:
		nv = 1;
		return 0;
	case OPT_MPI:
		return replace(&mpi, optarg ? optarg : "");
	}
	return -1;
}

static int parse_plugin_args(int ac, char **av)
{
	for (int i = 0; i < ac; i++) {
		if (strncmp(av[i], "task_exec=", 10) == 0) {
			if (replace(&task_exec, av[i] + 10) < 0)
				return -1;
		} else if (strcmp(av[i], "disable_task") == 0) {
			disable_task = 1;
		} else if (strcmp(av[i], "resolve_at_submit") == 0) {
			resolve_at_submit = 1;
		} else if (strncmp(av[i], "hpcsif=", 7) == 0) {
			if (replace(&hpcsif_cmd, av[i] + 7) < 0)
				return -1;
		} else if (strncmp(av[i], "resolve_timeout=", 16) == 0) {
			char *end;

			resolve_timeout = strtol(av[i] + 16, &end, 10);
			if (end == av[i] + 16 || *end || resolve_timeout <= 0) {
				slurm_error("hpcsif: resolve_timeout=%s: expected seconds > 0", av[i] + 16);
				return -1;
			}
		} else {
			slurm_error("hpcsif: unknown plugin argument '%s' in plugstack.conf", av[i]);
			return -1;
		}
	}
	if (!task_exec)
		return replace(&task_exec, HPCSIF_TASK_EXEC);
	return 0;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	if (parse_plugin_args(ac, av) < 0)
		return -1;
	switch (spank_context()) {
	case S_CTX_LOCAL:
	case S_CTX_ALLOCATOR:
	case S_CTX_REMOTE:
		break;
	default:
		return 0;
	}
	for (struct spank_option *opt = options; opt->name; opt++) {
		spank_err_t rc = spank_option_register(sp, opt);

		if (rc != ESPANK_SUCCESS) {
			slurm_error("hpcsif: cannot register --%s: %s", opt->name, spank_strerror(rc));
			return -1;
		}
	}
	return 0;
}

/* Seconds on the monotonic clock. */
static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Read what fd gives (up to size-1 bytes) until EOF or the deadline; 0 if in time. */
static int read_line_until(int fd, char *line, size_t size, double deadline)
{
	size_t used = 0;

	for (;;) {
		struct pollfd p = { fd, POLLIN, 0 };
		double left = deadline - now();
		ssize_t n;

		if (left <= 0)
			return -1;
		if (poll(&p, 1, (int)(left * 1000) + 1) < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (!p.revents)
			continue;
		n = read(fd, line + used, size - 1 - used);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return 0; /* EOF (or an error: the exit status tells) */
		used += (size_t)n;
		line[used] = '\0';
		if (used == size - 1)
			return 0; /* more than a digest: the rest is not read (the child may get SIGPIPE) */
	}
}

/*
 * Run "HPCSIF slurm resolve REF" and return its first output line (the digest, or empty for
 * references that need no pin), or NULL on failure or after resolve_timeout seconds (the child
 * is killed). HPCSIF may be several words, so it goes through /bin/sh, with the reference passed
 * as a positional argument, never spliced in.
 */
static char *resolve_digest(const char *ref)
{
	char line[256] = "";
	int pfd[2], status = 0, in_time;
	pid_t pid;
	size_t n;

	if (pipe(pfd) < 0)
		return NULL;
	pid = fork();
	if (pid < 0) {
		close(pfd[0]);
		close(pfd[1]);
		return NULL;
	}
	if (pid == 0) {
		dup2(pfd[1], STDOUT_FILENO);
		close(pfd[0]);
		close(pfd[1]);
		execl("/bin/sh", "sh", "-c", "exec $0 -q slurm resolve \"$1\"",
		      hpcsif_cmd ? hpcsif_cmd : "hpcsif", ref, (char *)NULL);
		_exit(127);
	}
	close(pfd[1]);
	in_time = read_line_until(pfd[0], line, sizeof(line), now() + resolve_timeout) == 0;
	close(pfd[0]);
	if (!in_time) {
		slurm_info("hpcsif: warning: no answer from 'hpcsif slurm resolve' in %ld s", resolve_timeout);
		kill(pid, SIGKILL);
	}
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (!in_time || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
		return NULL;
	n = strcspn(line, "\r\n");
	line[n] = '\0';
	return strdup(line);
}

/* Put the request where the prolog finds it (sbatch, salloc, srun making its allocation). */
static int export_to_prolog(spank_t sp, int required)
{
	spank_err_t rc = spank_job_control_setenv(sp, "HPCSIF_IMAGE", image, 1);

	if (rc == ESPANK_SUCCESS && mounts)
		rc = spank_job_control_setenv(sp, "HPCSIF_MOUNTS", mounts, 1);
	if (rc == ESPANK_SUCCESS && nv)
		rc = spank_job_control_setenv(sp, "HPCSIF_NV", "1", 1);
	if (rc == ESPANK_SUCCESS && mpi)
		rc = spank_job_control_setenv(sp, "HPCSIF_MPI", mpi, 1);
	if (rc == ESPANK_SUCCESS && required && resolve_at_submit) {
		char *digest = resolve_digest(image);

		if (!digest)
			slurm_info("hpcsif: warning: could not resolve %s now; the prolog will", image);
		else if (*digest)
			rc = spank_job_control_setenv(sp, "HPCSIF_DIGEST", digest, 1);
		free(digest);
	}
	if (rc == ESPANK_SUCCESS)
		return 0;
	if (!required) { /* srun inside an allocation: the prologs have run already */
		slurm_debug("hpcsif: no job control environment here: %s", spank_strerror(rc));
		return 0;
	}
	slurm_error("hpcsif: cannot pass the image request to the prolog: %s", spank_strerror(rc));
	return -1;
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	if (!image) {
		if (mounts || nv || mpi) {
			slurm_error("hpcsif: --sif-mounts, --sif-nv and --sif-mpi need --sif-image");
			return -1;
		}
		return 0;
	}
	switch (spank_context()) {
	case S_CTX_ALLOCATOR:
		return export_to_prolog(sp, 1);
	case S_CTX_LOCAL:
		/* srun makes its own allocation (and so runs the prologs) only outside a job */
		return export_to_prolog(sp, getenv("SLURM_JOB_ID") == NULL);
	default:
		return 0;
	}
}

static const char *base_name(const char *path)
{
	const char *slash = strrchr(path, '/');

	return slash ? slash + 1 : path;
}

/* Commands that start a container themselves: wrapping them again would nest containers. */
static int starts_container(const char *argv0)
{
	static const char *const names[] = { "hpcsif", "apptainer", "singularity",
					     "run-singularity", NULL };
	const char *name = base_name(argv0);

	for (int i = 0; names[i]; i++)
		if (strcmp(name, names[i]) == 0)
			return 1;
	return 0;
}

static int set_task_env(spank_t sp, const char *name, const char *value)
{
	spank_err_t rc = spank_setenv(sp, name, value, 1);

	if (rc != ESPANK_SUCCESS) {
		slurm_error("hpcsif: cannot set %s: %s", name, spank_strerror(rc));
		return -1;
	}
	return 0;
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	uint32_t step_id = 0;
	int argc = 0;
	char **argv = NULL;
	char *wrapper;

	(void)ac;
	(void)av;
	if (!image || disable_task || !spank_remote(sp))
		return 0;
	if (spank_get_item(sp, S_JOB_STEPID, &step_id) != ESPANK_SUCCESS)
		return -1;
	/* the batch script runs on the host; its srun steps inherit --sif-image */
	if (step_id == SLURM_BATCH_SCRIPT || step_id == SLURM_EXTERN_CONT)
		return 0;
	if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS || argc < 1 || !argv[0])
		return 0;
	if (starts_container(argv[0]))
		return 0;
	if (set_task_env(sp, "HPCSIF_TASK_IMAGE", image) < 0 ||
	    set_task_env(sp, "HPCSIF_TASK_ARGV0", argv[0]) < 0 ||
	    set_task_env(sp, "HPCSIF_TASK_MOUNTS", mounts ? mounts : "") < 0 ||
	    set_task_env(sp, "HPCSIF_TASK_NV", nv ? "1" : "") < 0 ||
	    set_task_env(sp, "HPCSIF_TASK_MPI", mpi ? mpi : "") < 0)
		return -1;
	wrapper = strdup(task_exec);
	if (!wrapper)
		return -1;
	/* this process exec()s argv right after we return; see the comment at the top */
	argv[0] = wrapper;
	return 0;
}

int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	(void)sp;
	(void)ac;
	(void)av;
	free(image);
	free(mounts);
	free(mpi);
	free(task_exec);
	free(hpcsif_cmd);
	image = mounts = mpi = task_exec = hpcsif_cmd = NULL;
	return 0;
}
