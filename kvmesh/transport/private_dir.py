"""Directories only this user can reach: the disk tier's and ipc_dir's.

On a shared node (a Slurm allocation, a login host) another user must not read cached
KV (it is the users' prompts, in another form), plant blocks for a cluster to serve, or
swap a directory for a symlink into someone else's files. So such a directory is
created 0700, and an existing one is refused when it is a symlink or another user's;
group or other permission bits on our own are removed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def private_dir(path: str | os.PathLike, key: str) -> Path:
    """`path`, created (parents too) or checked as above; errors name the config `key`."""
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{key}: {str(path)!r} is a symbolic link; give the real directory")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{key}: {str(path)!r} is not a directory")
    if info.st_uid != os.getuid():
        raise ValueError(f"{key}: {str(path)!r} belongs to uid {info.st_uid}, not to this "
                         f"user (uid {os.getuid()}); use a directory of your own")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path
