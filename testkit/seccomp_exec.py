"""Runs a program under a seccomp filter, as systemd's SystemCallFilter= would (for tests).

Usage: seccomp_exec.py ALLOWED_FILE ERRNO PROGRAM [ARGS...]
  ALLOWED_FILE  the allowed system calls, whitespace-separated (names this architecture lacks are skipped)
  ERRNO         what every other call fails with (SystemCallErrorNumber=), e.g. EPERM

Needs Debian's python3-seccomp (libseccomp's bindings) under /usr/bin/python3.
"""

import errno
import os
import sys

import seccomp


def main():
    allowed_file, err, program = sys.argv[1], sys.argv[2], sys.argv[3]
    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(getattr(errno, err)))
    with open(allowed_file) as fh:
        for name in fh.read().split():
            try:
                f.add_rule(seccomp.ALLOW, name)
            except (RuntimeError, ValueError):
                pass  # not a system call on this architecture
    f.load()
    os.execv(program, sys.argv[3:])


if __name__ == "__main__":
    main()
