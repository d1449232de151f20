/*
 * pfld_count: a qemu-user TCG plugin that counts the guest's executed instructions and records
 * the running count each time the guest makes the marker call lseek(-1, PFLD_MARK, 0).
 *
 * The guest (android_bench/cost/guest_count.py) brackets each invoke() with two marker calls;
 * the difference of two recorded counts is the instructions between them. Counting is an inline
 * add per translated block (no callback per instruction), so emulation stays fast. lseek on fd
 * -1 fails with EBADF in the guest and has no other effect.
 *
 * Build: gcc -shared -fPIC -O2 -I<qemu source>/include/qemu -o libpfld_count.so pfld_count.c
 * Use:   qemu-aarch64 -plugin ./libpfld_count.so,out=/tmp/marks.txt ...
 * Output: one decimal count per marker, in order, then "total <n>" at exit.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define LSEEK_AARCH64 62
#define PFLD_MARK 0x50464c44u /* "PFLD" */
#define MAX_MARKS 65536

static uint64_t insns;        /* single guest thread: the counted runs use 1 interpreter thread */
static uint64_t marks[MAX_MARKS];
static size_t n_marks;
static int overflow;
static char out_path[4096];

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns, qemu_plugin_tb_n_insns(tb));
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                       uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8)
{
    /* fd is an int: only its low 32 bits are defined in the register. */
    if (num != LSEEK_AARCH64 || (uint32_t)a1 != 0xffffffffu || a2 != PFLD_MARK || a3 != 0) {
        return;
    }
    if (n_marks < MAX_MARKS) {
        marks[n_marks++] = insns;
    } else {
        overflow = 1;
    }
}

static void write_marks(qemu_plugin_id_t id, void *p)
{
    FILE *f = fopen(out_path, "w");
    if (f == NULL) {
        fprintf(stderr, "pfld_count: cannot write %s\n", out_path);
        return;
    }
    for (size_t i = 0; i < n_marks; i++) {
        fprintf(f, "%" PRIu64 "\n", marks[i]);
    }
    fprintf(f, "%s %" PRIu64 "\n", overflow ? "overflow" : "total", insns);
    fclose(f);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            snprintf(out_path, sizeof out_path, "%s", argv[i] + 4);
        } else {
            fprintf(stderr, "pfld_count: unknown argument %s (only out=PATH)\n", argv[i]);
            return -1;
        }
    }
    if (out_path[0] == '\0') {
        fprintf(stderr, "pfld_count: needs out=PATH\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, write_marks, NULL);
    return 0;
}
